"""The DICOM bombs scripts/bench_bombs.py feeds a box and a hub: each a small file that claims (or inflates to) far
more than it holds, built byte by byte so no library "fixes" it on the way; and fresh UIDs for each sending."""
from __future__ import annotations

import re
import time
import zlib
from pathlib import Path


# --- the bombs -----------------------------------------------------------------------------------------------------

CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT, DEFLATED, JPEGLS, J2K = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.80", \
    "1.2.840.10008.1.2.4.90"
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_ITEM, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _dataset(rows: int, cols: int, bits: int = 16, frames: int | None = None):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.PatientName, ds.PatientID = "BENCH^BOMB", "BOMB-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, min(bits, 12), min(bits, 12) - 1, 0
    if frames:
        ds.NumberOfFrames = frames
    return ds


def _encode(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _head(ds, syntax: str) -> bytes:
    """Preamble, 'DICM' and the file meta of `ds` in `syntax`."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def _native_pixels(length: int) -> bytes:
    return _PIXEL_TAG + b"OW\0\0" + length.to_bytes(4, "little")


def _encapsulated(frames: list[bytes]) -> bytes:
    out = [_PIXEL_TAG, b"OB\0\0", b"\xff\xff\xff\xff", _ITEM, b"\0\0\0\0"]  # empty basic offset table
    for f in frames:
        f = f + b"\0" * (len(f) % 2)
        out += [_ITEM, len(f).to_bytes(4, "little"), f]
    return b"".join([*out, _SEQ_END])


def deflate_bomb(dest: Path, gib: float) -> Path:
    """Deflated Explicit VR LE: a 32768x32768 16-bit header and `gib` GiB of zeros in Pixel Data, deflated."""
    n = int(gib * 2**30) & ~1
    side = int((n // 2) ** 0.5)
    ds = _dataset(side, side)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = bytes(1 << 24)
    with open(dest, "wb") as fh:
        fh.write(_head(ds, DEFLATED))
        fh.write(z.compress(_encode(ds) + _native_pixels(n)))
        left = n
        while left:
            fh.write(z.compress(block[:min(left, len(block))]))
            left -= min(left, len(block))
        fh.write(z.flush())
    return dest


def _zeros_frame(codec: str) -> bytes:
    import numpy as np

    frame = np.zeros((8000, 8000), np.uint16)
    if codec == "jpegls":
        import jpeg_ls

        return bytes(jpeg_ls.encode(frame))
    import openjpeg

    return bytes(openjpeg.encode(frame, bits_stored=12, photometric_interpretation=0, use_mct=False))


def frames_bomb(dest: Path, codec: str, frame: bytes) -> Path:
    """16 valid frames of 8000x8000 zeros: a few KB of file claiming 2 GB of decoded pixels."""
    ds = _dataset(8000, 8000, frames=16)
    dest.write_bytes(_head(ds, JPEGLS if codec == "jpegls" else J2K) + _encode(ds) + _encapsulated([frame] * 16))
    return dest


def jp2_box_zero(dest: Path) -> Path:
    """A JPEG 2000 frame that is a JP2 file whose second box has length 0 (pydicom's box walk never ends)."""
    ds = _dataset(64, 64, bits=8)
    frame = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x00ftypjp2 " + b"\x00" * 4600
    dest.write_bytes(_head(ds, J2K) + _encode(ds) + _encapsulated([frame]))
    return dest


def sequence_bomb(dest: Path, items: int = 100_000) -> Path:
    """An ordinary 64x64 CR carrying a private sequence of `items` one-element items (~3 MB)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _dataset(64, 64, bits=8)
    block = ds.private_block(0x0009, "WASLA BENCH", create=True)
    item = Dataset()
    item.CodeValue = "1"
    block.add_new(0x01, "SQ", Sequence([item] * items))
    pixels = bytes(range(256)) * 16
    dest.write_bytes(_head(ds, EXPLICIT) + _encode(ds) + _native_pixels(len(pixels)) + pixels)
    return dest


def huge_rows(dest: Path) -> Path:
    """Rows x Columns 65535 x 65535 (8 GiB at 16 bits) over 1 KB of pixel data, uncompressed."""
    ds = _dataset(65535, 65535)
    dest.write_bytes(_head(ds, EXPLICIT) + _encode(ds) + _native_pixels(1024) + b"\x01" * 1024)
    return dest


_OUR_UID = re.compile(rb"1\.2\.826\.0\.1\.3680043\.8\.498\.[0-9]+")  # pydicom's generate_uid() root


def fresh(src: Path, dest: Path) -> tuple[Path, str, str]:
    """A copy of `src` with new SOP / Study / Series UIDs patched in at the same lengths (no re-encoding, so the
    bomb stays byte for byte what it was); (path, SOP Instance UID, Study Instance UID). A deflated data set keeps
    its inner UIDs: only the file meta is readable without inflating it."""
    from pydicom.uid import generate_uid

    data = src.read_bytes()
    found = list(dict.fromkeys(_OUR_UID.findall(data)))  # meta SOP, then SOP, Study, Series of the data set
    new_of = {}
    for old in found:
        new = generate_uid().encode()
        new_of[old] = (new + b"1" * len(old))[:len(old)]
    for old, new in new_of.items():
        data = data.replace(old, new)
    dest.write_bytes(data)
    uids = [new_of[o].decode() for o in found]
    return dest, uids[0], (uids[2] if len(uids) > 2 else generate_uid())



def build_bombs(folder: Path, gib: float) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    bombs = [(f"(a) deflate {gib:g} GiB of zeros", deflate_bomb(folder / "a-deflate.dcm", gib)),
             ("(b) JPEG-LS 16 x 8000x8000", frames_bomb(folder / "b-jpegls.dcm", "jpegls", _zeros_frame("jpegls"))),
             ("(b) J2K 16 x 8000x8000", frames_bomb(folder / "b-j2k.dcm", "j2k", _zeros_frame("j2k"))),
             ("(c) JP2 box of length 0", jp2_box_zero(folder / "c-jp2box0.dcm")),
             ("(d) private SQ 100k items", sequence_bomb(folder / "d-seq100k.dcm")),
             ("(e) 65535x65535 over 1 KB", huge_rows(folder / "e-huge-rows.dcm"))]
    print(f"[bombs] built {len(bombs)} bombs in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{p.name} {p.stat().st_size / 1e3:.1f} KB" for _n, p in bombs))
    return bombs


