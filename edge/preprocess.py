"""The one path from a rendered frame (box) or a training image (pipeline) to the tensor a manifest declares.

The box calls `model_input` on a frame `imaging.render` made from DICOM pixels; the model pipeline calls
`image_input` on a training file's 8-bit pixels. Both run `fit` -> `finish` -> `normalise` below, so what a model
sees in the clinic and what it saw in training differ only by what the device did to the picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from sync.core.errors import BadInputError, ModelError

# OpenCV kernels by the name a manifest uses. "area" is the only antialiasing one for shrinking.
KERNELS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
           "lanczos": cv2.INTER_LANCZOS4, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """The manifest's "input.preprocess" block; its absence means the 1.0/1.1 behaviour (area, float, no JPEG).

    `bits: 8` rounds the resized picture to 8-bit grey levels, and `jpeg_quality` then sends it through a baseline
    JPEG encode/decode at that quality: the training copy of the Kermany data is 224 px JPEG at quality 75, so a
    model trained on it has learnt that texture; giving every device image the same round trip at model size makes
    a full-resolution radiograph look to the model like the pictures it learnt from.
    """

    resample: str = "area"
    bits: int | None = None
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        if self.resample not in KERNELS:
            raise ModelError(f"input.preprocess.resample must be one of {', '.join(KERNELS)}, got {self.resample!r}")
        if self.bits not in (None, 8):
            raise ModelError(f"input.preprocess.bits must be 8 or absent, got {self.bits!r}")
        if self.jpeg_quality is not None:
            if self.bits != 8:
                raise ModelError("input.preprocess.jpeg_quality needs bits: 8 (JPEG round trips 8-bit pictures)")
            if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) \
                    or not 1 <= self.jpeg_quality <= 100:
                raise ModelError(f"input.preprocess.jpeg_quality must be an integer 1..100, got {self.jpeg_quality!r}")

    @classmethod
    def from_manifest(cls, d: object) -> Preprocess:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ModelError("input.preprocess must be an object")
        unknown = set(d) - {"resample", "bits", "jpeg_quality"}
        if unknown:
            raise ModelError(f"input.preprocess has unknown keys: {', '.join(sorted(unknown))}")
        return cls(resample=d.get("resample", "area"), bits=d.get("bits"), jpeg_quality=d.get("jpeg_quality"))

    def to_manifest(self) -> dict:
        out: dict = {"resample": self.resample}
        if self.bits is not None:
            out["bits"] = self.bits
        if self.jpeg_quality is not None:
            out["jpeg_quality"] = self.jpeg_quality
        return out


def fit(img: np.ndarray, height: int, width: int, resize: str, kernel: str) -> np.ndarray:
    """Resize to (height, width): "squash" ignores aspect (as the training copy did), "letterbox" pads with 0."""
    interpolation = KERNELS[kernel]
    if img.shape[:2] == (height, width):
        return img
    if resize == "squash":
        return cv2.resize(img, (width, height), interpolation=interpolation)
    scale = min(height / img.shape[0], width / img.shape[1])
    h, w = max(round(img.shape[0] * scale), 1), max(round(img.shape[1] * scale), 1)
    resized = cv2.resize(img, (w, h), interpolation=interpolation)
    out = np.zeros((height, width, *img.shape[2:]), img.dtype)
    top, left = (height - h) // 2, (width - w) // 2
    out[top:top + h, left:left + w] = resized
    return out


def to_u8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with round-half-up, so an 8-bit source (x / 255) comes back exactly."""
    return np.floor(np.clip(img, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def jpeg_round_trip(u8: np.ndarray, quality: int) -> np.ndarray:
    """Baseline JPEG encode + decode (libjpeg-turbo's integer DCT both ways: the same bytes on every CPU)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 0, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8), params)
    if not ok:
        raise BadInputError("JPEG round trip failed to encode")
    flags = cv2.IMREAD_GRAYSCALE if u8.ndim == 2 else cv2.IMREAD_COLOR
    out = cv2.imdecode(buf, flags)
    if out is None or out.shape != u8.shape:
        raise BadInputError("JPEG round trip failed to decode")
    if u8.ndim == 3:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return out


def prepare(frame: np.ndarray, shape: tuple[int, ...], colour: str, resize: str, pre: Preprocess) -> np.ndarray:
    """A [0, 1] float frame (HxW or HxWx3 RGB) at model size after resize, quantisation and any JPEG round trip.

    uint8 when `pre.bits` is 8, else float32 in [0, 1].
    """
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise ValueError(f"frame must be HxW or HxWx3, got shape {frame.shape}")
    img = frame.astype(np.float32, copy=False)
    if colour == "grey3" and img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    img = fit(img, shape[2], shape[3], resize, pre.resample)
    if pre.bits != 8:
        return img
    u8 = to_u8(img)
    return jpeg_round_trip(u8, pre.jpeg_quality) if pre.jpeg_quality else u8


def normalise(img: np.ndarray, mean, std) -> np.ndarray:
    """HxW (grey) or HxWx3 picture, uint8 or [0, 1] float -> (1, 3, H, W) float32: (x - mean) / std per channel."""
    x = img.astype(np.float32) / np.float32(255.0) if img.dtype == np.uint8 else img.astype(np.float32, copy=False)
    h, w = x.shape[:2]
    chw = np.broadcast_to(x, (3, h, w)) if x.ndim == 2 else x.transpose(2, 0, 1)
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    tensor = ((chw - m) / s)[np.newaxis]
    if not np.isfinite(tensor).all():
        raise BadInputError("image contains NaN or infinite values")
    return np.ascontiguousarray(tensor, dtype=np.float32)


def u8_to_frame(u8: np.ndarray) -> np.ndarray:
    """An 8-bit picture as the [0, 1] float frame `imaging.render` would make of it."""
    return u8.astype(np.float32) / np.float32(255.0)

