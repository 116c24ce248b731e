"""Turning one DICOM dataset into display-ready frames and model-ready tensors."""
from __future__ import annotations

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

from sync.core.errors import BadInputError, ModelError
from sync.wire import dicom_scan, j2k_guard
from sync.wire.limits import _J2K_SYNTAXES, check_codestreams, check_header, int_attr, number_of_frames, transfer_syntax
from edge.j2k_reduced import decode_reduced as _decode_j2k_reduced
from edge.j2k_reduced import decomposition_levels as _j2k_decomposition_levels
from edge.preprocess import Preprocess, normalise, prepare

log = logging.getLogger(__name__)
j2k_guard.install()  # before any JPEG 2000 decode: pydicom's own JP2 box walk can loop forever

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
    preprocess: Preprocess = Preprocess()

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
        unknown = set(d) - {"name", "shape", "colour", "resize", "mean", "std", "frames", "preprocess"}
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
            kwargs["preprocess"] = Preprocess.from_manifest(d.get("preprocess"))
        except (TypeError, ValueError) as err:
            raise ModelError(f"input block has a malformed value: {err}") from err
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Header checks


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
    bits, signed = int_attr(ds, "BitsStored", 0), bool(int_attr(ds, "PixelRepresentation", 0))
    samples = int_attr(ds, "SamplesPerPixel", 1)
    # A codestream that disagrees with the header gets pydicom's reconciliation rules, not ours.
    if len(planes) != samples or any(prec != bits or sgnd != signed for _, prec, sgnd in planes):
        return None
    if samples == 1:
        return planes[0][0], str(ds.PhotometricInterpretation).strip()
    # OpenJPEG applies the inverse RCT/ICT itself, as pydicom's full decode does, so the planes are already RGB.
    return np.dstack([p for p, _, _ in planes]), "RGB"


# ---------------------------------------------------------------------------------------------------------------------
# Codestreams, checked before any decode (box triage, box uploader, hub)
# A codec allocates what the codestream's own header claims, whatever the DICOM header said, and CharLS spends ~3 s
# on a 64x64 JPEG-LS frame cut short (found by scripts/fuzz.py; 10,000 such frames would hold a thread for hours).
# So each frame must start with its format's marker, claim no more samples than the header, and end with EOI/EOC.

def _reason(err: BaseException) -> str:
    # pydicom puts each plugin's own error on a line of its own; keep them all, on one line, without the values
    # they quote (pydicom's "Unknown (0028,0004) 'Photometric Interpretation' value '...'" quotes the header).
    text = dicom_scan.redact(" ".join(str(err).split()))
    return f"{type(err).__name__}: {text[:_MAX_REASON]}" if text else type(err).__name__


def _frame_indices(policy: str, n_frames: int) -> list[int]:
    if policy == "first":
        return [0]
    if policy == "middle":
        return [n_frames // 2]
    return list(range(n_frames))


def _decode(ds, uid: UID, indices: list[int], min_side: int | None) -> Iterator[tuple[int, np.ndarray, str]]:
    """Yield (index, raw array, photometric after decoding) for just the frames asked for, in index order."""
    n_frames = number_of_frames(ds)
    try:
        check_codestreams(ds, uid, None if len(indices) == n_frames else indices)
    except BadInputError as err:
        raise type(err)(f"pixel data could not be decoded ({uid.name}): {err}") from err
    try:
        factor = _reduce_factor(ds, uid, min_side)
        decoder = get_decoder(uid)
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
        elif _display_ready(ds, arr):
            # 8 bits or fewer, no rescale, no window: the modality already made a picture for display (the way
            # the training images were stored); stretching it to percentiles would change its contrast.
            y = np.clip(x / np.float32(2 ** int_attr(ds, "BitsStored", 8) - 1), 0.0, 1.0)
        else:
            step = max(min(x.shape) // 512, 1)  # a strided sample is plenty for two percentiles
            lo, hi = np.percentile(x[::step, ::step], _AUTO_WINDOW_PERCENTILES)
            y = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return y.astype(np.float32, copy=False)


def _display_ready(ds, arr: np.ndarray) -> bool:
    bits = int_attr(ds, "BitsStored", 8 * arr.dtype.itemsize)
    slope = _first(ds.get("RescaleSlope"))
    intercept = _first(ds.get("RescaleIntercept"))
    return (1 <= bits <= 8 and not int_attr(ds, "PixelRepresentation", 0) and slope in (None, 1.0)
            and intercept in (None, 0.0) and "ModalityLUTSequence" not in ds)


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
        scale = float(2 ** int_attr(ds, "BitsStored", 8 * arr.dtype.itemsize) - 1)
    if rgb.dtype not in (np.uint8, np.uint16, np.float32):
        rgb = rgb.astype(np.float32)
    out = _shrink(np.ascontiguousarray(rgb), min_side).astype(np.float32) / np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out)


def _display(ds, uid: UID, arr: np.ndarray, index: int, photometric: str, min_side: int | None) -> np.ndarray:
    if arr.ndim == 2 and photometric != "PALETTE COLOR":
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise BadInputError(f"single-sample photometric interpretation {photometric} is not supported")
        return _grey(ds, arr, index, photometric, min_side)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return _colour(ds, uid, arr, photometric, min_side)
    raise BadInputError(f"decoded frame has an unexpected shape {arr.shape}")


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
    uid = transfer_syntax(ds)
    indices = _frame_indices(frames, number_of_frames(ds))
    out = []
    # Frames arrive in index order and are rendered one by one, so "all" never holds every full-size frame at once.
    for index, arr, photometric in _decode(ds, uid, indices, min_side):
        photometric = str(photometric).strip().upper()
        try:
            img = _display(ds, uid, arr, index, photometric, min_side)
        except BadInputError:
            raise
        except Exception as err:  # noqa: BLE001 - a malformed palette, VOI or modality LUT is the file's fault
            raise BadInputError(f"pixel transform failed ({photometric}): {_reason(err)}") from err
        if not np.isfinite(img).all():
            raise BadInputError("rendered image contains NaN or infinite values")
        out.append(img)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tensors and previews


def to_tensor(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A rendered frame as the (1, 3, H, W) float32 C-contiguous tensor the model's manifest describes.

    The same `edge.preprocess` steps the model pipeline runs on its training images (see `model_picture`).
    """
    return normalise(model_picture(frame, spec), spec.mean, spec.std)


def model_picture(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The picture at model size, before normalisation: uint8 for a package that declares 8 bits, else float."""
    return prepare(frame, spec.shape, spec.colour, spec.resize, spec.preprocess)


def thumbnail(frame: np.ndarray, max_side: int = 512) -> np.ndarray:
    """A uint8 grey or RGB preview no larger than max_side on its longer side."""
    h, w = frame.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(round(w * scale), 1), max(round(h * scale), 1))
        frame = cv2.resize(frame.astype(np.float32, copy=False), size, interpolation=cv2.INTER_AREA)
    return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
