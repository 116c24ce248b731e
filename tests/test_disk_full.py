"""A full disk pauses the box and the hub with a clear "disk full", and both resume by themselves when space returns."""
from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from boxproc import BoxProcess, HubProcess, Stopping, tiny_models, write_box_config
import harness
from harness import wait_until
from test_scp import storescu
from test_sync_support import assert_hub_holds_exactly, make_cr

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not harness.shutil.which("storescu"), reason="dcmtk storescu not installed")]

SYNC = ('enabled = true\nchunk_bytes = 16384\nack_timeout_seconds = 5.0\ncodecs = ["jpegls"]\n'
        'keepalive_seconds = 10\n')


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(name, mb) -> a folder on its own tmpfs of that size (a clinic box's nearly full SD card)."""
    mounted = []

    def _mount(name: str, mb: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield _mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros until the filesystem refuses: nothing left, not even for SQLite's journal."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (1 << 20, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        return dict(c.execute("SELECT state, COUNT(*) FROM instances WHERE COALESCE(source, '') != 'wasla' "
                              "GROUP BY state").fetchall())


def test_box_on_a_full_disk_refuses_new_studies_keeps_running_and_sends_everything_once_space_returns(
        tmp_path, small_disk, parts):
    broker = harness.Mosquitto(tmp_path / "mqtt").start()
    parts.append(broker)
    hub = HubProcess(tmp_path, tmp_path / "hub", broker.port).start()
    parts.append(hub)
    data = small_disk("data", 64)
    models_dir, pub = tiny_models(tmp_path)
    cfg = write_box_config(tmp_path, models_dir=models_dir, trusted=pub, broker_port=broker.port, extra=SYNC)
    box = BoxProcess(cfg).start()
    parts.append(Stopping(box.terminate))
    first = [make_cr(tmp_path / "in" / f"a{i}.dcm", seed=i, side=200) for i in range(2)]
    assert storescu(box.port, *first).returncode == 0
    filler = fill(data)  # the disk fills while the first study is being triaged, packed and sent
    refused = storescu(box.port, make_cr(tmp_path / "in" / "refused.dcm", seed=9, side=200))
    assert "Refused: OutOfResources" in refused.stdout + refused.stderr
    wait_until(lambda: "disk full" in box.daemon_log(), timeout=30, what="the box saying disk full")
    assert box.proc.poll() is None
    filler.unlink()
    later = [make_cr(tmp_path / "in" / f"b{i}.dcm", seed=20 + i, side=200) for i in range(2)]
    wait_until(lambda: storescu(box.port, *later).returncode == 0, timeout=60, what="stores accepted again")
    db = data / "wasla.db"
    wait_until(lambda: _states(db) == {"acknowledged": 4}, timeout=120, what="all four acknowledged")
    assert_hub_holds_exactly(tmp_path, [*first, *later])
    assert box.proc.poll() is None


def test_hub_that_starts_on_a_full_disk_waits_says_disk_full_and_receives_once_space_returns(
        tmp_path, small_disk, parts):
    broker = harness.Mosquitto(tmp_path / "mqtt").start()
    parts.append(broker)
    hub_dir = small_disk("hub", 48)
    # A first start lays out the index; then the disk fills while the hub is down.
    hub = HubProcess(tmp_path, hub_dir, broker.port).start()
    wait_until(lambda: "started" in hub.text(), timeout=60, what="hub up")
    hub.stop()
    filler = fill(hub_dir)
    hub = HubProcess(tmp_path, hub_dir, broker.port).start()
    parts.append(hub)
    wait_until(lambda: "disk full" in hub.text(), timeout=60, what="the hub saying disk full")
    assert "disk I/O error" not in hub.text()
    models_dir, pub = tiny_models(tmp_path)
    cfg = write_box_config(tmp_path, models_dir=models_dir, trusted=pub, broker_port=broker.port, extra=SYNC)
    box = BoxProcess(cfg).start()
    parts.append(Stopping(box.terminate))
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i, side=200) for i in range(2)]
    assert storescu(box.port, *files).returncode == 0
    harness.time.sleep(3)
    assert hub.proc.poll() is None  # waiting, not exiting and being restarted in a loop
    filler.unlink()
    db = tmp_path / "data" / "wasla.db"
    wait_until(lambda: _states(db) == {"acknowledged": 2}, timeout=120, what="both acknowledged")
    assert_hub_holds_exactly(tmp_path, files)


def test_hub_disk_filling_mid_upload_pauses_receiving_and_resumes_by_itself(tmp_path, small_disk, parts):
    broker = harness.Mosquitto(tmp_path / "mqtt").start()
    parts.append(broker)
    hub_dir = small_disk("hub", 48)
    hub = HubProcess(tmp_path, hub_dir, broker.port).start()
    parts.append(hub)
    wait_until(lambda: "started" in hub.text(), timeout=60, what="hub up")
    models_dir, pub = tiny_models(tmp_path)
    cfg = write_box_config(tmp_path, models_dir=models_dir, trusted=pub, broker_port=broker.port, extra=SYNC)
    box = BoxProcess(cfg).start()
    parts.append(Stopping(box.terminate))
    filler = fill(hub_dir)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i, side=300) for i in range(3)]
    assert storescu(box.port, *files).returncode == 0
    wait_until(lambda: "receiving paused" in hub.text(), timeout=60, what="the hub pausing")
    assert hub.proc.poll() is None
    filler.unlink()
    db = tmp_path / "data" / "wasla.db"
    wait_until(lambda: _states(db) == {"acknowledged": 3}, timeout=180, what="all acknowledged after space returned")
    assert "resumed" in hub.text()
    assert_hub_holds_exactly(tmp_path, files)
