"""The DICOM door end to end: a real StoreSCP on an ephemeral port, a real Store, dcmtk's storescu/echoscu as senders."""
from __future__ import annotations

import sqlite3
import subprocess

import pydicom
import pytest
from pydicom.uid import generate_uid

from harness import wait_for_port
from edge.scp import StoreSCP
from edge.store import Store

pytestmark = pytest.mark.timeout(120)

CALLED_AE = "WASLA"


def storescu(port: int, *files, flags=(), aet: str = "MODALITY") -> subprocess.CompletedProcess:
    cmd = ["storescu", "-v", "-ta", "10", "-td", "30", "-aet", aet, "-aec", CALLED_AE, *flags,
           "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def echoscu(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", CALLED_AE, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def start_scp():
    """start_scp(cfg) -> (scp, store): a listening SCP on a fresh store, both closed after the test."""
    running = []

    def _start(cfg):
        store = Store.from_config(cfg)
        scp = StoreSCP(cfg, store)
        scp.start()
        running.append((scp, store))
        wait_for_port(scp.port, timeout=15)
        return scp, store

    yield _start
    for scp, store in running:
        scp.stop()
        store.close()


def _rows(cfg) -> list[dict]:
    # A separate connection, as another process would open it: sees only committed rows.
    con = sqlite3.connect(cfg.db_path)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM instances ORDER BY id")]
    finally:
        con.close()


def _nothing_on_disk(store) -> bool:
    return not list(store.iter_spool_files()) and not list(store.tmp_dir.iterdir())


# (sample, storescu option proposing the file's own transfer syntax)
SAMPLES = [
    ("RG1_UNCR.dcm", []),
    ("US1_J2KR.dcm", ["-xv"]),  # JPEG 2000 lossless
    ("OBXXXX1A_rle.dcm", ["-xr"]),  # RLE lossless
    ("MR_small_jpeg_ls_lossless.dcm", ["-xt"]),  # JPEG-LS lossless
    ("SC_rgb_jpeg_dcmtk.dcm", ["-xy"]),  # JPEG baseline
]


@pytest.mark.parametrize("name,flags", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_storescu_instance_is_acknowledged_only_after_row_is_committed(start_scp, cfg, sample, name, flags):
    scp, store = start_scp(cfg)
    original = pydicom.dcmread(sample(name))

    out = storescu(scp.port, sample(name), flags=flags)

    assert out.returncode == 0, out.stdout + out.stderr
    # storescu has exited, so the Success response is in: the row must already be visible to another connection.
    rows = _rows(cfg)
    assert [(r["state"], r["sop_instance_uid"], r["calling_ae"], r["source"]) for r in rows] == [
        ("received", original.SOPInstanceUID, "MODALITY", "dicom")]
    stored = pydicom.dcmread(store.spool_dir / rows[0]["path"])
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    # Kept exactly as sent: same transfer syntax, pixel bytes untouched (no decode / re-encode on the way).
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID == rows[0]["transfer_syntax"]
    assert stored.PixelData.rstrip(b"\0") == original.PixelData.rstrip(b"\0")
    assert not list(store.tmp_dir.iterdir())


def test_same_instance_sent_twice_is_acknowledged_twice_and_stored_once(start_scp, cfg, sample):
    scp, store = start_scp(cfg)
    first = storescu(scp.port, sample("RG1_UNCR.dcm"))
    again = storescu(scp.port, sample("RG1_UNCR.dcm"))

    assert first.returncode == 0 and again.returncode == 0, again.stdout + again.stderr
    assert len(_rows(cfg)) == 1
    assert len(list(store.iter_spool_files())) == 1


def test_calling_ae_not_on_the_allowlist_is_rejected_and_nothing_is_stored(start_scp, make_cfg, sample):
    cfg = make_cfg(dicom={"allowed_calling_aes": ["CR_ROOM1"]})
    scp, store = start_scp(cfg)

    refused = storescu(scp.port, sample("RG1_UNCR.dcm"), aet="INTRUDER")

    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert _rows(cfg) == [] and _nothing_on_disk(store)
    allowed = storescu(scp.port, sample("RG1_UNCR.dcm"), aet="CR_ROOM1")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_bad_datasets_are_quarantined_with_reason_and_the_modality_sees_a_failure(start_scp, cfg, sample, tmp_path):
    scp, store = start_scp(cfg)
    no_pixels = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = generate_uid()
    no_pixels.save_as(tmp_path / "nopixels.dcm")
    huge = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    huge.SOPInstanceUID = generate_uid()
    huge.Rows = huge.Columns = 60000
    huge.save_as(tmp_path / "huge.dcm")

    out_no_pixels = storescu(scp.port, tmp_path / "nopixels.dcm")
    out_huge = storescu(scp.port, tmp_path / "huge.dcm")

    assert out_no_pixels.returncode != 0 and out_huge.returncode != 0
    assert "Error: DataSetDoesNotMatchSOPClass" in out_no_pixels.stdout + out_no_pixels.stderr  # 0xA900
    assert "Error: CannotUnderstand" in out_huge.stdout + out_huge.stderr  # 0xC000
    rows = {r["sop_instance_uid"]: r for r in _rows(cfg)}
    assert rows[no_pixels.SOPInstanceUID]["state"] == "quarantined"
    assert "no pixel data" in rows[no_pixels.SOPInstanceUID]["reason"].lower()
    assert rows[huge.SOPInstanceUID]["state"] == "quarantined"
    assert "exceeds the limit" in rows[huge.SOPInstanceUID]["reason"]
    assert not list(store.iter_spool_files())
    assert echoscu(scp.port).returncode == 0
    assert storescu(scp.port, sample("RG1_UNCR.dcm")).returncode == 0


def test_nearly_full_disk_answers_out_of_resources_and_stores_nothing(start_scp, make_cfg, sample):
    cfg = make_cfg(storage={"min_free_mb": 10**12})
    scp, store = start_scp(cfg)

    out = storescu(scp.port, sample("RG1_UNCR.dcm"))

    assert out.returncode != 0
    assert "Refused: OutOfResources" in out.stdout + out.stderr  # 0xA700
    assert _rows(cfg) == [] and _nothing_on_disk(store)
    assert not list(store.quarantine_dir.iterdir())


def test_unexpected_failure_answers_a_failure_status_and_the_server_keeps_running(start_scp, cfg, sample,
                                                                                  monkeypatch):
    scp, store = start_scp(cfg)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(store, "add_instance", broken)
    out = storescu(scp.port, sample("RG1_UNCR.dcm"))

    assert out.returncode != 0
    assert "Error: CannotUnderstand" in out.stdout + out.stderr  # 0xC001, in the 0xC000 range
    assert _rows(cfg) == [] and not list(store.tmp_dir.iterdir())
    monkeypatch.undo()
    assert echoscu(scp.port).returncode == 0
    assert storescu(scp.port, sample("RG1_UNCR.dcm")).returncode == 0
    assert [r["state"] for r in _rows(cfg)] == ["received"]


def test_port_zero_binds_an_ephemeral_port_that_answers_echo(start_scp, cfg):
    scp, _ = start_scp(cfg)

    assert scp.port != 0
    assert echoscu(scp.port).returncode == 0
