"""Liveness comes from progress: a dead or stuck loop or MQTT thread stops the systemd watchdog feed (box and hub)."""
from __future__ import annotations

import threading
import time

import pytest

from harness import wait_until
from sync.core.liveness import Beat, problems
from edge.watch import FolderWatcher
from test_sync_support import Box, RawBox, make_cr, start_hub, triage

# The two tests that break paho's thread on purpose leave pytest's "unhandled thread exception" behind.
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")]


def test_a_beat_reports_a_dead_thread_a_silent_loop_and_a_step_that_never_returns():
    beat = Beat("loop", max_silence=0.2, max_busy=0.2)
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    assert "thread has stopped" in beat.problem(t)
    time.sleep(0.3)
    assert "no progress" in beat.problem()
    assert beat.problem(idle_ok=True) is None
    with beat.busy():
        time.sleep(0.3)
        assert "one step has been running" in beat.problem(idle_ok=True)
    assert beat.problem() is None  # leaving the step is progress


def test_a_watch_folder_scan_that_hangs_is_reported_and_a_healthy_one_is_not(cfg):
    watcher = FolderWatcher(cfg, store=None)
    hang = threading.Event()
    watcher.scan_once = lambda: hang.wait(30)
    watcher.beat.max_silence = 0.5
    watcher.start()
    try:
        wait_until(lambda: problems([watcher]), timeout=10, what="stuck scan reported")
        assert "watch folder: no progress" in problems([watcher])[0]
    finally:
        hang.set()
        watcher.stop()


def test_hub_reports_its_dead_mqtt_thread_and_is_healthy_while_it_receives(tmp_path, broker, parts):
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    raw = RawBox(broker.port)
    raw.pub("heartbeat", b"[" * 2048)  # deep JSON: dead-lettered, the thread lives
    wait_until(lambda: hub.store.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"] == 1, timeout=10,
               what="poison message dead-lettered")
    assert problems([hub]) == []

    # A library callback that raises (the failure mode of the past) ends paho's thread: the watchdog must notice.
    def boom(*_a):
        raise RuntimeError("callback bug")

    hub.client.on_message = boom
    raw.pub("heartbeat", b"{}")
    wait_until(lambda: problems([hub]), timeout=10, what="dead thread reported")
    assert "hub receiver: thread has stopped" in problems([hub])


def test_box_uploader_is_healthy_after_poison_down_messages_and_reports_a_dead_mqtt_thread(tmp_path, broker, parts):
    box = Box(tmp_path, broker.port).start()
    parts.append(box)
    hub = start_hub(tmp_path, broker.port)
    parts.append(hub)
    wait_until(lambda: box.uploader.connected, timeout=10, what="box connected")
    raw = RawBox(broker.port, device="poisoner")
    raw.c.publish("wasla/v1/box-a/down/ack", b"[" * 4096, qos=1).wait_for_publish(5)
    triage(box.store, make_cr(tmp_path / "after.dcm", seed=3), "urgent")
    wait_until(lambda: box.states().get("acknowledged", 0) == 1, timeout=60, what="study after the poison")
    assert problems([box.uploader]) == []

    def boom(*_a):
        raise RuntimeError("callback bug")

    box.uploader.client.on_message = boom
    raw.c.publish("wasla/v1/box-a/down/ack", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: problems([box.uploader]), timeout=10, what="dead thread reported")
    assert any("upload messages: thread has stopped" in p for p in problems([box.uploader]))
