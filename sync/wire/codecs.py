"""Lossless re-encoding of a DICOM instance for the wire: the choice between codecs (each in its codec_*.py), bit-exact proof."""
from __future__ import annotations

import io
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array

from sync.wire import codec_policy, dicom_scan, j2k_guard
from sync.wire.codec_base import JPEGXLLossless, Codec, CodecUnsuitable, FrameInfo  # noqa: F401 - the codecs' API
from sync.wire.codec_j2k import Htj2k, Jpeg2000
from sync.wire.codec_jpegls import JpegLs
from sync.wire.codec_jpegxl import JpegXl
from sync.core.errors import BadInputError, UnsupportedTransferSyntaxError

log = logging.getLogger(__name__)
j2k_guard.install()  # the hub decodes and the uploader re-encodes untrusted JPEG 2000 too

# Pixel data in these is already lossy: re-encoding cannot win anything back, so they travel untouched.
# J2K .91 and HTJ2K .203 may hold reversible codestreams, but the transfer syntax does not promise it.
LOSSY_SYNTAXES = frozenset({
    uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000, uid.JPEG2000MC, uid.HTJ2K,
    uid.JPIPHTJ2KReferenced, uid.JPIPHTJ2KReferencedDeflate, *uid.MPEGTransferSyntaxes,
    "1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95",  # JPIP referenced (deflate)
    "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112",  # JPEG XL recompressed JPEG / JPEG XL (lossy)
})
NATIVE_SYNTAXES = frozenset({
    uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
})
LOSSLESS_COMPRESSED_SYNTAXES = frozenset({
    uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.JPEG2000MCLossless,
    uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.RLELossless, JPEGXLLossless,
})

# The default candidate list, from the compression table in ANCHORS.md re-measured here (scripts/bench_codecs.py):
# - JPEG-LS (CharLS) is within 1-5 % of the best ratio on every 10-16 bit CR/DX at 40-150 MB/s: always tried.
# - JPEG-XL effort 2 matches or beats it on 10-16 bit grey (RG3 +2 %) and is 2.5x better on 8-bit RGB ultrasound;
#   it runs at 30-100 MB/s, so the pair stays near 20 MB/s per core on the chest CR.
# - JPEG-XL effort 7 is 3 MB/s but another 15-50 % smaller on 8-bit ultrasound and palette images; it is only tried
#   on small instances (SLOW_CODEC_MAX_BYTES), where it costs well under a second and the link saves more than that.
# - HTJ2K and J2K never won on the samples (HTJ2K 3-8 % larger, J2K 12 MB/s); both stay available by name.
DEFAULT_CODECS = ("jpegls", "jpegxl:2")
SMALL_IMAGE_CODECS = ("jpegxl:7",)
SLOW_CODEC_MAX_BYTES = 2 * 1024 * 1024
# - Larger images the fast pair already compresses >= 3:1 (smooth CR like RG3, ultrasound cine) get effort 7 too: it
#   wins another 5-15 % there (RG3 7.8 vs 7.2, US 10.2 vs 8.9) while on noisy CR (<= 2:1, RG1) it gains < 1 %. At
#   ~3 MB/s a 6 MB CR costs 2 s of one core, while a 256 kbit/s uplink needs ~25 s for its bytes, so the trade
#   pays on a satellite box; above COMPRESSIBLE_MAX_BYTES the encode would hold up the queue too long.
COMPRESSIBLE_RATIO = 3.0
COMPRESSIBLE_MAX_BYTES = 64 * 1024 * 1024


CODECS: dict[str, type[Codec]] = {c.name: c for c in (JpegLs, Jpeg2000, Htj2k, JpegXl)}
_BY_SYNTAX = {c.transfer_syntax_uid: c for c in CODECS.values()}


def make_codec(spec: str) -> Codec:
    """'jpegls', 'htj2k', 'j2k', 'jpegxl' (effort 7) or 'jpegxl:N' (effort N)."""
    name, _, arg = spec.partition(":")
    if name not in CODECS:
        raise ValueError(f"unknown codec {spec!r}; known: {', '.join(CODECS)}")
    if name == "jpegxl":
        return JpegXl(int(arg) if arg else 7)
    if arg:
        raise ValueError(f"codec {name!r} takes no argument")
    return CODECS[name]()


def available_codecs() -> list[str]:
    return [name for name, cls in CODECS.items() if cls.available()]


@dataclass
class WireEncoding:
    data: bytes                 # a complete DICOM Part-10 file (preamble + meta) in the chosen transfer syntax
    codec: str                  # "jpegls", "j2k", "htj2k", "jpegxl", "jpegxl:2", or "original"
    transfer_syntax_uid: str
    original_size: int
    ratio: float                # original_size / len(data)
    # The sent pixels are proven to equal the source: decoded bit-exact, or (codec "original") the bytes are the source.
    verified: bool


def _read(source: bytes | str | Path) -> tuple[Dataset, bytes]:
    raw = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    # The box's strict, bounded walk first (sync.wire.dicom_scan): deflate bombs, deep or huge sequences, element
    # floods and cut files are refused before pydicom parses (and inflates) the whole file.
    scan = dicom_scan.scan_bytes(bytes(raw))
    if scan.error is not None:
        raise scan.error
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(raw))
    except Exception as err:  # noqa: BLE001 - mutated files raise OSError, RecursionError, zlib/struct errors, ...
        raise BadInputError(dicom_scan.reason(err, "DICOM file")) from err  # the type only: no quoted values
    # pydicom only warns on a file cut short inside encapsulated pixel data, and CharLS then decodes what is
    # left without complaint: a truncated transfer must not pass as a good one.
    if truncated := [str(w.message) for w in caught if "End of file" in str(w.message)]:
        raise BadInputError(f"truncated DICOM file: {truncated[0]}")
    for w in caught:
        log.debug("reading DICOM: %s", w.message)
    return ds, bytes(raw)


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", uid.ImplicitVRLittleEndian)) if meta else uid.ImplicitVRLittleEndian


def _info(ds: Dataset) -> FrameInfo:
    return FrameInfo(int(ds.BitsStored), int(ds.PixelRepresentation) == 1, str(ds.PhotometricInterpretation))


def _jxl_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a bare JPEG XL codestream's SizeHeader (ISO/IEC 18181-1, D.2); None for anything else
    (the ISOBMFF container form, which imagecodecs does not write)."""
    if data[:2] != b"\xff\x0a":
        return None
    bits, pos = int.from_bytes(data[2:14], "little"), 0

    def u(n: int) -> int:
        nonlocal pos
        value = (bits >> pos) & ((1 << n) - 1)
        pos += n
        return value

    def u32() -> int:
        return 1 + u((9, 13, 18, 30)[u(2)])

    small = u(1)
    rows = (u(5) + 1) * 8 if small else u32()
    ratio = u(3)
    if ratio:
        num, den = ((1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))[ratio - 1]
        return rows, rows * num // den
    return rows, (u(5) + 1) * 8 if small else u32()


def _frames(ds: Dataset) -> np.ndarray:
    """All frames as (frames, rows, cols[, samples]); colour values as stored, never colour-converted."""
    from sync.wire.limits import check_codestreams

    syntax = _syntax(ds)
    check_codestreams(ds, syntax)  # each frame's own header against the DICOM header, and complete, before decoding
    codec_cls = _BY_SYNTAX.get(syntax)
    if codec_cls is not None and not codec_cls.pydicom_decodes:
        info = _info(ds)
        codec = codec_cls()
        n = int(ds.get("NumberOfFrames") or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = []
        for index, f in enumerate(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=n)):
            size = _jxl_size(f)
            # imagecodecs allocates what the codestream claims; the header's budget was checked, this must fit it.
            if size is not None and size[0] * size[1] > rows * cols:
                raise BadInputError(f"frame {index}: its JPEG XL codestream claims {size[1]}x{size[0]}, the header "
                                    f"{cols}x{rows}")
            frames.append(codec.decode(f, info))
        arr = np.stack(frames)
        expected = (n, rows, cols) + ((int(ds.SamplesPerPixel),) if ds.SamplesPerPixel > 1 else ())
        if arr.shape != expected:
            raise ValueError(f"decoded shape {arr.shape} != declared {expected}")
        return arr
    # pydicom would pick libjpeg for JPEG-LS, which runs at a quarter of CharLS' speed on the chest CR.
    plugin = "pyjpegls" if syntax == uid.JPEGLSLossless and JpegLs.available() else ""
    arr = pixel_array(ds, raw=True, decoding_plugin=plugin)
    multi = ds.get("NumberOfFrames") is not None and int(ds.NumberOfFrames) > 1
    return arr if multi else arr[np.newaxis]


def _decode_checked(data: bytes) -> tuple[Dataset, np.ndarray | None]:
    ds, _ = _read(data)
    try:
        has_pixels = "PixelData" in ds
        syntax = _syntax(ds)
    except Exception as err:  # noqa: BLE001 - pydicom converts the raw meta here
        raise BadInputError(dicom_scan.reason(err, "file meta")) from err
    if not has_pixels:
        return ds, None
    from sync.wire.limits import check_dimensions

    check_dimensions(ds)  # the header's size claims, before a byte is decoded: bombs are refused here
    if syntax not in NATIVE_SYNTAXES | LOSSLESS_COMPRESSED_SYNTAXES | LOSSY_SYNTAXES:
        raise UnsupportedTransferSyntaxError(f"unknown transfer syntax {syntax}")
    try:
        return ds, _frames(ds)
    except BadInputError:
        raise
    except NotImplementedError as err:
        raise UnsupportedTransferSyntaxError(f"no installed decoder for {syntax} ({type(err).__name__})") from err
    except Exception as err:  # codecs raise anything from RuntimeError to their own classes on a bad stream
        # The type only: a codec's or pydicom's message may quote an element value.
        raise BadInputError(f"pixel data does not decode ({type(err).__name__})") from err


def _uid_of(ds: Dataset, keyword: str) -> str:
    try:
        value = str(ds.get(keyword, "") or "").rstrip("\0 ")
    except Exception as err:  # noqa: BLE001 - a raw value pydicom cannot convert
        raise BadInputError(f"{keyword} cannot be read ({type(err).__name__})") from err
    if not _UID_RE.fullmatch(value) or len(value) > 64:
        raise BadInputError(f"{keyword} is missing or not a valid DICOM UID")
    return value


# PS3.5 9.1, as the box's ingest checks it: the hub files instances by these, so it must never take another form.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def decode_wire(data: bytes) -> Dataset:
    """Receiver side: parse a wire instance and prove every frame decodes; BadInputError when it does not.

    An instance without Pixel Data (a report, a KOS) is returned as parsed: there is nothing to decode. Its SOP
    Instance and Study Instance UIDs are checked: the hub files the instance by them.
    """
    ds = _decode_checked(data)[0]
    _uid_of(ds, "SOPInstanceUID")
    _uid_of(ds, "StudyInstanceUID")
    return ds


def pixels_equal(a: Dataset, b: Dataset) -> bool:
    """Bit-exact equality of the stored values of every frame (colour transforms of the codec undone)."""
    fa, fb = _frames(a), _frames(b)
    return fa.shape == fb.shape and bool(np.array_equal(fa, fb))


def _reencodable(ds: Dataset, syntax: str) -> str | None:
    """Why this instance must travel as is, or None when it may be re-encoded."""
    try:
        return _why_not_reencodable(ds, syntax)
    except Exception as err:  # noqa: BLE001 - a header value pydicom cannot convert: the bytes still travel
        return f"header not re-encodable ({type(err).__name__})"


def _why_not_reencodable(ds: Dataset, syntax: str) -> str | None:
    if "PixelData" not in ds:
        return "no Pixel Data"
    if syntax in LOSSY_SYNTAXES or str(ds.get("LossyImageCompression", "00")) == "01":
        return "already lossy"
    if syntax not in NATIVE_SYNTAXES | LOSSLESS_COMPRESSED_SYNTAXES:
        return f"unknown transfer syntax {syntax}"
    if int(ds.get("BitsAllocated", 0)) not in (8, 16):
        return f"Bits Allocated {ds.get('BitsAllocated')}"
    spp, pi = int(ds.get("SamplesPerPixel", 1)), str(ds.get("PhotometricInterpretation", ""))
    if (spp, pi) not in {(1, "MONOCHROME1"), (1, "MONOCHROME2"), (1, "PALETTE COLOR"), (3, "RGB")}:
        return f"photometric {pi} with {spp} samples"
    return None


def _container(frames: np.ndarray, info: FrameInfo) -> np.ndarray:
    # 8-bit values in a 16-bit container would make the codecs declare 16-bit precision and compress worse.
    if not frames.dtype.isnative:  # a big-endian source: the codecs read native words
        frames = frames.astype(frames.dtype.newbyteorder("="))
    if info.bits_stored <= 8 and frames.dtype.itemsize > 1:
        return frames.astype(np.int8 if info.signed else np.uint8)
    return frames


def _build(ds: Dataset, codec: Codec, encoded: list[bytes], info: FrameInfo) -> bytes:
    out = ds.copy()
    out.file_meta = ds.file_meta.copy()  # type: ignore[assignment]  # a FileMetaDataset's copy is one too
    out.file_meta.TransferSyntaxUID = codec.transfer_syntax_uid  # type: ignore[assignment]
    out.PixelData = encapsulate(encoded, has_bot=True)
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    out.PhotometricInterpretation = codec.photometric(info)
    if int(out.SamplesPerPixel) > 1:
        out.PlanarConfiguration = 0  # the codecs interleave; the tag must say so
    for tag in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if tag in out:
            del out[tag]
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, out, enforce_file_format=True)
    return buf.getvalue()


def _candidates(codecs: list[str] | None, pixel_bytes: int) -> list[str]:
    if codecs is not None:
        return list(codecs)
    chosen = list(DEFAULT_CODECS)
    if pixel_bytes <= SLOW_CODEC_MAX_BYTES:
        chosen += SMALL_IMAGE_CODECS
    return chosen


@dataclass
class _Source:
    """One instance being re-encoded: what every candidate codec is tried on and compared against."""

    ds: Dataset
    raw: bytes
    sop: str
    info: FrameInfo
    frames: np.ndarray
    source_frames: np.ndarray
    original: WireEncoding
    link: codec_policy.Link | None


def _attempt(src: _Source, spec: str, best: WireEncoding) -> WireEncoding:
    """`best`, or `spec`'s encoding of the source where it is smaller and decodes to the very same pixels."""
    ds, info, frames, source_frames, sop, link = src.ds, src.info, src.frames, src.source_frames, src.sop, src.link
    if link is not None and best is not src.original:
        verdict = codec_policy.worth_trying(spec, pixel_bytes=source_frames.nbytes, best_bytes=len(best.data),
                                            best_ratio=best.ratio, link=link)
        log.info("codec %s for %s at %.0f kB/s, %.0f s queued ahead: %s", spec, sop, link.bytes_per_s / 1e3,
                 link.backlog_s, verdict)
        if not verdict.try_it:
            return best
    codec = make_codec(spec)
    if not codec.available():
        log.info("codec %s not installed; skipped for %s", spec, sop)
        return best
    started = time.perf_counter()
    try:
        encoded = [codec.encode(f, info) for f in frames]
    except CodecUnsuitable as err:
        log.info("codec %s skipped for %s: %s", spec, sop, err)
        return best
    except Exception as err:
        log.warning("codec %s failed to encode %s: %s", spec, sop, err)
        return best
    if sum(map(len, encoded)) >= len(best.data):
        return best  # cannot win even before the header is added: skip the costly verification
    try:
        data = _build(ds, codec, encoded, info)
        ok = np.array_equal(_decode_checked(data)[1], source_frames)  # type: ignore[arg-type]  # None: False
    except Exception as err:
        log.warning("codec %s output for %s does not decode: %s", spec, sop, err)
        return best
    if not ok:
        log.warning("codec %s is not bit-exact on %s; discarded", spec, sop)
        return best
    codec_policy.SPEEDS.record(spec, source_frames.nbytes, time.perf_counter() - started)
    if len(data) < len(best.data):
        return WireEncoding(data, spec, codec.transfer_syntax_uid,  # type: ignore[arg-type]  # set on every codec
                            len(src.raw), len(src.raw) / len(data), True)
    return best


def encode_for_wire(
    source: bytes | str | Path, *, codecs: list[str] | None = None, frames_limit: int | None = None,
    link: codec_policy.Link | None = None,
) -> WireEncoding:
    """Return the smallest bit-exact lossless encoding of `source`, or the source itself.

    `codecs` names the candidates (see `make_codec`); None means the default policy above, or, given the `link` the
    instance will travel over, `codec_policy`'s: each candidate after the first only where it should shorten the
    delivery. `frames_limit` bounds the frames re-encoded: a longer cine loop travels as is rather than tie up the
    box's two cores.
    """
    ds, raw = _read(source)
    try:
        syntax = _syntax(ds)
        sop = str(ds.get("SOPInstanceUID", "?"))
    except Exception as err:  # noqa: BLE001 - pydicom converts the raw values here
        raise BadInputError(dicom_scan.reason(err, "file meta")) from err
    original = WireEncoding(raw, "original", syntax, len(raw), 1.0, True)
    reason = _reencodable(ds, syntax)
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1) if reason is None else 0
    except Exception as err:  # noqa: BLE001 - NaN, 1e400, a list: the instance travels as is
        reason = f"Number of Frames not readable ({type(err).__name__})"
    if reason is None and frames_limit is not None and n_frames > frames_limit:
        reason = f"{n_frames} frames > frames_limit {frames_limit}"
    if reason is not None:
        log.info("sending %s as is: %s", sop, reason)
        return original
    try:
        info = _info(ds)
        source_frames = _frames(ds)
    except Exception as err:  # a source we cannot decode is still sendable byte for byte
        log.warning("sending %s as is: its pixel data does not decode here (%s)", sop, type(err).__name__)
        return original
    frames = _container(source_frames, info)

    src = _Source(ds, raw, sop, info, frames, source_frames, original, link)
    best = original
    tried = _candidates(codecs, source_frames.nbytes if link is None else 0)
    for spec in tried:
        best = _attempt(src, spec, best)
    if codecs is None and best.ratio >= COMPRESSIBLE_RATIO and source_frames.nbytes <= COMPRESSIBLE_MAX_BYTES:
        for spec in SMALL_IMAGE_CODECS:
            if spec not in tried:
                best = _attempt(src, spec, best)
    log.info("%s: %s, ratio %.2f", sop, best.codec, best.ratio)
    return best


# The pieces sync.wire.transcode re-uses to make the hub's PACS copy (same reader, decoders and container rules).
read_dataset = _read
syntax_of = _syntax
decode_frames = _frames
codec_container = _container
build_encapsulated = _build


def check_dimensions(ds: Dataset) -> None:
    from sync.wire.limits import check_dimensions as check

    check(ds)
