"""A verified copy of a wire instance in a transfer syntax a given PACS renders (JPEG-LS lossless or explicit VR
little endian), pixels proven bit-exact against the wire copy before it is handed over."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom import uid

from sync.core.errors import BadInputError
from sync.wire import codecs

log = logging.getLogger(__name__)

# What Debian's Orthanc 1.10 (no GDCM plugin) stores and renders (/instances/{id}/preview), probed with pydicom's
# test files: native, RLE, JPEG baseline/extended/lossless and JPEG-LS lossless. JPEG 2000 gives HTTP 415, JPEG-LS
# near-lossless is refused at C-STORE (0xA700), and JPEG XL is unknown to it (and to pydicom 3.0, and most viewers).
ORTHANC_RENDERS = (
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless,
)
TARGETS = ("jpegls", "explicit")
# Colour models a decoder has already turned into RGB (J2K's reversible/irreversible transforms), or upsampled.
_DECODED_AS = {"YBR_RCT": "RGB", "YBR_ICT": "RGB", "YBR_FULL_422": "YBR_FULL"}


@dataclass(frozen=True)
class PacsCopy:
    data: bytes
    transfer_syntax_uid: str
    transcoded: bool         # False: the wire copy itself, byte for byte
    source_syntax: str


def for_pacs(data: bytes, accept: frozenset[str] | tuple[str, ...] = ORTHANC_RENDERS,
             target: str = "jpegls") -> PacsCopy:
    """The instance as the PACS should get it: as is when it has no pixels or its syntax is in `accept`, else
    re-encoded (JPEG-LS lossless when `target` is "jpegls" and accepted, explicit VR little endian otherwise).
    BadInputError when the pixels do not decode or a re-encoding is not bit-exact."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    ds, raw = codecs.read_dataset(data)
    source = codecs.syntax_of(ds)
    if "PixelData" not in ds or source in accept:
        return PacsCopy(raw, source, False, source)
    codecs.check_dimensions(ds)
    try:
        frames = codecs.decode_frames(ds)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a decoder's own error class; the type only (no header values)
        raise BadInputError(f"pixel data does not decode for the PACS copy ({type(err).__name__})") from err
    if target == "jpegls" and uid.JPEGLSLossless in accept and codecs.JpegLs.available():
        out = _jpegls(ds, frames)
        if out is not None:
            return PacsCopy(out, uid.JPEGLSLossless, True, source)
    return PacsCopy(_native(ds, frames), uid.ExplicitVRLittleEndian, True, source)


def _photometric(ds) -> str:
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    return _DECODED_AS.get(pi, pi)


def _jpegls(ds, frames: np.ndarray) -> bytes | None:
    info = codecs.FrameInfo(int(ds.BitsStored), int(ds.PixelRepresentation) == 1, _photometric(ds))
    if info.photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB"):
        return None
    codec = codecs.JpegLs()
    try:
        encoded = [codec.encode(f, info) for f in codecs.codec_container(frames, info)]
        out = codecs.build_encapsulated(ds, codec, encoded, info)
    except codecs.CodecUnsuitable as err:
        log.info("JPEG-LS cannot carry this image (%s): explicit VR little endian instead", err)
        return None
    except Exception as err:  # noqa: BLE001 - any encoder failure falls back to the native copy
        log.warning("JPEG-LS encoding failed (%s): explicit VR little endian instead", type(err).__name__)
        return None
    _prove(out, frames)
    return out


def _native(ds, frames: np.ndarray) -> bytes:
    out = ds.copy()
    out.file_meta = ds.file_meta.copy()
    out.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    bits = int(ds.BitsAllocated)
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}.get(bits)
    if dtype is None:
        raise BadInputError(f"Bits Allocated {bits} cannot be written natively for the PACS")
    if int(ds.PixelRepresentation) == 1:
        dtype = {np.uint8: np.int8, np.uint16: np.int16, np.uint32: np.int32}[dtype]
    # The decoders hand back stored values in native byte order; the file is little endian.
    payload = np.ascontiguousarray(frames.astype(np.dtype(dtype).newbyteorder("<"), copy=False)).tobytes()
    if len(payload) % 2:
        payload += b"\0"
    out.PixelData = payload
    out["PixelData"].VR = "OB" if bits == 8 else "OW"
    out["PixelData"].is_undefined_length = False
    out.PhotometricInterpretation = _photometric(ds)
    if int(out.get("SamplesPerPixel", 1)) > 1:
        out.PlanarConfiguration = 0  # decoders interleave the samples
    for tag in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if tag in out:
            del out[tag]
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, out, enforce_file_format=True)
    data = buf.getvalue()
    _prove(data, frames)
    return data


def _prove(data: bytes, frames: np.ndarray) -> None:
    """The copy must decode to exactly the wire copy's stored values; a mismatch is never handed to the PACS."""
    ds, _ = codecs.read_dataset(data)
    again = codecs.decode_frames(ds)
    if again.shape != frames.shape or not np.array_equal(again.astype(np.int64), frames.astype(np.int64)):
        raise BadInputError("the PACS copy does not decode to the received pixels")
