"""Helpers for the sync tests (no tests here): synthetic studies, a box uploader and hub receivers on a private broker.

The hub helpers take `database_url` (hub.database_url): empty = the SQLite index under the hub's data_dir."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CRImageStorage = "1.2.840.10008.5.1.4.1.1.1"

from conftest import make_config
from edge import ingest
from harness import wait_until
from edge.store import Store
from sync.wire import codecs, protocol
from sync.hub import config as hub_config
from sync.hub.store import HubStore
from sync.hub.receiver import Receiver
from edge.uplink.uploader import Uploader

# Small chunks and a rate cap make a ~60 KB instance take a couple of seconds: long enough to cut mid-transfer,
# short enough for a test measured in seconds.
FAST_SYNC = {"enabled": True, "chunk_bytes": 4096, "max_inflight_bytes": 8192, "heartbeat_seconds": 30.0,
             "ack_timeout_seconds": 5.0, "codecs": ["jpegls"], "keepalive_seconds": 10}


def make_cr(dest: Path, *, study_uid: str | None = None, seed: int = 0, side: int = 160) -> Path:
    """A 12-bit CR of noise (nearly incompressible, so wire size ~ 1.5 bytes/pixel), with fresh UIDs."""
    rng = np.random.default_rng(seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(dest), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "TEST^SYNC"
    ds.PatientID = "SYNC-1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def triage(store: Store, path: Path, label: str) -> int:
    """Ingest and triage one file as the worker would (no model needed)."""
    out = ingest.ingest_file(store, path, source="test", max_pixels=10**8, max_file_bytes=10**9)
    assert out.status == "stored", out
    row = store.claim_next()
    store.record_triage(row["id"], label, [{"code": "test"}], [])
    return row["id"]


def box_config(root: Path, port: int, box_id: str = "box-a", **sync):
    cfg = make_config(root)
    return replace(cfg, box=replace(cfg.box, id=box_id),
                   sync=replace(cfg.sync, broker_port=port, **{**FAST_SYNC, **sync}))


def hub_cfg(root: Path, port: int, hub_id: str = "hub-1", database_url: str = ""):
    index = f'database_url = "{database_url}"\n' if database_url else ""
    return hub_config.parse(f'[hub]\nid = "{hub_id}"\ndata_dir = "{root / "hub"}"\n{index}[broker]\nport = {port}\n'
                            'keepalive_seconds = 10\n')


class Box:
    """An in-process box: its store and uploader."""

    def __init__(self, root: Path, port: int, box_id: str = "box-a", **sync):
        self.cfg = box_config(root, port, box_id, **sync)
        self.store = Store.from_config(self.cfg)
        self.uploader: Uploader | None = None

    def start(self) -> "Box":
        self.uploader = Uploader(self.cfg, self.store)
        self.uploader.start()
        return self

    def stop(self) -> None:
        if self.uploader:
            self.uploader.stop()
            self.uploader = None

    def states(self) -> dict[str, int]:
        return self.store.counts()


class RawBox:
    """A hand-driven box: publishes exactly the bytes a test wants and collects what the hub answers."""

    def __init__(self, port, device="box-raw"):
        self.device = device
        self.acks: list[dict] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{device}", protocol=mqtt.MQTTv5)
        self.c.on_message = lambda _c, _u, m: self.acks.append(json.loads(m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(protocol.down_filter(device), qos=1)
        self.c.loop_start()

    def pub(self, kind, payload):
        self.c.publish(f"wasla/v1/{self.device}/up/{kind}", payload, qos=1).wait_for_publish(5)

    def last(self, tid):
        got = [a for a in self.acks if a.get("transfer") == tid]
        return got[-1] if got else None


def start_hub(root: Path, port: int, hub_id: str = "hub-1", database_url: str = "") -> Receiver:
    r = Receiver(hub_cfg(root, port, hub_id, database_url)).start()
    wait_until(r.connected.is_set, timeout=10, what="hub connected")
    return r


def hub_view(root: Path, database_url: str = "") -> HubStore:
    """A second connection on the hub's index, as `wasla-hub` commands open it."""
    return HubStore.from_config(hub_cfg(root, 1, database_url=database_url))


def stored_sops(root: Path, database_url: str = "") -> list[str]:
    s = hub_view(root, database_url)
    try:
        return [r["sop_instance_uid"] for r in s.query("SELECT sop_instance_uid FROM instances")]
    finally:
        s.close()


DERIVED_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7")  # the box's own SR / SC


def assert_hub_holds_exactly(root: Path, originals: list[Path], database_url: str = "") -> None:
    """The hub has one copy of each original, pixel data bit-exact, and nothing else but the box's result objects."""
    s = hub_view(root, database_url)
    try:
        rows = s.query("SELECT * FROM instances")
        by_sop = {r["sop_instance_uid"]: r for r in rows}
        wanted = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in originals}
        studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in originals}
        derived = [r for r in rows if r["sop_instance_uid"] not in wanted]
        for r in derived:
            ds = pydicom.dcmread(s.instance_file(r), stop_before_pixels=True)
            assert str(ds.SOPClassUID).startswith(DERIVED_CLASSES) and str(ds.StudyInstanceUID) in studies
        rows = [r for r in rows if r["sop_instance_uid"] in wanted]
        assert len(rows) == len(originals) == len(wanted) == len(by_sop) - len(derived)
        for path in originals:
            src = pydicom.dcmread(path)
            row = by_sop[str(src.SOPInstanceUID)]
            got = pydicom.dcmread(s.instance_file(row))
            assert str(got.StudyInstanceUID) == str(src.StudyInstanceUID)
            assert codecs.pixels_equal(got, src)
        n_files = sum(1 for p in s.studies_dir.rglob("*.dcm"))
        assert n_files == len(originals) + len(derived)
    finally:
        s.close()
