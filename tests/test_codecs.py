import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file

from sync.core.errors import BadInputError
from sync.wire.codecs import available_codecs, decode_wire, encode_for_wire, pixels_equal

SITE = Path(pydicom.__file__).parent.parent
DATA = SITE / "data_store" / "data"
CR_CHEST = DATA / "RG1_UNCR.dcm"
CR_SMALL = DATA / "RG3_UNCR.dcm"
US_RGB = DATA / "US1_UNCR.dcm"
US_PALETTE = DATA / "OBXXXX1A.dcm"
CR_LOSSY = DATA / "RG1_J2KI.dcm"
DX_CAT = SITE / "deid_data" / "data" / "animals" / "cat.dcm"

pytestmark = pytest.mark.skipif(not CR_CHEST.exists(), reason="pydicom-data samples not installed")


def _round_trip(source, **kw):
    wire = encode_for_wire(source, **kw)
    received = decode_wire(wire.data)
    original = pydicom.dcmread(source if not isinstance(source, bytes) else io.BytesIO(source))
    assert pixels_equal(received, original)
    assert str(received.file_meta.TransferSyntaxUID) == wire.transfer_syntax_uid
    assert wire.ratio == pytest.approx(wire.original_size / len(wire.data))
    return wire, received


def _part10(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_chest_cr_round_trips_bit_exact_and_shrinks():
    wire, received = _round_trip(CR_CHEST)
    assert wire.codec != "original" and wire.verified
    assert wire.ratio > 1.4
    assert received.PhotometricInterpretation == "MONOCHROME1" and received.BitsStored == 15


@pytest.mark.parametrize("path", [CR_SMALL, US_RGB, US_PALETTE, DX_CAT], ids=lambda p: p.name)
def test_sample_round_trips_bit_exact(path):
    if not path.exists():
        pytest.skip(f"{path.name} not installed")
    wire, _ = _round_trip(path)
    assert wire.codec != "original" and wire.verified and wire.ratio > 1.0


def test_wire_file_is_valid_part10_with_advertised_syntax():
    wire = encode_for_wire(CR_SMALL, codecs=["jpegls"])
    assert wire.data[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(wire.data))
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSLossless == wire.transfer_syntax_uid
    assert ds["PixelData"].is_undefined_length and ds.SOPInstanceUID == pydicom.dcmread(CR_SMALL).SOPInstanceUID
    ds.pixel_array  # pydicom alone decodes the standard syntaxes


def test_lossy_input_is_sent_as_original():
    raw = CR_LOSSY.read_bytes()
    wire = encode_for_wire(raw)
    assert wire.codec == "original" and wire.data == raw and wire.ratio == 1.0
    assert wire.transfer_syntax_uid == uid.JPEG2000


def test_lossy_flag_on_native_pixels_is_sent_as_original():
    ds = pydicom.dcmread(CR_SMALL)
    ds.LossyImageCompression = "01"
    raw = _part10(ds)
    assert encode_for_wire(raw).data == raw


@pytest.mark.parametrize("codec, syntax", [
    ("jpegls", uid.JPEGLSLossless), ("htj2k", uid.HTJ2KLossless), ("j2k", uid.JPEG2000Lossless),
    ("jpegxl:1", "1.2.840.10008.1.2.4.110"),
])
def test_forced_codec_is_used_and_round_trips(codec, syntax):
    if codec.split(":")[0] not in available_codecs():
        pytest.skip(f"{codec} not installed")
    wire, _ = _round_trip(US_RGB, codecs=[codec])
    assert wire.codec == codec and wire.transfer_syntax_uid == syntax


@pytest.mark.parametrize("codec", ["htj2k", "j2k"])
def test_rgb_j2k_declares_ybr_rct_and_restores_rgb(codec):
    if codec not in available_codecs():
        pytest.skip(f"{codec} not in this imagecodecs build")  # HTJ2K arrived in imagecodecs after the floor
    wire, received = _round_trip(US_RGB, codecs=[codec])
    assert wire.codec == codec and received.PhotometricInterpretation == "YBR_RCT"


def test_planar_rgb_is_interleaved_on_the_wire():
    ds = pydicom.dcmread(US_RGB)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array.transpose(2, 0, 1)).tobytes()
    ds.PlanarConfiguration = 1
    wire, received = _round_trip(_part10(ds), codecs=["jpegls"])
    assert received.PlanarConfiguration == 0


def test_multiframe_round_trips_with_offset_table():
    path = get_testdata_file("emri_small.dcm")  # 10 frames, 12 of 16 bits
    wire, received = _round_trip(path, codecs=["jpegls", "htj2k"])
    assert int(received.NumberOfFrames) == 10
    bot = pydicom.encaps.parse_basic_offsets(io.BytesIO(received.PixelData))
    assert len(bot) == 10 and bot[0] == 0


def test_signed_and_big_endian_sources_round_trip():
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm"):
        wire, received = _round_trip(get_testdata_file(name))
        assert wire.codec != "original" and received.PixelRepresentation == 1


def test_lossless_compressed_source_keeps_the_smaller():
    raw = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).read_bytes()
    wire, _ = _round_trip(raw, codecs=["jpegls"])
    assert len(wire.data) <= len(raw)


def test_frames_limit_sends_long_loops_as_is():
    raw = Path(get_testdata_file("emri_small.dcm")).read_bytes()
    assert encode_for_wire(raw, frames_limit=5).codec == "original"


@pytest.mark.parametrize("codec", ["jpegls", "htj2k", "jpegxl:2"])
def test_corrupted_pixel_byte_is_detected_by_receiver(codec):
    if codec.split(":")[0] not in available_codecs():
        pytest.skip(f"{codec} not installed")
    wire = encode_for_wire(CR_SMALL, codecs=[codec])
    assert wire.codec == codec
    data = bytearray(wire.data)
    data[len(data) - len(data) // 3] ^= 0x5A  # inside the single fragment, well past the headers
    original = pydicom.dcmread(CR_SMALL)
    try:
        received = decode_wire(bytes(data))
    except BadInputError:
        return
    assert not pixels_equal(received, original)


def test_receiver_rejects_truncated_file():
    wire = encode_for_wire(CR_SMALL, codecs=["jpegls"])
    with pytest.raises(BadInputError):
        decode_wire(wire.data[: len(wire.data) // 2])


def test_non_dicom_input_is_bad_input():
    with pytest.raises(BadInputError):
        encode_for_wire(b"not a dicom file at all")


def _large_cr(pixels: np.ndarray) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return _part10(ds)


@pytest.fixture
def tried(monkeypatch) -> list[str]:
    """The codec specs encode_for_wire instantiates, in order (JPEG-XL must be installed)."""
    import sync.wire.codecs as codecs_mod

    if "jpegxl" not in available_codecs():
        pytest.skip("imagecodecs without JPEG-XL")
    specs: list[str] = []
    real = codecs_mod.make_codec
    monkeypatch.setattr(codecs_mod, "make_codec", lambda spec: specs.append(spec) or real(spec))
    return specs


def test_slow_high_effort_codec_is_tried_on_large_images_only_when_they_compress_well(tried):
    """JPEG-XL effort 7 costs ~3 MB/s: worth it on smooth images (5-15 % smaller), not on noisy ones."""
    yy, xx = np.mgrid[0:1100, 0:1100]
    smooth = 1000 + 800 * np.sin(xx / 150.0) * np.cos(yy / 190.0)   # 2.4 MB of pixels, > the small-image limit
    noisy = np.random.default_rng(0).integers(0, 4096, (1100, 1100))
    for pixels, expect in ((smooth, True), (noisy, False)):
        tried.clear()
        wire, received = _round_trip(_large_cr(pixels))
        assert ("jpegxl:7" in tried) is expect, (tried, wire.ratio)  # _round_trip checked the pixels bit-exact


def test_on_a_fast_idle_link_the_slow_codec_is_skipped_and_on_a_busy_satellite_link_it_is_tried(tried):
    """Shortest delivery, not smallest file: effort 7 holds a large smooth CR back longer than it saves on LEO."""
    from sync.wire.codec_policy import Link

    yy, xx = np.mgrid[0:1400, 0:1400]
    source = _large_cr(1000 + 800 * np.sin(xx / 150.0) * np.cos(yy / 190.0))  # 3.9 MB of pixels
    leo = Link(bytes_per_s=5e6 / 8, backlog_bytes=0)
    wire, _ = _round_trip(source, link=leo)
    assert "jpegxl:7" not in tried and wire.codec in ("jpegls", "jpegxl:2"), tried
    tried.clear()
    geo_busy = Link(bytes_per_s=256e3 / 8, backlog_bytes=20_000_000)  # ten minutes of studies queued ahead
    wire_geo, _ = _round_trip(source, link=geo_busy)
    assert "jpegxl:7" in tried
    assert len(wire_geo.data) <= len(wire.data)


def test_codec_verdict_weighs_link_time_saved_against_time_held_and_learns_this_boxs_speed():
    from sync.wire.codec_policy import Link, SpeedBook, worth_trying

    book = SpeedBook({"jpegxl:7": 3e6})
    big = dict(pixel_bytes=6_000_000, best_bytes=1_000_000, best_ratio=6.0)
    idle_leo = worth_trying("jpegxl:7", link=Link(625_000), speeds=book, **big)
    assert not idle_leo.try_it and idle_leo.cost_s == pytest.approx(2.0)  # 6 MB at 3 MB/s, nothing queued ahead
    idle_geo = worth_trying("jpegxl:7", link=Link(32_000), speeds=book, **big)
    assert idle_geo.try_it and idle_geo.saving_s == pytest.approx(1_000_000 * 0.08 / 32_000)
    # Behind a backlog the encode overlaps the link's work: only a quarter of its CPU time is charged.
    busy_leo = worth_trying("jpegxl:7", link=Link(625_000, backlog_bytes=50_000_000), speeds=book, **big)
    assert busy_leo.cost_s == pytest.approx(0.5)
    for _ in range(20):
        book.record("jpegxl:7", 6_000_000, 0.5)  # this box turns out to encode at 12 MB/s
    assert book.speed("jpegxl:7") == pytest.approx(12e6, rel=0.01)
    assert worth_trying("jpegxl:7", link=Link(125_000), speeds=book, **big).try_it  # a 1 Mbit/s link now
    book.record("jpegxl:7", 1000, 10.0)  # a tiny image says nothing about speed
    assert book.speed("jpegxl:7") == pytest.approx(12e6, rel=0.01)
