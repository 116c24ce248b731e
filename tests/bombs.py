"""Test helper: a deflate bomb, a small Deflated Explicit VR Little Endian file that inflates to `size` bytes."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid


def deflate_bomb(path: Path, size: int = 600 * 2**20, level: int = 9) -> Path:
    """One private OB element of zeros: ~size/1000 bytes on disk, `size` once inflated. Written in steps of 1 MiB,
    so building it costs no memory (the probes that measure peak RSS build it in their own process)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.Modality = generate_uid(), "OT"

    def explicit_le():
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        return fp
    body, head = explicit_le(), explicit_le()
    write_dataset(body, ds)
    write_file_meta_info(head, meta, enforce_standard=True)
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + head.getvalue())
        deflater = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        fh.write(deflater.compress(body.getvalue()))
        fh.write(deflater.compress(struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, size)))
        zeros = b"\0" * (1 << 20)
        for _ in range(size // len(zeros)):
            fh.write(deflater.compress(zeros))
        fh.write(deflater.flush())
    return path
