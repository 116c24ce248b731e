"""Poison files and messages against the real daemon and hub: each is quarantined or dead-lettered with a reason,
nothing stops, and legitimate studies sent after them (watch folder, C-STORE, CLI) all reach the hub."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless, generate_uid

from bombs import deflate_bomb
from boxproc import BoxProcess, HubProcess, Stopping, tiny_models, write_box_config
import harness
from harness import wait_until
from test_imaging import _jp2_with_box_of_length_zero
from test_ingest import POISON, _poison
from test_sync_support import make_cr

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not harness.shutil.which("storescu"), reason="dcmtk storescu not installed")]


def _fresh_uids(ds: Dataset) -> Dataset:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    return ds


def _raw_edit(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert old in data, old
    path.write_bytes(data.replace(old, new, 1))
    return path


def poison_files(folder: Path, tag: str) -> list[Path]:
    """One file per kind of poison the issue names; `tag` keeps each route's copies distinct (new UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [_poison(folder, f"{tag}-{name}", mutate) for name, mutate in POISON.items()]
    out.append(_raw_edit(_poison(folder, f"{tag}-unknown-vr", lambda ds: None), b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00ZZ"))
    odd = _poison(folder, f"{tag}-odd-length-rows", lambda ds: None)
    _raw_edit(odd, b"\x28\x00\x10\x00US\x02\x00\x08\x00", b"\x28\x00\x10\x00US\x03\x00\x08\x00\x00")

    j2k = _fresh_uids(_jp2_with_box_of_length_zero())
    j2k.save_as(folder / f"{tag}-jp2-box-of-length-zero.dcm", enforce_file_format=True)
    out += [odd, folder / f"{tag}-jp2-box-of-length-zero.dcm"]

    def bad_voi(ds):
        item = Dataset()
        item.LUTDescriptor, item.LUTData = [4096, 0, 12], b"\x00\x01" * 10  # fewer entries than it claims
        ds.VOILUTSequence = Sequence([item])
    out.append(_poison(folder, f"{tag}-malformed-voi-lut", bad_voi))

    def huge_sequence(ds):
        block = ds.private_block(0x0009, "WASLA POISON", create=True)
        items = []
        for i in range(100_000):
            item = Dataset()
            item.add_new(0x00091001, "LO", str(i))
            items.append(item)
        block.add_new(0x01, "SQ", Sequence(items))
    out.append(_poison(folder, f"{tag}-100k-item-sequence", huge_sequence))

    def frame_bomb(ds):
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.Rows = ds.Columns = 8000
        ds.NumberOfFrames = 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7\x00\x0b\x10\x1f\x40\x1f\x40\x01\x01\x11\x00" + bytes(1100)] * 16)
        ds["PixelData"].VR = "OB"
    out.append(_poison(folder, f"{tag}-jpegls-claims-16-frames-of-8000x8000", frame_bomb))
    out.append(deflate_bomb(folder / f"{tag}-deflate-bomb.dcm", level=6))
    return out


def _rows(db: Path) -> list[dict]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM instances WHERE COALESCE(source, '') != 'wasla'")]


def _publish(port: int, topic: str, payload: bytes) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"poisoner-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def test_every_poison_input_is_contained_and_studies_sent_after_them_reach_the_hub(tmp_path, parts):
    broker = harness.Mosquitto(tmp_path / "mqtt").start()
    parts.append(broker)
    hub = HubProcess(tmp_path, tmp_path / "hub", broker.port).start()
    parts.append(hub)
    wait_until(lambda: "started" in hub.text(), timeout=60, what="hub up")
    watch = tmp_path / "watch"
    extra = ('enabled = true\nchunk_bytes = 16384\nack_timeout_seconds = 5.0\ncodecs = ["jpegls"]\n'
             f'keepalive_seconds = 10\n[watch]\nenabled = true\ndir = "{watch}"\npoll_seconds = 0.2\n'
             'settle_seconds = 0.5\n')
    models_dir, pub = tiny_models(tmp_path)
    cfg = write_box_config(tmp_path, models_dir=models_dir, trusted=pub, broker_port=broker.port, extra=extra)
    box = BoxProcess(cfg).start()
    parts.append(Stopping(box.terminate))

    # Poison messages first: deep JSON to the hub's up/ and to the box's down/ (each killed a network thread once).
    _publish(broker.port, "wasla/v1/test-box/up/flag", b"[" * 4096)
    _publish(broker.port, "wasla/v1/test-box/down/ack", b"[" * 4096)

    # The same poison by every door: watch folder, C-STORE, and `wasla ingest DIR`.
    by_watch = poison_files(tmp_path / "p-watch", "watch")
    for f in by_watch:
        f.rename(watch / f.name)
    by_scp = poison_files(tmp_path / "p-scp", "scp")
    harness.storescu(box.port, by_scp)
    by_cli = poison_files(tmp_path / "p-cli", "cli")
    ingest = box.cli("ingest", str(tmp_path / "p-cli"), "--json", check=False)
    assert ingest.returncode in (0, 4), ingest.stderr[-2000:]
    assert len(json.loads(ingest.stdout)["files"]) == len(by_cli)  # every file reported, none skipped by a crash

    # Then legitimate studies by each door, and a valid deflated file.
    from pydicom.data import get_testdata_file

    good = [make_cr(tmp_path / "good" / f"{i}.dcm", seed=100 + i, side=200) for i in range(3)]
    deflated = tmp_path / "good" / "deflated.dcm"
    ds = _fresh_uids(pydicom.dcmread(get_testdata_file("image_dfl.dcm")))
    ds.save_as(deflated, enforce_file_format=True)
    (watch / "good0.dcm").write_bytes(good[0].read_bytes())
    assert harness.storescu(box.port, [good[1], deflated]).returncode == 0
    box.cli("ingest", str(good[2]))

    db = tmp_path / "data" / "wasla.db"
    good_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*good, deflated]}

    def good_acknowledged() -> bool:
        return sum(1 for r in _rows(db) if r["sop_instance_uid"] in good_sops and r["state"] == "acknowledged") \
            == len(good_sops)
    wait_until(good_acknowledged, timeout=240, what="the legitimate studies at the hub")
    assert box.proc.poll() is None and hub.proc.poll() is None

    rows = _rows(db)
    quarantined = [r for r in rows if r["state"] == "quarantined"]
    assert all(r["reason"] for r in quarantined)
    # Every poison file but the odd-yet-readable FD class UID is quarantined, by the watch folder and the CLI
    # alike (the SCP gets what storescu itself could parse and send).
    by_source = {src: sum(1 for r in quarantined if r["source"] == src) for src in ("watch", "cli", "dicom")}
    assert by_source["watch"] == len(by_watch) - 1 and by_source["cli"] == len(by_cli) - 1, by_source
    assert by_source["dicom"] >= 1, by_source
    assert not [r for r in rows if r["state"] in ("received", "processing")]
    assert not list((tmp_path / "data" / "spool" / "tmp").glob("*")), "temporary copies leaked"
    _assert_hub_holds(tmp_path, [*good, deflated], allowed={r["sop_instance_uid"] for r in rows
                                                            if r["state"] != "quarantined"})
    log = box.daemon_log()
    assert "Traceback" not in log, log[-3000:]
    for f in by_watch:
        assert f.name not in log, "a file name (it may name a patient) reached the log"
    dead = _hub_dead_letters(tmp_path)
    assert any("up/flag" in d["topic"] for d in dead)


def _assert_hub_holds(root: Path, originals: list[Path], allowed: set[str]) -> None:
    """Each original once and bit-exact at the hub; nothing there the box did not accept (its own SR/SC aside)."""
    from sync.wire import codecs
    from test_sync_support import DERIVED_CLASSES, hub_view

    s = hub_view(root)
    try:
        rows = {r["sop_instance_uid"]: r for r in s.query("SELECT * FROM instances")}
        for path in originals:
            src = pydicom.dcmread(path)
            got = pydicom.dcmread(s.instance_file(rows[str(src.SOPInstanceUID)]))
            assert codecs.pixels_equal(got, src)
        for sop, r in rows.items():
            if sop not in allowed:
                cls = str(pydicom.dcmread(s.instance_file(r), stop_before_pixels=True).SOPClassUID)
                assert cls.startswith(DERIVED_CLASSES), sop
    finally:
        s.close()


def _hub_dead_letters(root: Path) -> list[dict]:
    from test_sync_support import hub_view

    s = hub_view(root)
    try:
        return s.query("SELECT topic, reason FROM dead_letters")
    finally:
        s.close()
