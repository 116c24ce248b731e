"""A bounded walk of JP2 boxes in place of pydicom's, which loops forever on a box of length 0 or below 8."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_JP2_SIGNATURE = b"\x00\x00\x00\x0c\x6a\x50\x20\x20"
_JP2C = b"\x6a\x70\x32\x63"
_installed = False


def jp2_boxes_sane(codestream: bytes) -> bool:
    """False for a JP2 file whose box lengths cannot be walked to its jp2c box (0, 2..7, past the end, or a
    64-bit XLBox length that is not one); a raw J2K codestream (no JP2 signature) passes."""
    if not codestream.startswith(_JP2_SIGNATURE):
        return True
    total, offset = len(codestream), 12
    while offset + 8 <= total:
        length = int.from_bytes(codestream[offset:offset + 4], "big")
        if codestream[offset + 4:offset + 8] == _JP2C:
            return True
        if length == 1:  # the real length is the next 8 bytes (XLBox)
            length = int.from_bytes(codestream[offset + 8:offset + 16], "big")
            if length < 16:
                return False
        elif length < 8:  # 0 means "to the end of the file", legal only for the last box, and that is not jp2c
            return False
        offset += length
    return False


def codestream_of(data: bytes) -> bytes | None:
    """The J2K codestream itself: `data` when it is one, the jp2c box's content when `data` is a JP2 file, None when
    the boxes cannot be walked to it."""
    if not data.startswith(_JP2_SIGNATURE):
        return data
    total, offset = len(data), 12
    while offset + 8 <= total:
        length, head = int.from_bytes(data[offset:offset + 4], "big"), 8
        if length == 1:
            length, head = int.from_bytes(data[offset + 8:offset + 16], "big"), 16
        if data[offset + 4:offset + 8] == _JP2C:
            end = total if length == 0 else offset + length
            return data[offset + head:end]
        if length < head:
            return None
        offset += length
    return None


def install() -> None:
    """Put the guard in front of pydicom's get_j2k_parameters wherever pydicom 3 looks it up (idempotent).

    Reached from every JPEG 2000 decode and encode pydicom does: the box's imaging, its uploader and the hub's
    codecs. A file that fails the walk gets pydicom's "cannot parse" answer ({}), and the decoder then refuses it
    with an error of its own instead of spinning a thread forever.
    """
    global _installed
    if _installed:
        return
    import pydicom.pixels.decoders.base as decoders_base
    import pydicom.pixels.utils as pixel_utils

    original = pixel_utils.get_j2k_parameters

    def guarded(codestream: bytes) -> dict:
        if not jp2_boxes_sane(bytes(codestream)):
            log.warning("JPEG 2000 frame with malformed JP2 boxes: not parsed")
            return {}
        return original(codestream)

    for module in (pixel_utils, decoders_base):
        if getattr(module, "get_j2k_parameters", None) is original:
            module.get_j2k_parameters = guarded  # type: ignore[attr-defined]
    try:
        import pydicom.pixels.encoders.base as encoders_base

        if getattr(encoders_base, "get_j2k_parameters", None) is original:
            encoders_base.get_j2k_parameters = guarded  # type: ignore[attr-defined]
    except ImportError:
        pass
    _installed = True
