"""What every wire codec is: the Codec interface, the frame facts it gets, and the 'cannot carry this' signal."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydicom import uid
from pydicom._uid_dict import UID_dictionary

# Supplement 232 (2024). pydicom 3.0 does not know the UID, so it would refuse to write or parse a file in it
# (UID.is_transfer_syntax is a dictionary look-up); registering it is additive and a no-op once pydicom has it.
# pydicom has no decoder for it either: sync.wire.codecs._frames decodes it through imagecodecs.
JPEGXLLossless = uid.UID("1.2.840.10008.1.2.4.110")
UID_dictionary.setdefault(JPEGXLLossless, ("JPEG XL Lossless", "Transfer Syntax", "", "", "JPEGXLLossless"))


class CodecUnsuitable(Exception):
    """This codec cannot carry this image (bit depth, signedness, colour model); the next candidate is tried."""


@dataclass(frozen=True)
class FrameInfo:
    """What a codec needs to know about a frame beyond its array."""

    bits_stored: int
    signed: bool
    photometric: str


class Codec:
    """A lossless image codec for one DICOM frame. Subclasses set `name` and `transfer_syntax_uid`."""

    name: ClassVar[str]
    transfer_syntax_uid: ClassVar[str | None]
    # Whether pydicom can decode this transfer syntax itself; if not, the receiver uses `decode`.
    pydicom_decodes: ClassVar[bool] = True

    @classmethod
    def available(cls) -> bool:
        raise NotImplementedError

    def photometric(self, info: FrameInfo) -> str:
        """Photometric Interpretation the encoded instance must declare."""
        return info.photometric

    def encode(self, frame: np.ndarray, info: FrameInfo) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, info: FrameInfo) -> np.ndarray:
        raise NotImplementedError


def imagecodecs_has(attr: str) -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    codec = getattr(imagecodecs, attr, None)
    return bool(codec is not None and codec.available)


def sign_extend(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    if not signed:
        return arr
    wide = arr.astype(np.int32) if arr.dtype.itemsize < 4 else arr.astype(np.int64)
    sign = 1 << (bits_stored - 1)
    out = (wide ^ sign) - sign
    return out.astype(np.int8 if bits_stored <= 8 else np.int16)
