"""Turning one DICOM dataset into display-ready frames and model-ready tensors."""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space, get_decoder
from pydicom.uid import UID

from edge.errors import (
    BadInputError,
    ImageTooLargeError,
    ModelError,
    NoPixelDataError,
    UnsupportedTransferSyntaxError,
)

log = logging.getLogger(__name__)

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
_FRAME_POLICIES = ("middle", "first", "all")
# Percentiles used when a grey image carries no window: robust to burnt-in text and collimator edges.
_AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
# Decoder messages are about bytes and lengths, never element values, but cap them for quarantine logs.
_MAX_REASON = 300


@dataclass(frozen=True)
class InputSpec:
    """The manifest "input" block (docs/model-package.md): what tensor a model expects."""

    shape: tuple[int, int, int, int]
    colour: str = "grey3"
    resize: str = "squash"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    frames: str = "middle"

    def __post_init__(self) -> None:
        if len(self.shape) != 4 or self.shape[0] != 1 or self.shape[1] != 3 or min(self.shape[2:]) < 1:
            raise ModelError(f"input.shape must be [1, 3, H, W], got {list(self.shape)}")
        if self.colour not in ("grey3", "rgb"):
            raise ModelError(f"input.colour must be 'grey3' or 'rgb', got {self.colour!r}")
        if self.resize not in ("squash", "letterbox"):
            raise ModelError(f"input.resize must be 'squash' or 'letterbox', got {self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError("input.mean and input.std must have 3 values each")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(abs(s) for s in self.std) == 0:
            raise ModelError("input.mean and input.std must be finite and std non-zero")
        if self.frames not in _FRAME_POLICIES:
            raise ModelError(f"input.frames must be one of {', '.join(_FRAME_POLICIES)}, got {self.frames!r}")

    @classmethod
    def from_manifest(cls, d: dict) -> InputSpec:
        """Build from the manifest's "input" object; unknown keys are refused like any strict config."""
        unknown = set(d) - {"name", "shape", "colour", "resize", "mean", "std", "frames"}
        if unknown:
            raise ModelError(f"input block has unknown keys: {', '.join(sorted(unknown))}")
        if "shape" not in d:
            raise ModelError("input block has no 'shape'")
        try:
            kwargs: dict = {"shape": tuple(int(v) for v in d["shape"])}
            for key in ("mean", "std"):
                if key in d:
                    kwargs[key] = tuple(float(v) for v in d[key])
            for key in ("colour", "resize", "frames"):
                if key in d:
                    kwargs[key] = str(d[key])
        except (TypeError, ValueError) as err:
            raise ModelError(f"input block has a malformed value: {err}") from err
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Header checks


def _transfer_syntax(ds) -> UID:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        raise BadInputError("dataset has no Transfer Syntax UID in its file meta information")
    return UID(str(uid))


def _int_attr(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value in (None, ""):
        if default is None:
            raise BadInputError(f"image attribute {keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"image attribute {keyword} is not an integer") from err


def _number_of_frames(ds) -> int:
    return max(_int_attr(ds, "NumberOfFrames", 1), 1)


MAX_FRAMES = 10_000

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


def check_header(ds, max_pixels: int = 100_000_000) -> None:
    """Refuse what cannot or should not be decoded, without touching the pixel data.

    Pixel presence is checked last, so a caller holding a dataset read with `stop_before_pixels` learns that
    everything else passed when the only error is NoPixelDataError.
    """
    has_pixels = any(kw in ds for kw in _PIXEL_KEYWORDS)
    if not has_pixels and "Rows" not in ds and "Columns" not in ds:
        raise NoPixelDataError("dataset has no pixel data and no image attributes")
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    frames, samples = _number_of_frames(ds), _int_attr(ds, "SamplesPerPixel", 1)
    if rows <= 0 or cols <= 0 or samples not in (1, 3, 4):
        raise BadInputError(f"invalid image dimensions {rows}x{cols} with {samples} samples per pixel")
    # Per frame: a cine loop is only ever decoded a frame at a time, so its length is no memory risk;
    # a single absurd frame (a forged 60000x60000 claim) is.
    per_frame = rows * cols * samples
    if per_frame > max_pixels or frames > MAX_FRAMES:
        raise ImageTooLargeError(
            f"image of {rows}x{cols}x{samples} samples per frame ({per_frame} values), {frames} frames, exceeds the "
            f"limit of {max_pixels} values per frame and {MAX_FRAMES} frames"
        )
    uid = _transfer_syntax(ds)
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


# ---------------------------------------------------------------------------------------------------------------------
# Reduced-resolution JPEG 2000 decoding
#
# pylibjpeg-openjpeg (2.6) exposes no reduce option, but its extension module links OpenJPEG statically and exports
# the C API, so the decoder pydicom already uses can be driven through ctypes with opj_set_decoded_resolution_factor.
# Skipping the finest wavelet levels skips most of the entropy decoding: on RG1_J2KR (1955x1841, 15-bit) a reduce=2
# decode took ~42 ms against ~620 ms for the full image (OpenJPEG alone, shared 2-core dev box); HTJ2K
# (lossless, 5 levels) ~9 ms against ~130 ms.


class _OpjImageComp(ctypes.Structure):
    # opj_image_comp_t of OpenJPEG 2.5 (openjpeg.h); `bpp` is deprecated but still occupies its slot.
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd")),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _OpjImage(ctypes.Structure):
    # opj_image_t of OpenJPEG 2.5.
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_OpjImageComp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p)
_MSG_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)
_OPJ_CODEC_J2K = 0
_OPJ_STREAM_CHUNK = 1 << 20
# opj_dparameters_t is ~8.3 KB in OpenJPEG 2.5; a larger zeroed block keeps us independent of its exact layout.
_OPJ_DPARAMS_BYTES = 64 * 1024


@functools.cache
def _openjpeg_lib() -> ctypes.CDLL | None:
    """The OpenJPEG C API inside pylibjpeg-openjpeg's extension, loaded once; None where it cannot be used."""
    try:
        import _openjpeg  # pylibjpeg-openjpeg installs its extension as a top-level module

        lib = ctypes.CDLL(_openjpeg.__file__)
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        signatures = {
            "opj_stream_create": ([ctypes.c_size_t, c_int], vp),
            "opj_stream_set_read_function": ([vp, _READ_FN], None),
            "opj_stream_set_skip_function": ([vp, _SKIP_FN], None),
            "opj_stream_set_seek_function": ([vp, _SEEK_FN], None),
            "opj_stream_set_user_data": ([vp, vp, vp], None),
            "opj_stream_set_user_data_length": ([vp, ctypes.c_uint64], None),
            "opj_stream_destroy": ([vp], None),
            "opj_create_decompress": ([c_int], vp),
            "opj_destroy_codec": ([vp], None),
            "opj_set_error_handler": ([vp, _MSG_FN, vp], c_int),
            "opj_set_default_decoder_parameters": ([vp], None),
            "opj_setup_decoder": ([vp, vp], c_int),
            "opj_read_header": ([vp, vp, ctypes.POINTER(ctypes.POINTER(_OpjImage))], c_int),
            "opj_set_decoded_resolution_factor": ([vp, ctypes.c_uint32], c_int),
            "opj_decode": ([vp, vp, ctypes.POINTER(_OpjImage)], c_int),
            "opj_end_decompress": ([vp, vp], c_int),
            "opj_image_destroy": ([ctypes.POINTER(_OpjImage)], None),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        return lib
    except (ImportError, OSError, AttributeError) as err:
        log.info("reduced-resolution JPEG 2000 decoding unavailable (%s); decoding at full size", err)
        return None


def _j2k_decomposition_levels(codestream: bytes) -> int | None:
    """Smallest number of wavelet levels in the main header (COD and any COC), or None if not a raw codestream."""
    if codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    pos, levels, n_comps = 2, None, 1
    while pos + 4 <= len(codestream):
        marker = int.from_bytes(codestream[pos : pos + 2], "big")
        length = int.from_bytes(codestream[pos + 2 : pos + 4], "big")
        body = codestream[pos + 4 : pos + 2 + length]
        if marker == 0xFF51 and len(body) >= 36:
            n_comps = int.from_bytes(body[34:36], "big")
        elif marker == 0xFF52 and len(body) >= 6:
            levels = body[5] if levels is None else min(levels, body[5])
        elif marker == 0xFF53:
            offset = 2 if n_comps >= 257 else 1
            if len(body) > offset + 1:
                level = body[offset + 1]
                levels = level if levels is None else min(levels, level)
        elif marker == 0xFF90 or length < 2:
            break
        pos += 2 + length
    return levels


def _decode_j2k_reduced(codestream: bytes, factor: int) -> list[np.ndarray]:
    """Decode a raw JPEG 2000 / HTJ2K codestream at 1/2**factor of its size; one int32 array per component."""
    lib = _openjpeg_lib()
    if lib is None:
        raise RuntimeError("OpenJPEG C API not available")
    src = (ctypes.c_char * len(codestream)).from_buffer_copy(codestream)
    base, size, pos = ctypes.addressof(src), len(codestream), [0]
    errors: list[str] = []

    def _read(buf, n, _user):
        if pos[0] >= size:
            return ctypes.c_size_t(-1).value
        k = min(n, size - pos[0])
        ctypes.memmove(buf, base + pos[0], k)
        pos[0] += k
        return k

    def _skip(n, _user):
        new = min(max(pos[0] + n, 0), size)
        skipped, pos[0] = new - pos[0], new
        return skipped

    def _seek(n, _user):
        if not 0 <= n <= size:
            return 0
        pos[0] = n
        return 1

    # The CFUNCTYPE objects must outlive every C call that may invoke them, hence the locals.
    read_cb, skip_cb, seek_cb = _READ_FN(_read), _SKIP_FN(_skip), _SEEK_FN(_seek)
    error_cb = _MSG_FN(lambda msg, _user: errors.append(msg.decode(errors="replace").strip()))
    stream = lib.opj_stream_create(_OPJ_STREAM_CHUNK, 1)
    codec = lib.opj_create_decompress(_OPJ_CODEC_J2K)
    image = ctypes.POINTER(_OpjImage)()
    try:
        lib.opj_stream_set_read_function(stream, read_cb)
        lib.opj_stream_set_skip_function(stream, skip_cb)
        lib.opj_stream_set_seek_function(stream, seek_cb)
        lib.opj_stream_set_user_data(stream, None, None)
        lib.opj_stream_set_user_data_length(stream, size)
        lib.opj_set_error_handler(codec, error_cb, None)
        params = ctypes.create_string_buffer(_OPJ_DPARAMS_BYTES)
        lib.opj_set_default_decoder_parameters(params)
        ok = (
            lib.opj_setup_decoder(codec, params)
            and lib.opj_read_header(stream, codec, ctypes.byref(image))
            and lib.opj_set_decoded_resolution_factor(codec, factor)
            and lib.opj_decode(codec, stream, image)
            and lib.opj_end_decompress(codec, stream)
        )
        if not ok:
            raise RuntimeError("; ".join(errors) or "OpenJPEG refused the codestream")
        img = image.contents
        planes = []
        for i in range(img.numcomps):
            comp = img.comps[i]
            if comp.factor != factor or not comp.data:
                raise RuntimeError("OpenJPEG did not decode at the requested resolution")
            plane = np.ctypeslib.as_array(comp.data, shape=(comp.h, comp.w)).copy()
            planes.append((plane, comp.prec, bool(comp.sgnd)))
        return planes
    finally:
        if image:
            lib.opj_image_destroy(image)
        lib.opj_destroy_codec(codec)
        lib.opj_stream_destroy(stream)


def _reduce_factor(ds, uid: UID, min_side: int | None) -> int:
    """Largest N with min(Rows, Columns) / 2**N >= 2 * min_side, for JPEG 2000 syntaxes whose output we can mirror."""
    if min_side is None or min_side <= 0 or uid not in _J2K_SYNTAXES:
        return 0
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    # Other colour models would need pydicom's post-decode conversions; they are rare enough to decode in full.
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_ICT", "YBR_RCT"):
        return 0
    smallest = min(int(ds.Rows), int(ds.Columns))
    return max(int(math.floor(math.log2(smallest / (2 * min_side)))), 0) if smallest >= 4 * min_side else 0


def _reduced_frame(ds, codestream: bytes, factor: int) -> tuple[np.ndarray, str] | None:
    """The frame at reduced resolution, or None when the reduced path cannot mirror pydicom's full decode."""
    levels = _j2k_decomposition_levels(codestream)
    if not levels:
        return None
    factor = min(factor, levels)
    try:
        planes = _decode_j2k_reduced(codestream, factor)
    except RuntimeError as err:
        log.debug("reduced JPEG 2000 decode failed (%s); decoding at full size", err)
        return None
    bits, signed = _int_attr(ds, "BitsStored", 0), bool(_int_attr(ds, "PixelRepresentation", 0))
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    # A codestream that disagrees with the header gets pydicom's reconciliation rules, not ours.
    if len(planes) != samples or any(prec != bits or sgnd != signed for _, prec, sgnd in planes):
        return None
    if samples == 1:
        return planes[0][0], str(ds.PhotometricInterpretation).strip()
    # OpenJPEG applies the inverse RCT/ICT itself, as pydicom's full decode does, so the planes are already RGB.
    return np.dstack([p for p, _, _ in planes]), "RGB"


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def _reason(err: BaseException) -> str:
    # pydicom puts each plugin's own error on a line of its own; keep them all, on one line.
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:_MAX_REASON]}" if text else type(err).__name__


def _frame_indices(policy: str, n_frames: int) -> list[int]:
    if policy == "first":
        return [0]
    if policy == "middle":
        return [n_frames // 2]
    return list(range(n_frames))


def _decode(ds, uid: UID, indices: list[int], min_side: int | None) -> Iterator[tuple[int, np.ndarray, str]]:
    """Yield (index, raw array, photometric after decoding) for just the frames asked for, in index order."""
    n_frames = _number_of_frames(ds)
    factor = _reduce_factor(ds, uid, min_side)
    decoder = get_decoder(uid)
    try:
        if factor and len(indices) == n_frames > 1:
            codestreams = enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames))
        elif factor:
            codestreams = ((i, get_frame(ds.PixelData, i, number_of_frames=n_frames)) for i in indices)
        else:
            codestreams = iter(())
        for index, codestream in codestreams:
            reduced = _reduced_frame(ds, codestream, factor)
            if reduced is None:
                break
            yield index, reduced[0], reduced[1]
            indices = [i for i in indices if i != index]
        if not indices:
            return
        # pydicom 3's as_array/iter_array decode only the frames asked for; as_rgb converts YBR_FULL(_422) once,
        # and reports RGB where the codec (JPEG baseline, JPEG 2000 MCT) already did it, so we never convert twice.
        if len(indices) == n_frames > 1:
            for index, (arr, meta) in enumerate(decoder.iter_array(ds, as_rgb=True)):
                yield index, arr, meta["photometric_interpretation"]
        else:
            for index in indices:
                arr, meta = decoder.as_array(ds, index=index, as_rgb=True)
                yield index, arr, meta["photometric_interpretation"]
    except BadInputError:
        raise
    except Exception as err:  # third-party codecs raise anything from ValueError to RuntimeError to struct.error
        raise BadInputError(f"pixel data could not be decoded ({uid.name}): {_reason(err)}") from err


# ---------------------------------------------------------------------------------------------------------------------
# Display transforms


def _frame_item(ds, index: int, sequence: str):
    """The functional-group item holding `sequence` for a frame of an enhanced object, else the dataset itself."""
    for groups_kw, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups and len(groups) > i and groups[i].get(sequence):
            return groups[i].get(sequence)[0]
    return ds


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _target_size(shape: tuple[int, ...], min_side: int | None) -> tuple[int, int] | None:
    """(width, height) so that the smaller side is 2 * min_side, or None when the frame is already small enough."""
    h, w = shape[:2]
    # Below 3x the resize costs more than the per-pixel work it saves (US1 480x640: 5.5 ms shrunk vs 2.7 ms not).
    if not min_side or min(h, w) < 3 * min_side:
        return None
    scale = 2 * min_side / min(h, w)
    return max(round(w * scale), 1), max(round(h * scale), 1)


def _shrink(img: np.ndarray, min_side: int | None) -> np.ndarray:
    size = _target_size(img.shape, min_side)
    return img if size is None else cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        y = (x - centre) / width + 0.5
    else:
        y = (x - (centre - 0.5)) / (width - 1.0) + 0.5
    return np.clip(y, 0.0, 1.0, out=y)


def _grey(ds, arr: np.ndarray, index: int, photometric: str, min_side: int | None) -> np.ndarray:
    pixel_item = _frame_item(ds, index, "PixelValueTransformationSequence")
    voi_item = _frame_item(ds, index, "FrameVOILUTSequence")
    if "ModalityLUTSequence" in ds:
        arr = apply_modality_lut(arr, ds)
    has_voi_lut = "VOILUTSequence" in ds
    if has_voi_lut:
        # A LUT indexes by stored value, so it must see full-resolution integers before any averaging.
        arr = apply_voi(arr, ds, index=0)
    # Windowing and rescale are pointwise, so shrinking first changes the result only at pixels whose neighbourhood
    # straddles a window edge (invisible at model resolution) and cuts the float work on a chest CR ~20-fold.
    # INTER_AREA on uint16/int16 rounds the average to an integer: <= 0.5 stored units, far below any window width.
    if arr.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
        arr = arr.astype(np.float32)
    x = _shrink(arr, min_side).astype(np.float32, copy=False)
    if has_voi_lut:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        y = x / float(2**bits - 1)
    else:
        if "ModalityLUTSequence" not in ds:
            slope = _first(pixel_item.get("RescaleSlope")) or 1.0
            intercept = _first(pixel_item.get("RescaleIntercept")) or 0.0
            if slope != 1.0 or intercept != 0.0:
                x = x * np.float32(slope) + np.float32(intercept)
        if not np.isfinite(x).all():
            raise BadInputError("pixel data contains NaN or infinite values")
        centre, width = _first(voi_item.get("WindowCenter")), _first(voi_item.get("WindowWidth"))
        function = str(voi_item.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if centre is not None and width is not None and width >= (1.0 if function == "LINEAR" else 1e-6):
            y = _window(x, centre, width, function)
        else:
            step = max(min(x.shape) // 512, 1)  # a strided sample is plenty for two percentiles
            lo, hi = np.percentile(x[::step, ::step], _AUTO_WINDOW_PERCENTILES)
            y = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float32, copy=False)


def _palette_source(ds, uid: UID):
    """`ds`, or a copy of its palette whose OW tables are little endian: pydicom 3.0 reads unsegmented tables
    in native order, so Big Endian files would otherwise come out as near-black byte-swapped colours."""
    if uid.is_little_endian or "RedPaletteColorLookupTableData" not in ds:
        return ds
    palette = Dataset()
    for colour in ("Red", "Green", "Blue", "Alpha"):
        desc, data = f"{colour}PaletteColorLookupTableDescriptor", f"{colour}PaletteColorLookupTableData"
        if desc in ds:
            setattr(palette, desc, ds[desc].value)
        if data in ds:
            raw = bytes(ds[data].value)
            n_entries = (int(ds[desc].value[0]) or 2**16) if desc in ds else 0
            if len(raw) == 2 * n_entries:
                raw = np.frombuffer(raw, ">u2").astype("<u2").tobytes()
            setattr(palette, data, raw)
    return palette


def _colour(ds, uid: UID, arr: np.ndarray, photometric: str, min_side: int | None) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        # Palette indices are labels, not intensities: look them up at full resolution, shrink the RGB result.
        rgb = apply_color_lut(arr, _palette_source(ds, uid))
        scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
    else:
        if photometric.startswith("YBR_FULL"):
            arr = convert_color_space(arr, photometric, "RGB")
        elif photometric != "RGB":
            raise BadInputError(f"photometric interpretation {photometric} is not supported")
        rgb = arr[..., :3]
        scale = float(2 ** _int_attr(ds, "BitsStored", 8 * arr.dtype.itemsize) - 1)
    if rgb.dtype not in (np.uint8, np.uint16, np.float32):
        rgb = rgb.astype(np.float32)
    out = _shrink(np.ascontiguousarray(rgb), min_side).astype(np.float32) / np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out)


def render(
    ds, *, min_side: int | None = None, frames: str = "middle", max_pixels: int = 100_000_000
) -> list[np.ndarray]:
    """Display-ready frames: float32 in [0, 1], HxW (bright = dense) or HxWx3 RGB.

    With `min_side`, frames are shrunk (and JPEG 2000 decoded at a reduced level) so their smaller side is no
    less than 2 * min_side; without it they come back at full resolution.
    """
    if frames not in _FRAME_POLICIES:
        raise ValueError(f"frames must be one of {_FRAME_POLICIES}, got {frames!r}")
    check_header(ds, max_pixels)
    uid = _transfer_syntax(ds)
    indices = _frame_indices(frames, _number_of_frames(ds))
    out = []
    # Frames arrive in index order and are rendered one by one, so "all" never holds every full-size frame at once.
    for index, arr, photometric in _decode(ds, uid, indices, min_side):
        photometric = str(photometric).strip().upper()
        if arr.ndim == 2 and photometric != "PALETTE COLOR":
            if photometric not in ("MONOCHROME1", "MONOCHROME2"):
                raise BadInputError(f"single-sample photometric interpretation {photometric} is not supported")
            img = _grey(ds, arr, index, photometric, min_side)
        elif arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
            img = _colour(ds, uid, arr, photometric, min_side)
        else:
            raise BadInputError(f"decoded frame has an unexpected shape {arr.shape}")
        if not np.isfinite(img).all():
            raise BadInputError("rendered image contains NaN or infinite values")
        out.append(img)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tensors and previews


def to_tensor(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A rendered frame as the (1, 3, H, W) float32 C-contiguous tensor the model's manifest describes."""
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise ValueError(f"frame must be HxW or HxWx3, got shape {frame.shape}")
    img = frame.astype(np.float32, copy=False)
    if spec.colour == "grey3" and img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    height, width = spec.shape[2], spec.shape[3]
    if spec.resize == "squash":
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    else:
        scale = min(height / img.shape[0], width / img.shape[1])
        h, w = max(round(img.shape[0] * scale), 1), max(round(img.shape[1] * scale), 1)
        resized = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        img = np.zeros((height, width, *img.shape[2:]), np.float32)
        top, left = (height - h) // 2, (width - w) // 2
        img[top : top + h, left : left + w] = resized
    chw = np.broadcast_to(img, (3, height, width)) if img.ndim == 2 else img.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(3, 1, 1)
    tensor = ((chw - mean) / std)[np.newaxis]
    if not np.isfinite(tensor).all():
        raise BadInputError("image contains NaN or infinite values")
    return np.ascontiguousarray(tensor, dtype=np.float32)


def thumbnail(frame: np.ndarray, max_side: int = 512) -> np.ndarray:
    """A uint8 grey or RGB preview no larger than max_side on its longer side."""
    h, w = frame.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(round(w * scale), 1), max(round(h * scale), 1))
        frame = cv2.resize(frame.astype(np.float32, copy=False), size, interpolation=cv2.INTER_AREA)
    return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
