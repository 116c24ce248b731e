"""JPEG 2000 and HTJ2K lossless (OpenJPEG and OpenJPH through imagecodecs)."""
from __future__ import annotations

import numpy as np
from pydicom import uid

from sync.wire.codec_base import Codec, CodecUnsuitable, FrameInfo, imagecodecs_has


class _J2kFamily(Codec):
    def photometric(self, info: FrameInfo) -> str:
        # With the reversible colour transform applied the standard requires YBR_RCT; the decoder undoes it.
        return "YBR_RCT" if info.photometric == "RGB" else info.photometric

    def _check(self, info: FrameInfo) -> None:
        if info.photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB"):
            raise CodecUnsuitable(f"{self.name} here does not carry {info.photometric}")
        if info.bits_stored > 16:
            raise CodecUnsuitable(f"{self.name} here carries at most 16 bits")


class Jpeg2000(_J2kFamily):
    name = "j2k"
    transfer_syntax_uid = uid.JPEG2000Lossless

    @classmethod
    def available(cls) -> bool:
        return imagecodecs_has("JPEG2K")

    def encode(self, frame: np.ndarray, info: FrameInfo) -> bytes:
        import imagecodecs
        self._check(info)
        return bytes(imagecodecs.jpeg2k_encode(
            np.ascontiguousarray(frame), 0, codecformat="J2K", reversible=True, bitspersample=info.bits_stored,
            mct=info.photometric == "RGB", numthreads=1,
        ))

    def decode(self, data: bytes, info: FrameInfo) -> np.ndarray:
        import imagecodecs
        return imagecodecs.jpeg2k_decode(data, numthreads=1)


class Htj2k(_J2kFamily):
    name = "htj2k"
    transfer_syntax_uid = uid.HTJ2KLossless

    @classmethod
    def available(cls) -> bool:
        return imagecodecs_has("HTJ2K")

    def encode(self, frame: np.ndarray, info: FrameInfo) -> bytes:
        import imagecodecs
        self._check(info)
        # openjph takes the precision from the dtype (16 for a 12-bit frame); pydicom decodes that correctly.
        return bytes(imagecodecs.htj2k_encode(
            np.ascontiguousarray(frame), 0, reversible=True, rgb=info.photometric == "RGB",
        ))

    def decode(self, data: bytes, info: FrameInfo) -> np.ndarray:
        import imagecodecs
        return imagecodecs.htj2k_decode(data)
