"""Process helpers shared by the demo, the benchmarks and the tests: free ports, socket waits, a private Mosquitto."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge.errors import WaslaError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise WaslaError(f"process exited with {proc.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise WaslaError(f"{host}:{port} did not open within {timeout:.0f} s")


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise WaslaError(f"timed out after {timeout:.0f} s waiting for {what}")


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise WaslaError("mosquitto is not installed (apt-get install mosquitto)")


class Mosquitto:
    """A private broker on its own port and folder, never the system one; kill() simulates a crash."""

    def __init__(self, workdir: Path | None = None, port: int | None = None, extra_conf: str = ""):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="wasla-mqtt-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None

    def write_conf(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nautosave_interval 1\nset_tcp_nodelay true\n"
            f"max_queued_messages 10000\n{self.extra_conf}\n")
        return conf

    def start(self) -> "Mosquitto":
        conf = self.write_conf()
        self.log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc, timeout=15)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wasla_command() -> list[str]:
    """The CLI of this interpreter's install, so subprocesses use the same virtualenv."""
    return [sys.executable, "-m", "edge.cli"]


def storescu(port: int, files: list[Path], *, called: str = "WASLA", calling: str = "MODALITY", host: str = "127.0.0.1",
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Send with dcmtk's storescu, proposing each file's own transfer syntax (no re-encoding by the sender)."""
    exe = shutil.which("storescu")
    if not exe:
        raise WaslaError("dcmtk storescu is not installed (apt-get install dcmtk)")
    # -R proposes exactly the SOP class + transfer syntax pairs the files carry, so compressed files travel as they are.
    cmd = [exe, "-aet", calling, "-aec", called, "-R", host, str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
