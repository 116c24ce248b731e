"""Real sample studies for the demo, benchmarks and tests: the PyPI DICOM sample packages and Kermany JPEGs wrapped as CR."""
from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CRImageStorage = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage

from sync.core.errors import NotFoundError

KERMANY = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "cxr-pneumonia-kermany"


def _package_dir(module: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


def sample_path(name: str) -> Path:
    """Find a sample by file name in pydicom-data, deid-data or pydicom's own test files (never downloads)."""
    roots = [_package_dir("data_store", "data"), _package_dir("pydicom", "data/test_files")]
    deid = _package_dir("deid_data", "data")
    if deid is not None:
        roots += [p for p in deid.iterdir() if p.is_dir()]
    for root in roots:
        if root is not None and (root / name).is_file():
            return root / name
    raise NotFoundError(f"sample {name} not found (pip install pydicom-data deid-data)")


def fresh_copy(src: Path, dest: Path, *, study_uid: str | None = None) -> Path:
    """Copy a sample with new Study/Series/SOP Instance UIDs (pixel data untouched), so it counts as a new study."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def jpeg_to_cr(jpeg: Path, dest: Path, *, body_part: str = "CHEST") -> Path:
    """Wrap a greyscale JPEG (e.g. a Kermany test image) into an uncompressed CR instance, as a digitiser would."""
    import cv2

    img = cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise NotFoundError(f"cannot read image {jpeg}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(dest), {}, file_meta=meta, preamble=b"\0" * 128)
    now = dt.datetime.now()
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality = "CR"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "AP"
    ds.PatientName = "DEMO^ANONYMOUS"
    ds.PatientID = "DEMO-" + jpeg.stem[:12]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(img).tobytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def kermany_images(split: str = "test", per_class: int = 2) -> list[tuple[str, Path]]:
    """(true class, path) pairs from the shared dataset; empty when it is not beside the repo."""
    out = []
    for cls in ("NORMAL", "PNEUMONIA"):
        folder = KERMANY / split / cls
        if folder.is_dir():
            out += [(cls, p) for p in sorted(folder.glob("*.jpeg"))[:per_class]]
    return out
