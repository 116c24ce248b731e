"""What the worklist's own viewer needs of a stored instance: its display parameters and one frame's stored values
as little-endian bytes, decoded by the wire codecs (JPEG XL and JPEG 2000 included) and bounded in size."""
from __future__ import annotations

import numpy as np

from sync.core.errors import BadInputError
from sync.wire import codecs

MAX_SIDE = 4096  # the viewer is for a look at the image; the PACS' viewer is for a diagnostic read at full size


def _window(ds, frame: np.ndarray) -> tuple[float, float]:
    """The header's first window, else the 0.5-99.5 percentile range of the modality values."""
    try:
        wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
        if wc is not None and ww is not None:
            wc = float(wc[0] if hasattr(wc, "__len__") and not isinstance(wc, str) else wc)
            ww = float(ww[0] if hasattr(ww, "__len__") and not isinstance(ww, str) else ww)
            if ww > 0:
                return wc, ww
    except (TypeError, ValueError, IndexError):
        pass
    slope, intercept = _rescale(ds)
    lo, hi = np.percentile(frame.astype(np.float64) * slope + intercept, [0.5, 99.5])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def _rescale(ds) -> tuple[float, float]:
    try:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return 1.0, 0.0


def frame_for_viewer(data: bytes, index: int = 0) -> tuple[dict, bytes]:
    """(meta, pixels): meta has rows, columns, frames, samples, dtype ("uint8"/"uint16"/"int16"/...), step (the
    sub-sampling used to stay within MAX_SIDE), photometric, window centre/width and rescale; pixels are the frame's
    stored values, row-major, interleaved samples, little endian."""
    ds, _raw = codecs.read_dataset(data)
    if "PixelData" not in ds:
        raise BadInputError("this instance has no image")
    codecs.check_dimensions(ds)
    frames = codecs.decode_frames(ds)
    if not 0 <= index < len(frames):
        raise BadInputError(f"no frame {index}")
    frame = frames[index]
    step = max(1, -(-max(frame.shape[:2]) // MAX_SIDE))
    if step > 1:
        frame = frame[::step, ::step]
    frame = np.ascontiguousarray(frame)
    if frame.dtype.kind == "f" or frame.dtype.itemsize > 2:
        raise BadInputError(f"{frame.dtype} pixels are not shown here: open the study in the PACS")
    slope, intercept = _rescale(ds)
    samples = int(ds.get("SamplesPerPixel", 1))
    centre, width = _window(ds, frame) if samples == 1 else (127.5, 255.0)
    meta = {"rows": int(frame.shape[0]), "columns": int(frame.shape[1]), "frames": int(len(frames)),
            "samples": samples, "dtype": frame.dtype.name, "step": step,
            "photometric": str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
            "window_center": centre, "window_width": width, "slope": slope, "intercept": intercept}
    return meta, frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()
