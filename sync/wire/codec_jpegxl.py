"""JPEG XL lossless (libjxl through imagecodecs; Supplement 232 transfer syntax): the smallest files, at an effort."""
from __future__ import annotations

import numpy as np

from sync.wire.codec_base import JPEGXLLossless, Codec, CodecUnsuitable, FrameInfo, imagecodecs_has


class JpegXl(Codec):
    name = "jpegxl"
    transfer_syntax_uid = JPEGXLLossless
    pydicom_decodes = False

    def __init__(self, effort: int = 7) -> None:
        if not 1 <= effort <= 10:
            raise ValueError(f"JPEG-XL effort must be 1..10, got {effort}")
        self.effort = effort

    @classmethod
    def available(cls) -> bool:
        return imagecodecs_has("JPEGXL")

    def encode(self, frame: np.ndarray, info: FrameInfo) -> bytes:
        import imagecodecs
        if info.signed:
            raise CodecUnsuitable("JPEG-XL lossless carries unsigned samples only")
        if info.bits_stored > 16:
            raise CodecUnsuitable("JPEG-XL here carries at most 16 bits")
        if info.photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB"):
            raise CodecUnsuitable(f"JPEG-XL here does not carry {info.photometric}")
        return bytes(imagecodecs.jpegxl_encode(
            np.ascontiguousarray(frame), lossless=True, effort=self.effort, bitspersample=info.bits_stored,
            numthreads=1,
        ))

    def decode(self, data: bytes, info: FrameInfo) -> np.ndarray:
        import imagecodecs
        return imagecodecs.jpegxl_decode(data, numthreads=1)
