"""What bench_link.py and its phase modules share: ports and names inside the namespaces, logging, a read-only
SQLite look, waiting, the probe file, and the CPU/RSS sampler."""
from __future__ import annotations

import datetime as dt
import sqlite3
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "scripts", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import harness  # noqa: E402
import linkemu_lib as le  # noqa: E402

PY = sys.executable
BROKER_PORT = 1883
DICOM_PORT = 11112
CSTORE_PORT = 11113
DEVICE = "bench-box"


# --- small helpers ---------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def q(db: Path, sql: str, params=()) -> list[dict]:
    """A read-only query of a live SQLite database (the daemons write it in WAL mode)."""
    if not db.exists():
        return []
    for attempt in range(20):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
                c.row_factory = sqlite3.Row
                return [dict(r) for r in c.execute(sql, params).fetchall()]
        except sqlite3.OperationalError:
            if attempt == 19:
                raise
            time.sleep(0.2)
    return []


def wait_until(pred, timeout: float, what: str, interval: float = 0.25):
    return harness.wait_until(pred, timeout=timeout, interval=interval, what=what)


def probe_file(dest: Path) -> Path:
    """A small bright DX chest image with fresh UIDs: the brightness test model scores it urgent."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(dest), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientName, ds.PatientID = "DX", "CHEST", "BENCH^PROBE", "PROBE-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    img = np.full((128, 128), 250, dtype=np.uint8)
    img[:12, :12] = 0  # not flat, so any min-max windowing still leaves the image bright
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = img.tobytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


class Sampler(threading.Thread):
    """Emulator counters every 0.2 s, so a phase's bytes can be cut at the database's timestamps afterwards."""

    def __init__(self, link: le.LinkEmulator):
        super().__init__(daemon=True, name="bench-sampler")
        self.link, self.samples, self.stop_ev = link, [], threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            s = self.link.stats()
            self.samples.append((time.time(), s["up"]["bytes_in"], s["up"]["bytes_out"], s["up"]["packets_in"],
                                 s["down"]["bytes_in"]))
            self.stop_ev.wait(0.2)

    def at(self, t: float) -> tuple:
        """The last sample taken at or before t (the first one if none)."""
        best = self.samples[0]
        for s in self.samples:
            if s[0] <= t:
                best = s
            else:
                break
        return best

    def between(self, t0: float, t1: float) -> dict:
        a, b = self.at(t0), self.at(t1)
        return {"up_in": b[1] - a[1], "up_out": b[2] - a[2], "up_pkts": b[3] - a[3], "down_in": b[4] - a[4]}


