"""Tests for edge.imaging on real DICOM files from pydicom, pydicom-data and deid-data.

Timings measured on the 2-core dev box (median of 10, render(min_side=224) + to_tensor at 224x224), kept here
as notes rather than assertions because the box is shared:
  RG1_UNCR 16-17 ms; RG1_J2KR reduced (factor 2) 60-85 ms vs full 800-1060 ms; US1_UNCR 3-7 ms.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames, get_frame
from pydicom.pixels import pixel_array

from sync.core.errors import (
    BadInputError,
    ImageTooLargeError,
    ModelError,
    NoPixelDataError,
    UnsupportedTransferSyntaxError,
)
from edge.imaging import InputSpec, _decode_j2k_reduced, check_header, render, thumbnail, to_tensor

SPEC = InputSpec(shape=(1, 3, 224, 224))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample(name: str) -> Path:
    """A sample file by name from pydicom-data, deid-data or pydicom's own test files; skip if none has it."""
    data_store = _package_dir("data_store")
    if data_store is not None and (data_store / "data" / name).is_file():
        return data_store / "data" / name
    deid = _package_dir("deid_data")
    if deid is not None and (deid / "data" / name).is_file():
        return deid / "data" / name
    # download=False: pydicom otherwise tries the network for names it does not ship, and hangs offline.
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"sample {name} not installed (pip install pydicom-data deid-data)")
    return Path(found)


def read(name: str, **kwargs) -> pydicom.Dataset:
    return pydicom.dcmread(sample(name), **kwargs)


def tensor(name: str, min_side: int | None = 224) -> np.ndarray:
    return to_tensor(render(read(name), min_side=min_side)[0], SPEC)


# ---------------------------------------------------------------------------------------------------------------------
# Greyscale display pipeline


def test_monochrome1_chest_cr_is_inverted_so_lungs_are_dark():
    ds = read("RG1_UNCR.dcm")
    (frame,) = render(ds)
    raw = ds.pixel_array.astype(np.float64)
    assert frame.shape == raw.shape and frame.dtype == np.float32
    assert 0.0 <= frame.min() and frame.max() <= 1.0
    assert np.corrcoef(frame.ravel(), raw.ravel())[0, 1] < -0.9
    h, w = frame.shape
    mediastinum = frame[h // 3 : 2 * h // 3, w // 2 - w // 20 : w // 2 + w // 20].mean()
    right_lung = frame[h // 3 : 2 * h // 3, w // 5 : w // 3].mean()
    assert mediastinum > right_lung + 0.05


def test_window_from_header_is_applied_to_cr_with_narrow_window():
    ds = read("RG3_UNCR.dcm")  # WC 550 / WW 1024 over 10-bit data, MONOCHROME1
    (frame,) = render(ds)
    raw = ds.pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((raw - (550 - 0.5)) / (1024 - 1) + 0.5, 0.0, 1.0)
    assert np.abs(frame - expected).max() < 1e-5


def test_image_without_window_is_scaled_by_robust_percentiles():
    ds = read("MR_small.dcm")
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    (frame,) = render(ds)
    assert frame.min() == 0.0 and frame.max() == 1.0
    assert 0.0 < np.mean(frame == 1.0) < 0.02


def test_ct_rescale_slope_and_intercept_give_hounsfield_window():
    ds = read("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    (frame,) = render(ds)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((hu - 39.5) / 399.0 + 0.5, 0.0, 1.0)
    assert np.abs(frame - expected).max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Same image, different transfer syntaxes


@pytest.mark.parametrize("stem", ["RG1", "RG3", "US1"])
def test_lossless_jpeg2000_renders_identically_to_uncompressed(stem):
    (uncompressed,) = render(read(f"{stem}_UNCR.dcm"))
    (j2k,) = render(read(f"{stem}_J2KR.dcm"))
    assert uncompressed.shape == j2k.shape
    assert np.abs(uncompressed - j2k).max() < 1e-6


@pytest.mark.parametrize("stem", ["RG1", "RG3", "US1"])
def test_lossy_jpeg2000_tensor_is_close_to_uncompressed(stem):
    diff = np.abs(tensor(f"{stem}_UNCR.dcm") - tensor(f"{stem}_J2KI.dcm"))
    assert diff.mean() < 0.02 and diff.max() < 0.5


def test_jpeg_baseline_ybr_422_renders_rgb_close_to_dcmtk_decompression():
    (jpeg,) = render(read("SC_rgb_dcmtk_+eb+cy+s2.dcm"))
    (reference,) = render(read("SC_rgb_dcmtk_ebcys2_dcmd.dcm"))
    assert jpeg.shape == reference.shape == (100, 100, 3)
    assert np.abs(jpeg - reference).mean() < 0.01
    # The first colour band of SC_rgb is pure red: converting YBR twice would turn it another colour.
    red = jpeg[5, 50]
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1


def test_uncompressed_ybr_full_is_converted_to_rgb_once():
    (ybr,) = render(read("SC_ybr_full_uncompressed.dcm"))
    (rgb,) = render(read("SC_rgb.dcm"))
    # 8-bit YBR round trips are off by a few levels; a second conversion would be off by most of the range.
    assert np.abs(ybr - rgb).max() < 0.03


def test_jpeg_baseline_ultrasound_cine_middle_frame_is_rgb():
    ds = read("color3d_jpeg_baseline.dcm")  # YBR_FULL_422, 120 frames: a long cine is fine, one frame is decoded
    (frame,) = render(ds)
    reference = pixel_array(ds, index=60).astype(np.float32) / 255.0
    assert frame.shape == (480, 640, 3)
    assert np.abs(frame - reference).max() < 1e-6


def test_palette_colour_ultrasound_becomes_rgb():
    (frame,) = render(read("OBXXXX1A.dcm"))
    assert frame.shape == (600, 800, 3) and frame.dtype == np.float32
    assert np.abs(frame[..., 0] - frame[..., 2]).max() > 0.1  # a real colour map, not greys


def test_16_bit_palette_is_scaled_into_unit_range():
    (frame,) = render(read("gdcm-US-ALOKA-16.dcm"))
    assert frame.shape == (480, 640, 3)
    assert 0.0 <= frame.min() and 0.5 < frame.max() <= 1.0


@pytest.mark.parametrize(
    ("encoded", "plain"),
    [("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"), ("OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_2frame.dcm"), ("SC_rgb_rle.dcm", "SC_rgb.dcm")],
)
def test_rle_renders_identically_to_uncompressed(encoded, plain):
    a, b = render(read(encoded), frames="all"), render(read(plain), frames="all")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize(
    ("big", "little"),
    [
        ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm"),  # palette tables are OW: byte order matters there too
        ("OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_2frame.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("SC_rgb_expb_16bit.dcm", "SC_rgb_16bit.dcm"),
    ],
)
def test_big_endian_renders_identically_to_little_endian(big, little):
    a, b = render(read(big), frames="all"), render(read(little), frames="all")
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize(
    ("encoded", "plain"),
    [("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"), ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm")],
)
def test_jpeg_ls_lossless_renders_identically_to_uncompressed(encoded, plain):
    assert np.array_equal(render(read(encoded), frames="all")[0], render(read(plain), frames="all")[0])


def test_jpeg_ls_near_lossless_decodes_to_a_plausible_image():
    (frame,) = render(read("JPEGLSNearLossless_16.dcm"))
    assert frame.ndim == 2 and frame.std() > 0.05


def test_jpeg_lossless_sv1_decodes_to_a_plausible_image():
    ds = read("JPGLosslessP14SV1_1s_1f_8b.dcm")
    (frame,) = render(ds)
    assert frame.shape == (ds.Rows, ds.Columns)
    assert frame.std() > 0.05 and np.isfinite(frame).all()


# ---------------------------------------------------------------------------------------------------------------------
# Multi-frame policies


def _corrupt_all_frames_but(ds: pydicom.Dataset, keep: int) -> None:
    n = int(ds.NumberOfFrames)
    frames = [f if i == keep else b"\xff\xd8\xff\xd9" for i, f in enumerate(generate_frames(ds.PixelData, number_of_frames=n))]
    ds.PixelData = encapsulate(frames)


def test_middle_frame_policy_decodes_only_the_middle_frame():
    ds = read("examples_ybr_color.dcm")  # JPEG baseline, 30 frames
    middle = int(ds.NumberOfFrames) // 2
    reference = pixel_array(ds, index=middle).astype(np.float32) / 255.0
    # Every other frame becomes an undecodable JPEG: rendering succeeds only if they are never decoded.
    _corrupt_all_frames_but(ds, middle)
    frames = render(ds, frames="middle")
    assert len(frames) == 1
    assert np.abs(frames[0] - reference).max() < 1e-6
    with pytest.raises(BadInputError):
        render(ds, frames="all")


def test_first_frame_policy_returns_frame_zero():
    ds = read("ultrasounds/ultrasound-multiframe.dcm")
    (frame,) = render(ds, frames="first")
    assert np.array_equal(frame, pixel_array(ds, index=0).astype(np.float32) / 255.0)


def test_all_frames_policy_returns_every_frame_in_order():
    ds = read("ultrasounds/ultrasound-multiframe.dcm")
    frames = render(ds, frames="all", min_side=112)
    assert len(frames) == int(ds.NumberOfFrames)
    assert np.array_equal(frames[int(ds.NumberOfFrames) // 2], render(ds, frames="middle", min_side=112)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Reduced-resolution JPEG 2000


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm"])
def test_reduced_resolution_jpeg2000_tensor_matches_full_resolution(name):
    reduced, full = tensor(name, min_side=224), tensor(name, min_side=None)
    assert np.abs(reduced - full).mean() < 0.02


def test_reduced_jpeg2000_decode_really_skips_resolution_levels():
    ds = read("RG1_J2KR.dcm")
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    [(plane, precision, signed)] = _decode_j2k_reduced(codestream, 2)
    assert plane.shape == (-(-1955 // 4), -(-1841 // 4))
    assert precision == 15 and not signed
    [(full, _, _)] = _decode_j2k_reduced(codestream, 0)
    assert np.array_equal(full, ds.pixel_array)


@pytest.mark.parametrize(("name", "smallest"), [("RG1_J2KR.dcm", 461), ("RG1_UNCR.dcm", 448), ("US1_UNCR.dcm", 480)])
def test_render_with_min_side_shrinks_large_frames_to_about_twice_that_size(name, smallest):
    # J2K comes back at its reduced level (1841 / 4 rounded up), native data is shrunk to 2 * min_side, and
    # frames under 3 * min_side are left alone.
    (frame,) = render(read(name), min_side=224)
    assert min(frame.shape[:2]) == smallest


# ---------------------------------------------------------------------------------------------------------------------
# Inputs that must be refused


def test_dataset_without_pixel_data_is_refused():
    ds = read("CT_small.dcm")
    del ds.PixelData
    with pytest.raises(NoPixelDataError):
        render(ds)


def test_huge_dimensions_are_refused_before_any_decode():
    ds = read("RG1_UNCR.dcm", stop_before_pixels=True)
    ds.Rows, ds.Columns = 60000, 60000
    with pytest.raises(ImageTooLargeError):
        check_header(ds)
    ds.PixelData = b"\x00" * 16  # far too short: a decode attempt would fail differently
    with pytest.raises(ImageTooLargeError):
        render(ds)


def test_zero_rows_is_bad_input():
    ds = read("MR_small.dcm")
    ds.Rows = 0
    with pytest.raises(BadInputError):
        check_header(ds)


def test_truncated_native_pixel_data_is_bad_input():
    ds = read("RG1_UNCR.dcm")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(BadInputError, match="less than expected"):
        render(ds)


@pytest.mark.parametrize("min_side", [None, 224])
def test_truncated_jpeg2000_codestream_is_bad_input(min_side):
    ds = read("RG1_J2KR.dcm")
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([codestream[: len(codestream) // 2]])
    with pytest.raises(BadInputError, match="could not be decoded"):
        render(ds, min_side=min_side)


def test_unknown_compressed_transfer_syntax_names_the_uid():
    ds = read("RG1_J2KR.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pixel decoder in pydicom
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        render(ds)


def test_float_pixel_data_with_nan_is_bad_input():
    ds = read("MR_small.dcm")
    values = np.full((ds.Rows, ds.Columns), 10.0, np.float32)
    values[3, 3] = np.nan
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.FloatPixelData = values.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    with pytest.raises(BadInputError, match="NaN"):
        render(ds)


# ---------------------------------------------------------------------------------------------------------------------
# Tensors, specs and thumbnails


def test_to_tensor_grey3_replicates_and_normalises():
    frame = np.linspace(0.0, 1.0, 300 * 200, dtype=np.float32).reshape(300, 200)
    out = to_tensor(frame, InputSpec(shape=(1, 3, 64, 32), mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.1)))
    assert out.shape == (1, 3, 64, 32) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    base = out[0, 0] * 0.5 + 0.5
    assert np.allclose(out[0, 1], (base - 0.4) / 0.25, atol=1e-5)
    assert np.allclose(out[0, 2], (base - 0.3) / 0.1, atol=1e-4)
    assert abs(base.mean() - 0.5) < 0.01


def test_to_tensor_grey3_turns_rgb_into_luma():
    frame = np.zeros((10, 10, 3), np.float32)
    frame[..., 1] = 1.0  # pure green
    out = to_tensor(frame, InputSpec(shape=(1, 3, 10, 10), mean=(0, 0, 0), std=(1, 1, 1)))
    assert np.allclose(out, 0.587, atol=1e-3)


def test_to_tensor_rgb_keeps_channels_and_replicates_grey():
    frame = np.zeros((8, 8, 3), np.float32)
    frame[..., 0] = 1.0
    spec = InputSpec(shape=(1, 3, 4, 4), colour="rgb", mean=(0, 0, 0), std=(1, 1, 1))
    out = to_tensor(frame, spec)
    assert np.allclose(out[0, 0], 1.0) and np.allclose(out[0, 1:], 0.0)
    grey = to_tensor(np.full((8, 8), 0.25, np.float32), spec)
    assert np.allclose(grey, 0.25)


def test_letterbox_keeps_aspect_and_pads_with_zero():
    frame = np.ones((100, 200), np.float32)
    out = to_tensor(frame, InputSpec(shape=(1, 3, 100, 100), resize="letterbox"))
    # Padding is pixel value 0, i.e. (0 - 0.5) / 0.5 after normalisation.
    assert np.allclose(out[0, :, :25], -1.0) and np.allclose(out[0, :, 75:], -1.0)
    assert np.allclose(out[0, :, 25:75], 1.0)


def test_squash_ignores_aspect():
    out = to_tensor(np.ones((100, 200), np.float32), InputSpec(shape=(1, 3, 100, 100)))
    assert np.allclose(out, 1.0)


def test_input_spec_from_manifest_block():
    spec = InputSpec.from_manifest(
        {"name": "input", "shape": [1, 3, 256, 192], "colour": "rgb", "resize": "letterbox",
         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "frames": "all"}
    )
    assert spec.shape == (1, 3, 256, 192) and spec.colour == "rgb" and spec.frames == "all"
    assert spec.mean == (0.485, 0.456, 0.406)
    assert InputSpec.from_manifest({"shape": [1, 3, 224, 224]}) == SPEC


@pytest.mark.parametrize(
    "block",
    [{"shape": [1, 1, 224, 224]}, {"shape": [1, 3, 224, 224], "colour": "bgr"},
     {"shape": [1, 3, 224, 224], "std": [0, 1, 1]}, {"shape": [1, 3, 224, 224], "frams": "all"}, {}],
)
def test_input_spec_refuses_malformed_manifest_blocks(block):
    with pytest.raises(ModelError):
        InputSpec.from_manifest(block)


def test_thumbnail_is_uint8_and_fits_max_side():
    (frame,) = render(read("US1_UNCR.dcm"))
    thumb = thumbnail(frame, max_side=256)
    assert thumb.dtype == np.uint8 and thumb.shape == (192, 256, 3)
    grey = thumbnail(np.full((50, 40), 1.0, np.float32))
    assert grey.shape == (50, 40) and grey.min() == 255


def _jp2_with_box_of_length_zero() -> pydicom.Dataset:
    """A JPEG 2000 instance whose frame is a JP2 file with a zero-length box before jp2c (pydicom spins on it)."""
    ds = read("RG1_J2KR.dcm")
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x00" + b"ftyp" + b"\0" * 12 + b"\x00\x00\x00\x00jp2c" + frame
    ds.PixelData = encapsulate([jp2])
    return ds


@pytest.mark.timeout(30)
def test_jp2_box_of_length_zero_is_refused_quickly_instead_of_looping_forever():
    from sync.wire.j2k_guard import jp2_boxes_sane

    ds = _jp2_with_box_of_length_zero()
    assert not jp2_boxes_sane(get_frame(ds.PixelData, 0, number_of_frames=1))
    try:
        render(ds, min_side=224)
    except BadInputError:
        pass  # refused by the decoder: the point is that it returns at all
    # the hub's and the uploader's codecs go through the same guard
    from sync.wire import codecs

    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    try:
        codecs.decode_wire(buffer.getvalue())
    except Exception as err:  # noqa: BLE001 - any clear error will do; hanging is the failure
        assert str(err)


def test_header_claiming_16_frames_of_8000_squared_is_refused_by_box_and_hub_before_decoding():
    from pydicom.uid import JPEGLSLossless

    from sync.wire import codecs

    ds = read("RG1_UNCR.dcm")
    ds.Rows = ds.Columns = 8000
    ds.NumberOfFrames = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 64] * 16)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    with pytest.raises(ImageTooLargeError, match="MiB"):
        check_header(ds)
    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageTooLargeError, match="would decode"):
        codecs.decode_wire(buffer.getvalue())


@pytest.mark.parametrize("descriptor, data", [
    ([4096, 0, 12], b"\x00\x01" * 10),       # fewer entries than the descriptor claims
    ([0, 0, 40], b"\x00\x01" * 8),           # 40-bit output
])
def test_malformed_voi_lut_is_bad_input_with_a_reason_not_an_internal_error(descriptor, data):
    from pydicom.dataset import Dataset

    ds = read("RG1_UNCR.dcm")
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    ds.VOILUTSequence = [item]
    with pytest.raises(BadInputError):
        render(ds, min_side=224)
