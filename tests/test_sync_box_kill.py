"""A real `wasla run` killed with SIGKILL mid-upload resumes from the hub's last acknowledged chunk after restart."""
from __future__ import annotations

import json
import sqlite3

from boxproc import BoxProcess, tiny_models, write_box_config
from harness import Mosquitto, wait_until
from test_sync_support import assert_hub_holds_exactly, hub_view, make_cr, start_hub


def _db(box_cfg):
    return box_cfg.parent / "data" / "wasla.db"


def _states(db) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        # The box's own SR/SC (source "wasla") travel too; the scenario counts the modality's images.
        return dict(c.execute("SELECT state, COUNT(*) FROM instances WHERE COALESCE(source, '') != 'wasla' "
                              "GROUP BY state").fetchall())


def _confirmed_chunks(db) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        rows = c.execute("SELECT have FROM outbox WHERE kind = 'transfer'").fetchall()
    return sum(b - a + 1 for (h,) in rows for a, b in json.loads(h))


def test_box_killed_with_sigkill_mid_transfer_resumes_and_hub_holds_each_study_once(tmp_path):
    broker = Mosquitto(tmp_path / "mqtt").start()
    hub = start_hub(tmp_path, broker.port)
    models_dir, pub = tiny_models(tmp_path)
    extra = ('enabled = true\nchunk_bytes = 4096\nmax_inflight_bytes = 8192\nmax_rate_kbps = 160\n'
             'ack_timeout_seconds = 5.0\ncodecs = ["jpegls"]\nkeepalive_seconds = 10\n')
    cfg = write_box_config(tmp_path, models_dir=models_dir, trusted=pub, broker_port=broker.port, extra=extra)
    box = BoxProcess(cfg)
    try:
        box.start()
        files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i, side=200) for i in range(3)]
        box.cli("ingest", *map(str, files))
        db = _db(cfg)
        wait_until(lambda: _confirmed_chunks(db) >= 4, timeout=60, what="upload under way")
        assert _states(db).get("acknowledged", 0) < 3
        box.kill9()
        before = _confirmed_chunks(db)
        box.start()
        wait_until(lambda: _states(db).get("acknowledged", 0) == 3, timeout=90, what="all acknowledged after restart")
        assert_hub_holds_exactly(tmp_path, files)
        view = hub_view(tmp_path)
        # Resumed, not restarted: the hub saw few chunks twice (at most what was in flight at the kill).
        dups = view.query("SELECT dup_chunks FROM boxes WHERE device = 'test-box'")[0]["dup_chunks"]
        assert dups <= 6, dups
        assert before >= 4
        assert "acknowledged by the hub" in box.daemon_log()
    finally:
        box.terminate()
        hub.stop()
        broker.stop()
