"""The fuzzer's seeds: small synthetic instances, pydicom's and pydicom-data's sample files, their wire forms."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from fuzzlib import DEFLATED

# Patient identifiers of the synthetic seeds: a quarantine reason or a log line that contains one quotes a header
# value, which STYLE.md forbids (reasons and logs may leave the clinic); the worker checks every case for them.
PHI_NAME, PHI_ID = "ZZPHI^MARKER", "ZZPHIID77"
SEED_MAX_BYTES = 130_000


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    secrets: tuple[str, ...] = ()


# --- DICOM seeds -------------------------------------------------------------------------------------------------

def _base(rows: int, cols: int, samples: int = 1, bits: int = 16, stored: int = 12, photometric: str = "MONOCHROME2",
          sop_class: str = "1.2.840.10008.5.1.4.1.1.1"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID = PHI_NAME, PHI_ID
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, samples, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    return ds


def _save(ds, syntax: str | None = None) -> bytes:
    from pydicom.uid import UID

    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _grey_seeds(grey) -> list[tuple[str, bytes]]:
    """12-bit CR in every uncompressed and lossless syntax, MONOCHROME1 with a sigmoid, VOI and modality LUTs."""
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    out: list[tuple[str, bytes]] = []

    def cr(**attrs):
        ds = _base(48, 40)
        ds.WindowCenter, ds.WindowWidth = 2048, 4000
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = grey.tobytes()
        for key, value in attrs.items():
            setattr(ds, key, value)
        return ds

    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED):
        out.append((f"cr-{syntax}", _save(cr(), syntax)))
    for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds = cr()
        try:
            ds.compress(syntax, grey)
        except Exception:  # noqa: BLE001 - an encoder plugin missing here: that seed is skipped
            continue
        out.append((f"cr-{syntax}", _save(ds)))
    mono1 = cr(PhotometricInterpretation="MONOCHROME1", VOILUTFunction="SIGMOID")
    out.append(("cr-mono1-sigmoid", _save(mono1)))
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 12]
    lut.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    voi = cr()
    del voi.WindowCenter, voi.WindowWidth
    voi.VOILUTSequence = [lut]
    out.append(("cr-voi-lut", _save(voi)))
    mlut = Dataset()
    mlut.LUTDescriptor, mlut.ModalityLUTType = [4096, 0, 16], "OD"
    mlut.add_new(0x00283006, "OW", (np.arange(4096, dtype="<u2") * 3).tobytes())
    mod = cr()
    mod.ModalityLUTSequence = [mlut]
    out.append(("cr-modality-lut", _save(mod)))
    return out


def _colour_seeds(rng) -> list[tuple[str, bytes]]:
    """8-bit palette colour with 256-entry tables, RGB ultrasound, and the same as baseline JPEG when it encodes."""
    import numpy as np
    from pydicom.encaps import encapsulate

    out: list[tuple[str, bytes]] = []
    pal = _base(32, 32, bits=8, stored=8, photometric="PALETTE COLOR", sop_class="1.2.840.10008.5.1.4.1.1.7")
    for colour in ("Red", "Green", "Blue"):
        setattr(pal, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(pal, f"{colour}PaletteColorLookupTableData", (np.arange(256, dtype="<u2") * 257).tobytes())
    pal.PixelData = rng.integers(0, 256, (32, 32), dtype=np.uint8).tobytes()
    out.append(("palette", _save(pal)))
    rgb = _base(24, 32, samples=3, bits=8, stored=8, photometric="RGB", sop_class="1.2.840.10008.5.1.4.1.1.6.1")
    rgb.Modality = "US"
    rgb_pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb.PixelData = rgb_pixels.tobytes()
    out.append(("us-rgb", _save(rgb)))
    try:
        import imagecodecs

        jpeg = _base(24, 32, samples=3, bits=8, stored=8, photometric="YBR_FULL_422",
                     sop_class="1.2.840.10008.5.1.4.1.1.6.1")
        jpeg.PixelData = encapsulate([bytes(imagecodecs.jpeg8_encode(rgb_pixels, level=90))])
        jpeg["PixelData"].VR = "OB"
        out.append(("us-jpeg-baseline", _save(jpeg, "1.2.840.10008.1.2.4.50")))
    except Exception:  # noqa: BLE001 - no JPEG encoder here
        pass
    return out


def _frames_and_report_seeds(rng) -> list[tuple[str, bytes]]:
    """A cine, an enhanced object with functional groups, and a nested report (never triaged, always kept)."""
    import numpy as np
    from pydicom.dataset import Dataset

    out: list[tuple[str, bytes]] = []
    cine = _base(16, 16, bits=8, stored=8, sop_class="1.2.840.10008.5.1.4.1.1.3.1")
    cine.NumberOfFrames = 4
    cine.PixelData = rng.integers(0, 256, (4, 16, 16), dtype=np.uint8).tobytes()
    out.append(("cine-4-frames", _save(cine)))
    # An enhanced object: per-frame and shared functional groups carrying the VOI and rescale the renderer reads.
    enh = _base(16, 16, sop_class="1.2.840.10008.5.1.4.1.1.2.1")
    enh.NumberOfFrames = 3
    frames = []
    for i in range(3):
        voi_item, pix_item, group = Dataset(), Dataset(), Dataset()
        voi_item.WindowCenter, voi_item.WindowWidth = 1000 + i, 2000
        pix_item.RescaleSlope, pix_item.RescaleIntercept, pix_item.RescaleType = 1, -1024, "HU"
        group.FrameVOILUTSequence, group.PixelValueTransformationSequence = [voi_item], [pix_item]
        frames.append(group)
    enh.PerFrameFunctionalGroupsSequence = frames
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.5]
    enh.SharedFunctionalGroupsSequence = [shared]
    enh.PixelData = rng.integers(0, 4096, (3, 16, 16), dtype=np.uint16).tobytes()
    out.append(("enhanced-3-frames", _save(enh)))
    sr = _base(1, 1, sop_class="1.2.840.10008.5.1.4.1.1.88.22")
    for key in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                "HighBit", "PixelRepresentation"):
        delattr(sr, key)
    sr.Modality = "SR"
    node = sr
    for depth in range(4):
        child = Dataset()
        child.RelationshipType, child.ValueType, child.TextValue = "CONTAINS", "TEXT", f"level {depth}"
        node.ContentSequence = [child]
        node = child
    out.append(("report", _save(sr)))
    return out


def synthetic_seeds() -> list[Seed]:
    """Small instances that cover what the box renders: syntaxes, LUTs, colour models, frames, sequences, reports."""
    import numpy as np

    rng = np.random.default_rng(7)
    grey = rng.integers(0, 4096, (48, 40), dtype=np.uint16)
    out = _grey_seeds(grey) + _colour_seeds(rng) + _frames_and_report_seeds(rng)
    return [Seed(name, data, (PHI_NAME, PHI_ID)) for name, data in out]


def sample_seeds(max_bytes: int = SEED_MAX_BYTES) -> list[Seed]:
    """pydicom's bundled test files and pydicom-data's, up to `max_bytes` each: odd real-world encodings."""
    import pydicom
    from pydicom.data import get_testdata_files

    paths = [Path(p) for p in get_testdata_files()]
    try:
        import data_store

        paths += sorted((Path(data_store.__file__).parent / "data").rglob("*.dcm"))
    except ImportError:
        pass
    seen, out = set(), []
    for path in sorted(paths, key=lambda p: p.name):
        if not path.is_file() or path.stat().st_size > max_bytes or path.suffix in (".json", ".txt", ".gz", ".icc"):
            continue
        data = path.read_bytes()
        if data[128:132] != b"DICM" or data in seen:
            continue
        seen.add(data)
        secrets = ()
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            secrets = tuple(s for s in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))) if len(s) >= 6)
        except Exception:  # noqa: BLE001 - a broken sample is still a seed, with nothing to look for
            pass
        out.append(Seed(path.name, data, secrets))
    return out


def dicom_seeds() -> list[Seed]:
    return synthetic_seeds() + sample_seeds()


def wire_encoded(seeds: list[Seed]) -> list[Seed]:
    """What the box's uploader makes of the synthetic seeds (JPEG-LS, JPEG-XL): the hub's usual input."""
    from sync.wire import codecs

    out = []
    for s in seeds:
        if not s.name.startswith(("cr-", "us-", "palette", "cine", "enhanced")):
            continue
        try:
            enc = codecs.encode_for_wire(s.data)
        except Exception:  # noqa: BLE001 - a seed the uploader cannot pack is no hub seed
            continue
        if enc.codec != "original":
            out.append(Seed(f"{s.name}-wire-{enc.codec}", enc.data, s.secrets))
    return out
