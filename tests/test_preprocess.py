"""One preprocessing for box and pipeline: the manifest's input.preprocess block, the same tensor both ways."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sync.core.errors import ModelError
from edge.imaging import InputSpec, model_picture, render, to_tensor
from edge.preprocess import Preprocess, jpeg_round_trip, to_u8

KERMANY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cxr-pneumonia-kermany"
DECLARED = {"name": "input", "shape": [1, 3, 224, 224], "colour": "grey3", "resize": "squash",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "frames": "middle",
            "preprocess": {"resample": "area", "bits": 8, "jpeg_quality": 75}}


def _training_picture(tmp_path: Path) -> Path:
    """A Kermany training JPEG when the shared data is here, else a chest-like picture saved the same way."""
    if KERMANY.is_dir():
        return sorted((KERMANY / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    yy, xx = np.mgrid[0:224, 0:224]
    picture = (128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + (xx - 112) * 0.3).clip(0, 255).astype(np.uint8)
    path = tmp_path / "picture.jpeg"
    cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 75])
    return path


def _as_cr(grey_u8: np.ndarray) -> pydicom.Dataset:
    """The picture as an 8-bit MONOCHROME2 CR with no window, written and read back as a modality would send it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = grey_u8.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = grey_u8.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_training_picture_gives_the_same_tensor_in_the_pipeline_and_through_the_box(tmp_path):
    from models.pipeline.data import box_input, read_grey

    path = _training_picture(tmp_path)
    spec = InputSpec.from_manifest(DECLARED)
    pipeline = box_input(str(path), 224, DECLARED["mean"], DECLARED["std"], spec.preprocess)
    (frame,) = render(_as_cr(read_grey(str(path))), min_side=224)
    box = to_tensor(frame, spec)
    assert box.shape == pipeline.shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(box, pipeline)
    # A quality-75 training copy is (nearly) a fixed point of the quality-75 round trip: the box changes it little.
    plain = to_tensor(frame, InputSpec.from_manifest({k: v for k, v in DECLARED.items() if k != "preprocess"}))
    assert np.abs(box - plain).mean() < 0.02


def test_training_step_pictures_come_from_the_box_preprocessing(tmp_path):
    pytest.importorskip("torch", reason="the model pipeline's extra (train) is not installed")
    from models.pipeline.data import load_images, read_grey
    from models.pipeline.train import render_device_like

    path = _training_picture(tmp_path)
    pre = Preprocess.from_manifest(DECLARED["preprocess"])
    (loaded,) = load_images([str(path)], 224, pre)
    np.testing.assert_array_equal(loaded, model_picture(read_grey(str(path)) / np.float32(255), InputSpec.from_manifest(DECLARED)))
    # A device-like draw that happens to be clean is exactly the box picture as well.
    drawn = render_device_like(read_grey(str(path))[None], np.random.default_rng(0), 224, pre)
    assert drawn.shape == (1, 224, 224) and drawn.dtype == np.uint8


def test_package_without_a_preprocess_block_keeps_the_float_area_path():
    frame = np.linspace(0.0, 1.0, 700 * 500, dtype=np.float32).reshape(700, 500) ** 2
    spec = InputSpec.from_manifest({k: v for k, v in DECLARED.items() if k != "preprocess"})
    assert spec.preprocess == Preprocess()
    expected = cv2.resize(frame, (224, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(to_tensor(frame, spec)[0, 0], (expected - 0.5) / 0.5, atol=1e-6)


def test_full_resolution_frame_gets_the_training_copy_texture():
    rng = np.random.default_rng(1)
    frame = cv2.GaussianBlur(rng.random((1400, 1100), dtype=np.float32), (0, 0), 6)
    frame = (frame - frame.min()) / (frame.max() - frame.min())
    picture = model_picture(frame, InputSpec.from_manifest(DECLARED))
    resized = to_u8(cv2.resize(frame, (224, 224), interpolation=cv2.INTER_AREA))
    assert picture.dtype == np.uint8 and picture.shape == (224, 224)
    np.testing.assert_array_equal(picture, jpeg_round_trip(resized, 75))


def test_jpeg_round_trip_gives_the_same_bytes_every_time():
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    first = jpeg_round_trip(u8, 75)
    assert all(np.array_equal(first, jpeg_round_trip(u8.copy(), 75)) for _ in range(3))


@pytest.mark.parametrize("block, message", [
    ({"resample": "bicubic"}, "resample"),
    ({"bits": 12}, "bits"),
    ({"jpeg_quality": 75}, "needs bits"),
    ({"bits": 8, "jpeg_quality": 0}, "1..100"),
    ({"bits": 8, "jpeg_quality": True}, "1..100"),
    ({"bits": 8, "colour_space": "srgb"}, "unknown keys"),
    ("area", "must be an object"),
])
def test_malformed_preprocess_blocks_are_refused(block, message):
    with pytest.raises(ModelError, match=message):
        InputSpec.from_manifest(dict(DECLARED, preprocess=block))


def test_eight_bit_image_without_window_is_shown_as_stored_not_stretched():
    grey = np.full((300, 300), 100, np.uint8)
    grey[100:200, 100:200] = 180
    (frame,) = render(_as_cr(grey))
    assert np.isclose(frame.min(), 100 / 255) and np.isclose(frame.max(), 180 / 255)
