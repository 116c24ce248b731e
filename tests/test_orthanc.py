"""A real Orthanc (Debian package `orthanc`) receives the box's SR and SC by `wasla send` and lists them over REST."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from boxproc import REPO, BoxProcess, tiny_models, write_box_config
import harness
import samples
from edge.config import load
from edge.store import Store
from test_results_dicom import add_image, triage_next


def orthanc_binary() -> str | None:
    for cand in (shutil.which("Orthanc"), shutil.which("orthanc"), "/usr/sbin/Orthanc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


pytestmark = pytest.mark.skipif(orthanc_binary() is None,
                                reason="Orthanc is not installed (apt-get install orthanc, or scripts/setup.sh test)")


class Orthanc:
    """A private Orthanc on free ports, its index and storage in `workdir`; never the system service."""

    def __init__(self, workdir: Path, extra: dict | None = None):
        self.workdir = workdir
        self.extra = extra or {}
        self.dicom_port, self.http_port = harness.free_port(), harness.free_port()
        self.aet = "ORTHANC"

    def start(self) -> "Orthanc":
        (self.workdir / "storage").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "orthanc.json"
        conf.write_text(json.dumps({
            "Name": "wasla-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "Plugins": [], "StableAge": 1, "ConcurrentJobs": 1, **self.extra,
        }))
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([orthanc_binary(), str(conf)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        harness.wait_for_port(self.http_port, proc=self.proc, timeout=60)
        harness.wait_for_port(self.dicom_port, proc=self.proc, timeout=60)
        return self

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def instances(self) -> list[dict]:
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def stop(self) -> None:
        if getattr(self, "proc", None) is None:
            return  # never started
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


def wasla(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(cfg), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=180)


@pytest.fixture
def box_cfg(tmp_path) -> Path:
    f = tmp_path / "box.toml"
    f.write_text(f'[box]\nid = "box-orthanc"\ndata_dir = "{tmp_path / "data"}"\n[models]\n'
                 f'dir = "{tmp_path / "models"}"\ntrusted_keys = []\n[storage]\nmin_free_mb = 0\n'
                 '[dicom]\nae_title = "WASLA_BOX"\n')
    return f


def test_wasla_send_stores_sr_sc_and_images_in_orthanc_under_one_study(orthanc, box_cfg, tmp_path):
    store = Store.from_config(load(box_cfg))
    uid = generate_uid()
    image = add_image(store, tmp_path, uid, PatientID="CLINIC-0042", AccessionNumber="ACC-9")
    triage_next(store, "urgent", 0.93)
    store.close()

    out = wasla(box_cfg, "send", uid[:30], "--to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--images",
                "--json")
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    assert [s["status_name"] for s in sent] == ["Success"] * 3

    got = {i["SOPInstanceUID"]: i for i in orthanc.instances()}
    assert set(got) == {s["sop_instance_uid"] for s in sent}
    classes = sorted(i["SOPClassUID"] for i in got.values())
    assert classes == sorted([ComprehensiveSRStorage, SecondaryCaptureImageStorage, image["sop_class_uid"]])
    assert {i["StudyInstanceUID"] for i in got.values()} == {uid}
    # One Orthanc study (its id hashes Patient ID + Study UID): the results sit beside the image for the viewer.
    studies = orthanc.get("/studies")
    assert len(studies) == 1 and len(orthanc.get(f"/studies/{studies[0]}/instances")) == 3
    sr = next(i for i in got.values() if i["SOPClassUID"] == ComprehensiveSRStorage)
    assert sr["Modality"] == "SR" and sr["PatientID"] == "CLINIC-0042"


def test_wasla_send_to_a_wrong_ae_title_is_a_one_line_error(orthanc, box_cfg, tmp_path):
    store = Store.from_config(load(box_cfg))
    uid = generate_uid()
    add_image(store, tmp_path, uid)
    triage_next(store, "normal", 0.1)
    store.close()
    out = wasla(box_cfg, "send", uid, "--to", f"NOT_ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    assert out.returncode == 8 and "rejected" in out.stderr and out.stderr.strip().count("\n") == 0
    assert orthanc.get("/instances") == []


def dark_cr(dest: Path) -> Path:
    """A dark chest CR: the tiny brightness model calls it normal (p(abnormal) ~ 0.003)."""
    src = samples.fresh_copy(samples.sample_path("RG1_UNCR.dcm"), dest)
    ds = pydicom.dcmread(src)
    pixels = np.zeros((ds.Rows, ds.Columns), np.uint16)
    pixels[:40, :40] = 30000  # a small bright marker, so the display window has a range
    ds.PixelData = pixels.tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"  # the sample is MONOCHROME1: zeros would be white
    ds.WindowCenter, ds.WindowWidth = 15000, 30000
    ds.save_as(src)
    return src


@pytest.mark.skipif(not shutil.which("storescu"), reason="dcmtk storescu not installed")
def test_daemon_writes_the_sr_after_triage_without_moving_the_label_and_orthanc_gets_it(orthanc, tmp_path):
    models_dir, pub = tiny_models(tmp_path)
    box = BoxProcess(write_box_config(tmp_path, models_dir=models_dir, trusted=pub)).start()
    try:
        f = dark_cr(tmp_path / "in" / "dark.dcm")
        uid = pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
        sent = harness.storescu(box.port, [f])
        assert sent.returncode == 0, sent.stderr

        def sr_written():
            shown = box.cli_json("show", uid)
            return shown if any(i["modality"] == "SR" for i in shown["instances"]) else None

        shown = harness.wait_until(sr_written, timeout=120, what="the SR")
        assert shown["label"] == "normal" and shown["n_instances"] == 1
        sr = next(i for i in shown["instances"] if i["modality"] == "SR")
        assert sr["source"] == "wasla" and sr["state"] == "triaged" and sr["label"] is None
        # No SC without sync: it is made on demand by `wasla send`.
        assert [i["modality"] for i in shown["instances"]] == ["CR", "SR"]
        out = box.cli("send", uid, "--to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
        assert "2" in out.stdout
        assert box.cli_json("show", uid)["label"] == "normal"
    finally:
        box.terminate()
    got = orthanc.instances()
    assert sorted(i["SOPClassUID"] for i in got) == sorted([ComprehensiveSRStorage, SecondaryCaptureImageStorage])
    assert {i["StudyInstanceUID"] for i in got} == {uid}
    assert sr["sop_instance_uid"] in {i["SOPInstanceUID"] for i in got}
