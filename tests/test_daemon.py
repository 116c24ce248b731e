"""The box daemon as a real process: storescu in, triage, CLI out; kill -9, bad input, SIGTERM, systemd notify."""
from __future__ import annotations

import re
import socket
import sqlite3
import subprocess
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from boxproc import BoxProcess, tiny_models, write_box_config
import harness
import samples

pytestmark = pytest.mark.skipif(not harness.shutil.which("storescu"), reason="dcmtk storescu not installed")


@pytest.fixture
def box(tmp_path):
    models_dir, pub = tiny_models(tmp_path)
    b = BoxProcess(write_box_config(tmp_path, models_dir=models_dir, trusted=pub)).start()
    yield b
    if b.proc.poll() is None:
        b.proc.kill()
        b.proc.wait(10)


def test_storescu_studies_are_triaged_and_shown_by_the_cli(box, tmp_path):
    files = [samples.fresh_copy(samples.sample_path(n), tmp_path / "in" / n)
             for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "US1_J2KR.dcm", "OBXXXX1A_rle.dcm")]
    sent = harness.storescu(box.port, files)
    assert sent.returncode == 0, sent.stderr
    harness.wait_until(lambda: box.settled(4), timeout=120, what="triage")
    studies = {s["study_uid"]: s for s in box.cli_json("results")}
    chest = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    us = pydicom.dcmread(files[2], stop_before_pixels=True).StudyInstanceUID
    assert studies[chest]["label"] in ("normal", "review", "urgent")
    # no model routes ultrasound: kept and flagged for a human with the true reason (a model is installed)
    assert studies[us]["label"] == "review"
    shown = box.cli_json("show", us)
    assert shown["instances"][0]["results"][0]["reasons"][0] == {"code": "no_matching_model", "modality": "US"}
    assert "no installed model reads this kind of image (US)" in box.cli("--lang", "en", "show", us).stdout
    detail = box.cli_json("show", chest)
    res = detail["instances"][0]["results"][0]
    assert res["model"] == "tiny-cxr" and res["backend"].startswith("onnxruntime")
    assert set(res["timings"]) >= {"read_ms", "decode_ms", "preprocess_ms", "infer_ms"}
    assert "tiny-cxr" in box.cli("show", chest).stdout


def _acknowledged(storescu_output: str, files: list) -> list:
    """Files storescu saw a Success response for (its -v log alternates 'Sending file' and responses)."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill_9_during_a_burst_loses_no_acknowledged_instance_and_triages_each_once(box, tmp_path):
    src = samples.sample_path("OBXXXX1A.dcm")
    study = generate_uid()
    files = [samples.fresh_copy(src, tmp_path / "burst" / f"{i:03d}.dcm", study_uid=study) for i in range(60)]
    sender = subprocess.Popen([harness.shutil.which("storescu"), "-v", "-aec", "WASLA", "-R", "127.0.0.1",
                               str(box.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    db = box.cfg.parent / "data" / "wasla.db"
    harness.wait_until(lambda: db.exists() and sqlite3.connect(db).execute(
        "SELECT COUNT(*) FROM instances").fetchone()[0] >= 15, timeout=60, interval=0.02, what="first stores")
    box.kill9()
    out, _ = sender.communicate(timeout=60)
    acked = _acknowledged(out, files)
    # 15 rows were committed before the kill; the last responses may have died with the daemon.
    assert 10 <= len(acked) < 60, out[-2000:]
    box.start()
    harness.wait_until(lambda: box.settled(len(acked)), timeout=180, what="triage after restart")
    con = sqlite3.connect(db)
    stored = {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances WHERE state = 'triaged'")}
    for f in acked:
        assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID in stored
    per_instance = con.execute("SELECT instance_id, COUNT(*) FROM results GROUP BY instance_id HAVING COUNT(*) > 1").fetchall()
    assert per_instance == []
    dupes = con.execute("SELECT sop_instance_uid, COUNT(*) FROM instances GROUP BY sop_instance_uid HAVING COUNT(*) > 1").fetchall()
    assert dupes == []


def _bad_inputs(tmp_path) -> dict:
    d = tmp_path / "bad"
    d.mkdir()
    good = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), d / "good.dcm")
    (d / "empty.dcm").write_bytes(b"")
    (d / "truncated.dcm").write_bytes(good.read_bytes()[:3000])
    (d / "notes.txt").write_text("not an image\n" * 20)
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(d / "nopixels.dcm")
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 60000
    ds.save_as(d / "huge.dcm")
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder on the box
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 500])
    ds["PixelData"].VR = "OB"
    ds.save_as(d / "mpeg.dcm", enforce_file_format=True)
    good.unlink()
    return {p.name: p for p in d.iterdir()}


def test_every_kind_of_bad_input_is_quarantined_with_its_reason_and_the_daemon_keeps_working(box, tmp_path):
    bad = _bad_inputs(tmp_path)
    out = box.cli("ingest", *map(str, bad.values()), "--json", check=False)
    assert out.returncode == 0, out.stderr
    harness.wait_until(lambda: box.settled(len(bad)), timeout=120, what="bad inputs settled")
    reasons = [q["reason"] for q in box.cli_json("results", "--quarantined")]
    assert len(reasons) == len(bad), reasons
    text = " | ".join(reasons).lower()
    for word in ("empty", "not a dicom", "pixel data", "1.2.840.10008.1.2.4.100"):
        assert word in text, (word, reasons)
    assert box.proc.poll() is None
    good = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), tmp_path / "good-after.dcm")
    assert harness.storescu(box.port, [good]).returncode == 0
    uid = pydicom.dcmread(good, stop_before_pixels=True).StudyInstanceUID
    harness.wait_until(lambda: box.cli_json("show", uid)["instances"][0]["state"] == "triaged", timeout=60,
                       what="good study after bad ones")


def test_sigterm_stops_the_daemon_cleanly(box):
    assert box.terminate() == 0
    assert "stopped" in box.daemon_log()


def test_systemd_readiness_and_watchdog_are_notified(tmp_path):
    models_dir, pub = tiny_models(tmp_path)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    b = BoxProcess(write_box_config(tmp_path, models_dir=models_dir, trusted=pub))
    b.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    try:
        got = set()
        deadline = time.monotonic() + 60
        while not {"READY=1", "WATCHDOG=1"} <= got and time.monotonic() < deadline:
            got |= set(sock.recv(4096).decode().split("\n"))
        assert {"READY=1", "WATCHDOG=1"} <= got
    finally:
        b.terminate()
        sock.close()


def test_a_dose_report_is_acknowledged_kept_untriaged_and_leaves_the_study_label_alone(box, tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset

    image = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), tmp_path / "image.dcm")
    study = pydicom.dcmread(image, stop_before_pixels=True).StudyInstanceUID
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    rdsr = FileDataset(str(tmp_path / "rdsr.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    rdsr.SOPClassUID, rdsr.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    rdsr.StudyInstanceUID, rdsr.SeriesInstanceUID, rdsr.Modality = study, generate_uid(), "SR"
    rdsr.save_as(tmp_path / "rdsr.dcm", enforce_file_format=True)

    sent = harness.storescu(box.port, [image, tmp_path / "rdsr.dcm"])
    assert sent.returncode == 0, sent.stderr  # Success for the report too: nothing for the modality to retry
    harness.wait_until(lambda: box.settled(2), timeout=60, what="triage")
    shown = box.cli_json("show", study)
    by_modality = {i["modality"]: i for i in shown["instances"] if i["source"] != "wasla"}  # not the box's own SR
    assert by_modality["SR"]["state"] == "triaged" and by_modality["SR"]["label"] is None
    assert by_modality["SR"]["results"][0]["reasons"] == [{"code": "not_an_image"}]
    assert shown["label"] == by_modality["CR"]["label"] and shown["n_instances"] == 2
    assert box.cli_json("results", "--quarantined") == []
