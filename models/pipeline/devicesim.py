"""Device-like renderings of a training picture: what another CR/DX modality, and the box's decoder, make of it.

Two uses, one set of habits:
- `device_frame`: a cheap rendering at the size the box's decoder hands to preprocessing (`imaging.render` shrinks
  a radiograph to twice the model size), drawn afresh for every training step.
- `device_dataset`: a real DICOM instance at full detector resolution (928-1800 px), 8/12/16-bit, MONOCHROME1 or 2,
  with a window, a VOI LUT or neither, lossless or lossy compressed, which the device-like validation and test
  sets send through the box's own `imaging.render`.

What varies, and why: detector size and aspect (the copy we have was squashed to 224 px), the resampling kernel,
the look-up table a modality applies (gamma, window, clipping), detector noise and sharpness, collimation borders,
burned-in text, small rotations, lossy compression, and images with no window at all (the box then stretches to
percentiles).
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, generate_uid)

_WARP_KERNELS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4, cv2.INTER_AREA, cv2.INTER_NEAREST)
_WARP_P = (0.3, 0.3, 0.2, 0.15, 0.05)
_TEXT = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "12/03", "CR1", "DX", "x")


def _affine(h: int, w: int, out_h: int, out_w: int, rng: np.random.Generator, max_angle: float,
            flip: bool) -> np.ndarray:
    """src (h, w) -> dst (out_h, out_w): rotation, independent x/y scale, shift, optional mirror."""
    angle = rng.uniform(-max_angle, max_angle)
    zoom_x, zoom_y = rng.uniform(0.9, 1.12, 2)
    sx, sy = out_w / w * zoom_x, out_h / h * zoom_y
    rot = cv2.getRotationMatrix2D((0.0, 0.0), angle, 1.0)[:, :2]
    lin = rot @ np.diag([sx * (-1 if flip else 1), sy])
    centre_src = np.array([w / 2, h / 2])
    shift = rng.uniform(-0.06, 0.06, 2) * np.array([out_w, out_h])
    offset = np.array([out_w / 2, out_h / 2]) + shift - lin @ centre_src
    return np.hstack([lin, offset[:, None]]).astype(np.float64)


def _lut(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another modality's presentation: gamma, window placement (with clipping), contrast."""
    x = np.clip(x, 0.0, 1.0) ** rng.uniform(0.65, 1.55)
    lo, hi = rng.uniform(-0.1, 0.12), rng.uniform(0.85, 1.1)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _collimate(x: np.ndarray, rng: np.random.Generator) -> None:
    h, w = x.shape
    value = float(rng.choice([0.0, 1.0, rng.uniform(0.6, 0.95)]))
    top, bottom = (int(rng.uniform(0, 0.08) * h) for _ in range(2))
    left, right = (int(rng.uniform(0, 0.08) * w) for _ in range(2))
    x[:top] = value
    x[h - bottom:] = value
    x[:, :left] = value
    x[:, w - right:] = value


def _burn_text(x: np.ndarray, rng: np.random.Generator, value: float) -> None:
    h, w = x.shape
    mask = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only
    for _ in range(int(rng.integers(1, 4))):
        text = str(rng.choice(_TEXT))
        scale = min(h, w) / 224 * rng.uniform(0.3, 0.7)
        org = (int(rng.uniform(0.02, 0.7) * w), int(rng.choice([rng.uniform(0.06, 0.15), rng.uniform(0.88, 0.97)]) * h))
        cv2.putText(mask, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, round(scale * 2)), cv2.LINE_AA)
    alpha = mask.astype(np.float32) / np.float32(255.0)
    x *= 1.0 - alpha
    x += alpha * np.float32(value)


def _percentile_stretch(x: np.ndarray) -> np.ndarray:
    # What the box does with an image that carries no window (imaging._AUTO_WINDOW_PERCENTILES).
    lo, hi = np.percentile(x[::2, ::2], (0.5, 99.5))
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else x


def device_frame(src_u8: np.ndarray, rng: np.random.Generator, clean_p: float = 0.2) -> np.ndarray:
    """A float32 [0, 1] frame as `imaging.render` would hand it to preprocessing for another device's image."""
    src = src_u8.astype(np.float32) / np.float32(255.0)
    if rng.random() < clean_p:
        return src
    h, w = src.shape
    short = int(rng.choice([224, 256, 320, 448, 448, 512, 640]))
    aspect = rng.uniform(0.85, 1.35)  # height / width of the device image
    out_h, out_w = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    matrix = _affine(h, w, out_h, out_w, rng, 8.0, rng.random() < 0.2)
    kernel = int(rng.choice(_WARP_KERNELS, p=_WARP_P))
    border = cv2.BORDER_REPLICATE if rng.random() < 0.7 else cv2.BORDER_CONSTANT
    x = cv2.warpAffine(src, matrix, (out_w, out_h), flags=kernel, borderMode=border, borderValue=0.0)
    x = _lut(x, rng)
    r = rng.random()
    if r < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2) * short / 224)
    elif r < 0.5:
        blurred = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.8, 2.0))
        x = x + rng.uniform(0.3, 1.2) * (x - blurred)  # a detector's edge enhancement
    if rng.random() < 0.6:
        # Noise std as seen at model size; at the frame's size it is larger by the shrink factor.
        sigma = rng.uniform(0.003, 0.03) * max(short / 224, 1.0) ** 0.5
        noise = np.empty_like(x)
        cv2.randn(noise, 0.0, sigma)
        x = x + noise
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if rng.random() < 0.25:
        _collimate(x, rng)
    if rng.random() < 0.25:
        _burn_text(x, rng, float(rng.choice([0.0, 1.0])))
    if rng.random() < 0.25:
        x = _percentile_stretch(x)
    if rng.random() < 0.2:
        quality = int(rng.integers(35, 95))
        ok, buf = cv2.imencode(".jpg", (x * 255 + 0.5).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        x = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Full-resolution DICOM instances

CHAINS = ("window12", "voilut12", "nowindow16", "mono1_window12", "mono1_nowindow12", "display8")
SYNTAXES = ("explicit", "jpegls", "j2k_lossless", "j2k_lossy")
_SYNTAX_P = (0.35, 0.25, 0.15, 0.25)


def _full_resolution(src_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    src = src_u8.astype(np.float32) / np.float32(255.0)
    h, w = src.shape
    rows = int(rng.integers(928, 1801))
    cols = int(np.clip(rows / rng.uniform(1.0, 1.4), 800, 1800))
    matrix = _affine(h, w, rows, cols, rng, 4.0, False)
    x = cv2.warpAffine(src, matrix, (cols, rows), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    # A detector resolves finer detail than the 224 px copy holds: its quantum noise is fine-grained.
    noise = np.empty_like(x)
    cv2.randn(noise, 0.0, rng.uniform(0.005, 0.03))
    return np.clip(x + noise, 0.0, 1.0)


def device_dataset(src_u8: np.ndarray, rng: np.random.Generator, chain: str | None = None,
                   syntax: str | None = None) -> tuple[Dataset, dict]:
    """A CR instance a modality could send for this picture, read back from its encoded bytes, and its recipe."""
    chain = chain or str(rng.choice(CHAINS))
    syntax = syntax or str(rng.choice(SYNTAXES, p=_SYNTAX_P))
    if chain == "display8" and syntax == "j2k_lossy":
        syntax = "explicit"
    display = _full_resolution(src_u8, rng)
    if rng.random() < 0.3:
        _collimate(display, rng)
    if rng.random() < 0.3:
        _burn_text(display, rng, 1.0)
    gamma = rng.uniform(0.7, 1.4)
    ds = _base_dataset()
    if chain == "display8":
        stored, bits = np.round(display * 255).astype(np.uint16), 8
    else:
        bits = 16 if chain == "nowindow16" else 12
        top = 2 ** bits - 1
        lo, hi = rng.uniform(0.03, 0.15) * top, rng.uniform(0.8, 0.97) * top
        raw = lo + (hi - lo) * display ** (1.0 / gamma)  # detector values; the modality's LUT would undo gamma
        stored = np.round(raw).astype(np.uint16)
        if chain.startswith("mono1"):
            stored = (top - stored).astype(np.uint16)
        if chain in ("window12", "mono1_window12"):
            margin = (hi - lo) * rng.uniform(-0.05, 0.1)
            ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
            ds.WindowWidth = f"{hi - lo + 2 * margin:.1f}"
        elif chain == "voilut12":
            item = Dataset()
            entries = np.arange(top + 1, dtype=np.float64)
            lut = np.clip((entries - lo) / (hi - lo), 0, 1) ** gamma * top
            item.LUTDescriptor = [top + 1, 0, bits]
            item.LUTData = np.round(lut).astype("<u2").tobytes()
            ds.VOILUTSequence = [item]
    ds.PhotometricInterpretation = "MONOCHROME1" if chain.startswith("mono1") else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    pixels = stored.astype(np.uint8 if bits == 8 else np.uint16)
    if syntax == "explicit":
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = pixels.tobytes()
    elif syntax == "jpegls":
        ds.compress(JPEGLSLossless, pixels)
    elif syntax == "j2k_lossless":
        ds.compress(JPEG2000Lossless, pixels)
    else:
        ds.compress(JPEG2000, pixels, j2k_psnr=[float(rng.uniform(36, 46))])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    recipe = {"chain": chain, "syntax": syntax, "rows": int(ds.Rows), "columns": int(ds.Columns),
              "gamma": round(float(gamma), 3), "bytes": buffer.tell()}
    return pydicom.dcmread(io.BytesIO(buffer.getvalue())), recipe


def _base_dataset() -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    return ds
