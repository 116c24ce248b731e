"""The hub forwards every verified instance to a real Orthanc (Debian's package) in a syntax it renders: each wire
codec the box can choose arrives, previews, and decodes to the box's original pixels; the queue survives a PACS
outage, a killed hub and a PACS that refuses."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import harness
import samples
from boxproc import REPO
from sync.hub import config as hub_config
from sync.hub import forward
from sync.hub.store import HubStore
from sync.wire import codecs
from test_orthanc import Orthanc, orthanc_binary

pytestmark = pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed (scripts/setup.sh test)")

SAMPLES = ("CT_small.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm")
WIRE_CODECS = ("original", "jpegls", "jpegxl:2", "jpegxl:7", "j2k", "htj2k")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield o
    o.stop()


def hub_cfg(tmp_path: Path, pacs_port: int, **pacs_keys) -> hub_config.HubConfig:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in pacs_keys.items())
    text = (f'[hub]\nid = "hub-fwd"\ndata_dir = "{tmp_path / "hub"}"\n[broker]\nport = {harness.free_port()}\n'
            f'[receiver]\nmin_free_mb = 0\n[pacs]\nhost = "127.0.0.1"\nport = {pacs_port}\nretry_seconds = 0.2\n'
            + extra)
    (tmp_path / "hub.toml").write_text(text)
    return hub_config.load(tmp_path / "hub.toml")


def wire_copy(sample: str, codec: str, dest: Path) -> tuple[bytes, np.ndarray]:
    """A fresh copy of `sample` as the box would send it with `codec`, and the original's stored pixel values."""
    src = samples.fresh_copy(samples.sample_path(sample), dest / f"{generate_uid()}.dcm")
    original = codecs.decode_frames(codecs.read_dataset(src.read_bytes())[0])
    if codec == "original":
        return src.read_bytes(), original
    enc = codecs.encode_for_wire(src, codecs=[codec])
    if enc.codec != codec:
        pytest.skip(f"{codec} does not win on {sample} here (sent as {enc.codec})")
    return enc.data, original


def file_on_hub(store: HubStore, data: bytes, device: str = "box-a", label: str = "urgent") -> str:
    ds = codecs.decode_wire(data)
    sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
    t = {"device": device, "transfer_id": generate_uid()[-20:], "sha256": hashlib.sha256(data).hexdigest(),
         "size": len(data), "original_size": len(data), "codec": "x", "transfer_syntax": codecs.syntax_of(ds),
         "label": label}
    store.commit_instance(t, sop, study, data)
    return sop


def orthanc_instance(pacs: Orthanc, sop: str) -> str | None:
    req = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/tools/lookup", data=sop.encode())
    with urllib.request.urlopen(req, timeout=10) as rsp:
        found = [r for r in json.loads(rsp.read()) if r["Type"] == "Instance"]
    return found[0]["ID"] if found else None


def orthanc_bytes(pacs: Orthanc, path: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{pacs.http_port}{path}", timeout=30) as rsp:
        return rsp.headers["Content-Type"], rsp.read()


@pytest.mark.parametrize("codec", WIRE_CODECS)
@pytest.mark.parametrize("sample", SAMPLES)
def test_every_wire_codec_reaches_orthanc_renders_and_keeps_the_original_pixels(pacs, tmp_path, sample, codec):
    cfg = hub_cfg(tmp_path, pacs.dicom_port)
    store = HubStore.from_config(cfg)
    data, original = wire_copy(sample, codec, tmp_path)
    sop = file_on_hub(store, data)
    fwd = forward.Forwarder(cfg, store)
    fwd.tmp_dir.mkdir(parents=True, exist_ok=True)
    assert fwd.step() == 1
    row = forward.listing(store)[0]
    assert row["state"] == "sent" and row["syntax"] in cfg.pacs.accept_syntaxes
    iid = orthanc_instance(pacs, sop)
    assert iid, "Orthanc does not have the instance"
    kind, png = orthanc_bytes(pacs, f"/instances/{iid}/preview")
    assert kind == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    _kind, stored = orthanc_bytes(pacs, f"/instances/{iid}/file")
    got = codecs.decode_frames(codecs.read_dataset(stored)[0])
    assert got.shape == original.shape and np.array_equal(got.astype(np.int64), original.astype(np.int64))
    assert not list(fwd.tmp_dir.glob("*.dcm")), "transcoded temp copies must not pile up"
    store.close()


def test_a_chest_cr_the_box_sends_with_its_default_codecs_arrives_bit_exact(pacs, tmp_path):
    cfg = hub_cfg(tmp_path, pacs.dicom_port)
    store = HubStore.from_config(cfg)
    src = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), tmp_path / "rg1.dcm")
    enc = codecs.encode_for_wire(src)
    sop = file_on_hub(store, enc.data)
    assert forward.Forwarder(cfg, store).step() == 1
    _kind, stored = orthanc_bytes(pacs, f"/instances/{orthanc_instance(pacs, sop)}/file")
    original = codecs.decode_frames(codecs.read_dataset(src.read_bytes())[0])
    assert np.array_equal(codecs.decode_frames(codecs.read_dataset(stored)[0]), original)
    store.close()


def test_forwards_wait_out_a_pacs_outage_without_using_up_their_refusals(tmp_path):
    o = Orthanc(tmp_path / "orthanc")
    cfg = hub_cfg(tmp_path, o.dicom_port, max_refusals=1)
    store = HubStore.from_config(cfg)
    data, _ = wire_copy("US1_UNCR.dcm", "jpegxl:2", tmp_path)
    sop = file_on_hub(store, data)
    fwd = forward.Forwarder(cfg, store)
    fwd.tmp_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # PACS down: nothing sent, nothing counted, nothing dead
        fwd._pause_until = 0
        assert fwd.step() == 0
    row = forward.listing(store)[0]
    assert row["state"] == "queued" and row["attempts"] == 0 and fwd.unreachable_since is not None
    o.start()
    try:
        fwd._pause_until = 0
        assert fwd.step() == 1
        assert orthanc_instance(o, sop) and fwd.unreachable_since is None
        assert forward.summary(store)["sent"] == 1
    finally:
        o.stop()
    store.close()


def refusing_pacs(port: int):
    """A DICOM storage SCP (pynetdicom) that answers 0xA700 (out of resources) for one patient and keeps the rest.

    Orthanc 1.10's own Lua filter cannot stand in: it drops a filtered instance but still answers success."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

    kept = {}

    def on_store(event):
        ds = event.dataset
        if str(ds.get("PatientID", "")) == "REFUSE-ME":
            return 0xA700
        kept[str(ds.SOPInstanceUID)] = True
        return 0x0000

    ae = AE(ae_title="ORTHANC")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, kept


def test_an_instance_the_pacs_refuses_is_dead_lettered_with_its_status_and_can_be_retried(tmp_path):
    port = harness.free_port()
    server, kept = refusing_pacs(port)
    try:
        cfg = hub_cfg(tmp_path, port, max_refusals=2)
        store = HubStore.from_config(cfg)
        src = samples.fresh_copy(samples.sample_path("CT_small.dcm"), tmp_path / "refused.dcm")
        ds = pydicom.dcmread(src)
        ds.PatientID = "REFUSE-ME"
        ds.save_as(src, enforce_file_format=True)
        refused = file_on_hub(store, src.read_bytes())
        fine = file_on_hub(store, wire_copy("CT_small.dcm", "jpegls", tmp_path)[0])
        fwd = forward.Forwarder(cfg, store)
        fwd.tmp_dir.mkdir(parents=True, exist_ok=True)
        assert fwd.step() == 1  # the other instance is not held up by the refused one
        assert forward.listing(store, "queued")[0]["attempts"] == 1
        harness.wait_until(lambda: fwd.step() == 0 and forward.summary(store)["dead"] == 1, timeout=30,
                           what="the refused instance dead-lettered")
        row = forward.listing(store, "dead")[0]
        assert row["sop_instance_uid"] == refused and "PACS refused it: status 0x" in row["reason"]
        assert fine in kept and refused not in kept
        out = subprocess.run([sys.executable, "-m", "sync.hub.cli", "--config", str(tmp_path / "hub.toml"),
                              "forwards", "--state", "dead"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0 and refused in out.stdout and "dead 1" in out.stdout
        assert forward.requeue(store, refused[:24]) == 1
        assert forward.listing(store, "queued")[0]["sop_instance_uid"] == refused
        store.close()
    finally:
        server.shutdown()


def test_a_stored_copy_damaged_on_disk_is_dead_lettered_not_retried_forever(pacs, tmp_path):
    cfg = hub_cfg(tmp_path, pacs.dicom_port)
    store = HubStore.from_config(cfg)
    sop = file_on_hub(store, wire_copy("US1_UNCR.dcm", "jpegxl:2", tmp_path)[0])
    path = store.studies_dir / store.query("SELECT path FROM instances WHERE sop_instance_uid = ?", [sop])[0]["path"]
    path.write_bytes(path.read_bytes()[:400])
    fwd = forward.Forwarder(cfg, store)
    fwd.tmp_dir.mkdir(parents=True, exist_ok=True)
    assert fwd.step() == 0
    row = forward.listing(store, "dead")[0]
    assert row["sop_instance_uid"] == sop and "cannot prepare the PACS copy" in row["reason"]
    assert fwd.step() == 0 and forward.summary(store)["dead"] == 1
    store.close()


def test_forward_queue_survives_the_hub_being_killed_and_orthanc_stopped_mid_forward(tmp_path):
    o = Orthanc(tmp_path / "orthanc").start()
    cfg = hub_cfg(tmp_path, o.dicom_port)
    store = HubStore.from_config(cfg)
    sops = [file_on_hub(store, wire_copy(name, codec, tmp_path)[0], label=label)
            for name, codec, label in [("CT_small.dcm", "jpegls", "normal"), ("US1_UNCR.dcm", "jpegxl:2", "urgent")] * 6]
    store.close()
    log = open(tmp_path / "hub.log", "ab")

    def hub() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sync.hub.cli", "--config", str(tmp_path / "hub.toml"), "run"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ))

    def sent() -> int:
        with sqlite3.connect(cfg.db_path) as db:
            return db.execute("SELECT COUNT(*) FROM forwards WHERE state = 'sent'").fetchone()[0]

    proc = hub()
    try:
        harness.wait_until(lambda: sent() >= 1, timeout=60, what="a first forward")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        o.stop()
        proc = hub()  # PACS down now: the new hub queues, waits, retries
        time.sleep(3)
        ports = o.dicom_port, o.http_port
        o = Orthanc(tmp_path / "orthanc")  # the same PACS, index and storage, back on the same ports
        o.dicom_port, o.http_port = ports
        o.start()
        harness.wait_until(lambda: sent() == len(sops), timeout=90, what="every instance forwarded")
    except BaseException:
        o.stop()  # whichever Orthanc is running; a failed run must not leave one behind
        raise
    finally:
        harness.stop_process(proc)
        log.close()
    with sqlite3.connect(cfg.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM forwards WHERE state != 'sent'").fetchone()[0] == 0
    try:
        assert [s for s in sops if not orthanc_instance(o, s)] == []
    finally:
        o.stop()
    text = (tmp_path / "hub.log").read_text(errors="replace")
    assert "PACS unreachable" in text and "PACS reachable again" in text


def test_the_radiologists_read_is_filed_as_a_verified_report_and_reaches_the_pacs_with_its_study(pacs, tmp_path):
    import shutil as _shutil

    from sync.hub.read_report import BASIC_TEXT_SR, file_report

    cfg = hub_cfg(tmp_path, pacs.dicom_port)
    store = HubStore.from_config(cfg)
    src = samples.fresh_copy(samples.sample_path("CT_small.dcm"), tmp_path / "img.dcm")
    sop = file_on_hub(store, src.read_bytes())
    study = store.query("SELECT study_uid FROM instances WHERE sop_instance_uid = ?", [sop])[0]["study_uid"]
    with store.tx() as db:
        db.execute("INSERT INTO studies (study_uid, device, label, first_seen) VALUES (?, 'box-a', 'urgent', 0) "
                   "ON CONFLICT(study_uid) DO NOTHING", [study])
    read = store.add_read(study, "urgent-referral", "التهاب رئوي — évacuer", "Dr A. Benali",
                          findings=["233604007"])
    report_uid = file_report(store, read, hub_id="hub-1")
    row = store.query("SELECT path, sop_class_uid FROM instances WHERE sop_instance_uid = ?", [report_uid])[0]
    assert row["sop_class_uid"] == BASIC_TEXT_SR
    ds = pydicom.dcmread(store.studies_dir / row["path"])
    original = pydicom.dcmread(src, stop_before_pixels=True)
    assert ds.StudyInstanceUID == study and ds.PatientName == original.PatientName and ds.PatientID == original.PatientID
    assert ds.VerificationFlag == "VERIFIED" and ds.VerifyingObserverSequence[0].VerifyingObserverName == "Dr A. Benali"
    texts = [it.TextValue for sec in ds.ContentSequence if "ContentSequence" in sec for it in sec.ContentSequence
             if it.ValueType == "TEXT"]
    assert "التهاب رئوي — évacuer" in texts and "Urgent referral to hospital" in texts
    if _shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", "-new", str(store.studies_dir / row["path"])], capture_output=True,
                             text=True, timeout=60)
        assert [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")] == []
    fwd = forward.Forwarder(cfg, store)
    fwd.tmp_dir.mkdir(parents=True, exist_ok=True)
    assert fwd.step() == 2
    iid = orthanc_instance(pacs, report_uid)
    assert iid and pacs.get(f"/instances/{iid}/simplified-tags")["StudyInstanceUID"] == study
    store.close()


def test_the_worklist_links_a_study_to_orthanc_explorer_by_orthancs_own_study_id(pacs, tmp_path):
    from sync.hub.web.app import create_app
    from sync.hub.web.auth import Accounts

    cfg = hub_cfg(tmp_path, pacs.dicom_port, web_url=f"http://127.0.0.1:{pacs.http_port}")
    store = HubStore.from_config(cfg)
    sop = file_on_hub(store, wire_copy("US1_UNCR.dcm", "jpegxl:2", tmp_path)[0])
    study = store.query("SELECT study_uid FROM instances WHERE sop_instance_uid = ?", [sop])[0]["study_uid"]
    fwd = forward.Forwarder(cfg, store)
    fwd.tmp_dir.mkdir(parents=True, exist_ok=True)
    assert fwd.step() == 1
    req = urllib.request.Request(f"http://127.0.0.1:{pacs.http_port}/tools/lookup", data=study.encode())
    with urllib.request.urlopen(req, timeout=10) as rsp:
        orthanc_id = next(r["ID"] for r in json.loads(rsp.read()) if r["Type"] == "Study")
    Accounts(store).add_user("benali", "correct horse battery")
    app = create_app(cfg, store)
    c = app.test_client()
    import re as _re

    page = c.get("/login").get_data(as_text=True)
    pre = _re.search(r'name="pre" value="([^"]+)"', page).group(1)
    c.post("/login", data={"username": "benali", "password": "correct horse battery", "pre": pre})
    html = c.get(f"/study/{study}").get_data(as_text=True)
    assert f"/app/explorer.html#study?uuid={orthanc_id}" in html
    store.close()
