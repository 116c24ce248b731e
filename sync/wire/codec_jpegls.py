"""JPEG-LS lossless (CharLS through imagecodecs or pyjpegls): the default codec, fast on every CPU."""
from __future__ import annotations

import numpy as np
from pydicom import uid

from sync.wire.codec_base import Codec, CodecUnsuitable, FrameInfo, imagecodecs_has, sign_extend


class JpegLs(Codec):
    name = "jpegls"
    transfer_syntax_uid = uid.JPEGLSLossless

    @classmethod
    def available(cls) -> bool:
        try:
            import jpeg_ls  # noqa: F401
        except ImportError:
            return False
        return imagecodecs_has("JPEGLS")

    def encode(self, frame: np.ndarray, info: FrameInfo) -> bytes:
        if info.bits_stored > 16:
            raise CodecUnsuitable("JPEG-LS carries at most 16 bits")
        if info.photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB"):
            raise CodecUnsuitable(f"JPEG-LS here does not carry {info.photometric}")
        # JPEG-LS has no sign: DICOM stores the two's-complement bit pattern, the decoder sign-extends.
        if info.signed:
            unsigned = frame.view(np.dtype(f"u{frame.dtype.itemsize}"))
            frame = unsigned & unsigned.dtype.type((1 << info.bits_stored) - 1)
        container = 8 * frame.dtype.itemsize
        if info.bits_stored == container:
            # imagecodecs' CharLS is ~50 % faster than pyjpegls but always writes P = the container width,
            # which DICOM wants equal to Bits Stored; so it is used only where the two agree.
            import imagecodecs
            return bytes(imagecodecs.jpegls_encode(np.ascontiguousarray(frame)))
        import jpeg_ls
        rows, cols = frame.shape[:2]
        spp = 1 if frame.ndim == 2 else frame.shape[2]
        return bytes(jpeg_ls.encode_buffer(
            np.ascontiguousarray(frame).tobytes(), rows, cols, spp, info.bits_stored,
            interleave_mode=2 if spp > 1 else None,
        ))

    def decode(self, data: bytes, info: FrameInfo) -> np.ndarray:
        import imagecodecs
        return sign_extend(imagecodecs.jpegls_decode(data), info.bits_stored, info.signed)
