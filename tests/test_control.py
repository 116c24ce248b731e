"""The daemon's control channel: `wasla sync --now` asks the running daemon over a Unix socket and hears its answer."""
from __future__ import annotations

import json
import os
import socket
import stat

import pytest

import harness
from boxproc import BoxProcess, tiny_models, write_box_config
from edge.control import ControlServer, NoDaemonError, ask, socket_path


def test_the_channel_answers_known_commands_refuses_others_and_says_when_no_daemon_listens(tmp_path):
    with pytest.raises(NoDaemonError):
        ask(tmp_path, "sync-now")
    calls = []
    server = ControlServer(tmp_path, {"sync-now": lambda: calls.append(1) or {"queue_depth": 3}}).start()
    try:
        assert stat.S_IMODE(os.stat(socket_path(tmp_path)).st_mode) == 0o660
        assert ask(tmp_path, "sync-now") == {"ok": True, "queue_depth": 3} and calls == [1]
        assert ask(tmp_path, "rm -rf /")["ok"] is False and calls == [1]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # garbage, then a flood: still answered
            raw.connect(str(socket_path(tmp_path)))
            raw.sendall(b"\xff{not json" + b"x" * 10000 + b"\n")
            assert json.loads(raw.makefile().readline())["ok"] is False
        assert ask(tmp_path, "sync-now")["ok"] is True  # the channel outlived the bad client
    finally:
        server.stop()
    assert not socket_path(tmp_path).exists()
    with pytest.raises(NoDaemonError):
        ask(tmp_path, "sync-now")


def test_sync_now_reaches_the_running_daemon_and_says_so_when_none_runs(tmp_path):
    models_dir, pub = tiny_models(tmp_path)
    # extra lands in the [sync] table: sync on, towards a broker that is not there (port 1)
    box = BoxProcess(write_box_config(tmp_path, models_dir=models_dir, trusted=pub, extra="enabled = true\n"))
    out = box.cli("sync", "--now")
    assert "No daemon is running" in out.stdout
    box.start()
    try:
        harness.wait_until(lambda: socket_path(tmp_path / "data").exists(), timeout=60, what="the control socket")
        got = box.cli_json("sync", "--now")
        assert got["nudged"]["ok"] is True and got["nudged"]["connected"] is False  # broker port 1: offline
        assert "Nudged the daemon." in box.cli("sync", "--now").stdout
        harness.wait_until(lambda: "nudged: heartbeat now" in box.daemon_log(), timeout=10, what="the daemon's log")
    finally:
        box.terminate()
    assert not socket_path(tmp_path / "data").exists()
