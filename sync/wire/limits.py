"""The header's claims checked before any decode, on box and hub: sizes, frame counts, codestream markers."""
from __future__ import annotations

import struct
from collections.abc import Iterator

from pydicom.encaps import generate_frames, get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from sync.core.errors import BadInputError, ImageTooLargeError, NoPixelDataError, UnsupportedTransferSyntaxError
from sync.wire import j2k_guard

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)


def transfer_syntax(ds) -> UID:
    meta = getattr(ds, "file_meta", None)
    try:
        uid = meta.get("TransferSyntaxUID") if meta is not None else None
    except Exception as err:  # noqa: BLE001 - pydicom converts the raw value here; any failure is the file's
        raise BadInputError(f"Transfer Syntax UID cannot be read ({type(err).__name__})") from err
    if not uid:
        raise BadInputError("dataset has no Transfer Syntax UID in its file meta information")
    return UID(str(uid))


def int_attr(ds, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
    except Exception as err:  # noqa: BLE001 - pydicom converts the raw bytes here: BytesLengthException, ValueError...
        raise BadInputError(f"image attribute {keyword} cannot be read ({type(err).__name__})") from err
    if value is None or (isinstance(value, str) and value == ""):
        if default is None:
            raise BadInputError(f"image attribute {keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as err:  # a list, "abc", NaN, an IS of 1e400 (infinity)
        raise BadInputError(f"image attribute {keyword} is not an integer") from err


def number_of_frames(ds) -> int:
    return max(int_attr(ds, "NumberOfFrames", 1), 1)


MAX_FRAMES = 10_000
# All frames of one instance, decoded (rows x columns x samples x frames x bytes per sample): the uploader and the
# hub decode every frame, so a 19 KB JPEG-LS claiming 16 frames of 8000 x 8000 must be refused from its header.
# 400 MB holds a 300-frame 640 x 480 RGB cine loop (276 MB) and any radiograph.
MAX_DECODED_BYTES = 400 * 1024 * 1024

# Storage classes that carry no image by design (structured reports incl. dose reports and key objects,
# presentation states, encapsulated documents, waveforms, raw data): stored and forwarded with their study, never
# triaged and never quarantined for lacking pixel data.
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",   # SR family (RDSR, KOS, CAD SR, ...)
    "1.2.840.10008.5.1.4.1.1.11.",   # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL ...
    "1.2.840.10008.5.1.4.1.1.9.",    # waveforms (ECG, audio, ...)
    "1.2.840.10008.5.1.4.1.1.66",    # raw data, spatial registration, fiducials, segmentation surfaces
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects other than images
)


def is_non_image(sop_class_uid) -> bool:
    uid = str(sop_class_uid or "")
    if uid == "1.2.840.10008.5.1.4.1.1.481.1":  # RT Image is an image
        return False
    return uid.startswith(NON_IMAGE_SOP_PREFIXES)


def check_dimensions(ds, max_pixels: int = 100_000_000) -> None:
    """The header's size claims against the per-frame and per-instance budgets, before any decode (box and hub)."""
    rows, cols = int_attr(ds, "Rows"), int_attr(ds, "Columns")
    frames, samples = number_of_frames(ds), int_attr(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0 or samples not in (1, 3, 4):
        raise BadInputError(f"invalid image dimensions {rows}x{cols} with {samples} samples per pixel")
    # Per frame: triage decodes one frame at a time, so a single absurd frame (a forged 60000x60000 claim) is the
    # risk there; the uploader and the hub decode them all, hence the per-instance budget below.
    per_frame = rows * cols * samples
    if per_frame > max_pixels or frames > MAX_FRAMES:
        raise ImageTooLargeError(
            f"image of {rows}x{cols}x{samples} samples per frame ({per_frame} values), {frames} frames, exceeds the "
            f"limit of {max_pixels} values per frame and {MAX_FRAMES} frames"
        )
    bits = int_attr(ds, "BitsAllocated", 8)
    if bits not in (1, 8, 16, 32, 64):
        raise BadInputError(f"invalid Bits Allocated {bits}")
    decoded = per_frame * frames * max(bits // 8, 1)
    if decoded > MAX_DECODED_BYTES:
        raise ImageTooLargeError(
            f"{frames} frame(s) of {rows}x{cols}x{samples} at {bits} bits would decode to {decoded / 2**20:.0f} MiB, "
            f"over the limit of {MAX_DECODED_BYTES / 2**20:.0f} MiB per instance")


def check_header(ds, max_pixels: int = 100_000_000) -> None:
    """Refuse what cannot or should not be decoded, without touching the pixel data.

    Pixel presence is checked last, so a caller holding a dataset read with `stop_before_pixels` learns that
    everything else passed when the only error is NoPixelDataError.
    """
    has_pixels = any(kw in ds for kw in _PIXEL_KEYWORDS)
    if not has_pixels and "Rows" not in ds and "Columns" not in ds:
        raise NoPixelDataError("dataset has no pixel data and no image attributes")
    check_dimensions(ds, max_pixels)
    uid = transfer_syntax(ds)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise UnsupportedTransferSyntaxError(f"no decoder for transfer syntax {uid} ({uid.name})") from err
    if not decoder.is_available:
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {uid} ({uid.name}) needs a decoder plugin that is not installed"
        )
    if not has_pixels:
        raise NoPixelDataError("dataset has no Pixel Data element")



_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
# SOF0-15 but DHT (C4), JPG (C8) and DAC (CC); F7 is JPEG-LS SOF55.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_END_MARKER = b"\xff\xd9"  # JPEG EOI and J2K EOC alike


def _jpeg_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG / JPEG-LS frame header."""
    if data[:2] != b"\xff\xd8":
        raise BadInputError("codestream does not start with a JPEG SOI marker")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise BadInputError("malformed JPEG marker segment")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            seg = data[i + 4:i + 10]
            if len(seg) < 6:
                break
            return int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
        if marker == 0xDA:
            raise BadInputError("JPEG scan data before any frame header")
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            raise BadInputError("malformed JPEG marker segment")
        i += 2 + length
    raise BadInputError("JPEG codestream has no frame header")


def _j2k_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a J2K / HTJ2K SIZ segment."""
    if data[:4] != b"\xff\x4f\xff\x51" or len(data) < 42:
        raise BadInputError("codestream does not start with the JPEG 2000 SOC and SIZ markers")
    x, y, x0, y0 = struct.unpack_from(">IIII", data, 8)
    return max(y - y0, 0), max(x - x0, 0), int.from_bytes(data[40:42], "big")


def check_codestream(frame: bytes, uid: str, rows: int, cols: int, samples: int, index: int) -> None:
    """BadInputError unless this encapsulated frame's codestream fits the header and is complete."""
    if uid in _JPEG_SYNTAXES:
        stream = frame
        h, w, c = _jpeg_size(stream)
    elif uid in _J2K_SYNTAXES:
        found = j2k_guard.codestream_of(bytes(frame))
        if found is None:
            raise BadInputError(f"frame {index}: JPEG 2000 boxes cannot be walked to the codestream")
        stream = found
        h, w, c = _j2k_size(stream)
    else:
        return
    if min(h, w, c) == 0 or h * w * c > rows * cols * max(samples, 1):
        raise ImageTooLargeError(f"frame {index}: its codestream claims {w}x{h} with {c} components, the header "
                                 f"{cols}x{rows} with {samples}")
    # The marker may be followed by a padding byte or a few (0x00, 0xFF); inside entropy-coded data FF D9 cannot occur.
    if _END_MARKER not in bytes(stream[-16:]):
        raise BadInputError(f"frame {index}: the codestream is cut short (no end-of-image marker)")


def check_codestreams(ds, uid: str, indices: list[int] | None = None) -> None:
    """`check_codestream` for the frames given (all when None) of an encapsulated dataset."""
    if uid not in _JPEG_SYNTAXES and uid not in _J2K_SYNTAXES:
        return
    rows, cols = int_attr(ds, "Rows"), int_attr(ds, "Columns")
    samples, n_frames = int_attr(ds, "SamplesPerPixel", 1), number_of_frames(ds)
    try:
        frames: Iterator[tuple[int, bytes]]
        if indices is None:
            frames = enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames))
        else:
            frames = ((i, get_frame(ds.PixelData, i, number_of_frames=n_frames)) for i in indices)
        for index, frame in frames:
            check_codestream(frame, uid, rows, cols, samples, index)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - fragments and offset tables are the file's
        raise BadInputError(f"encapsulated pixel data cannot be split into frames ({type(err).__name__})") from err


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
