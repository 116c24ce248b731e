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

from sync.core.errors import WaslaError


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


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: how the demo, benchmarks and tests end the processes they started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


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
        # Started as root, Mosquitto drops to its own user, which cannot write this root-owned folder: every
        # autosave failed ("Permission denied") and no test exercised persistence. This broker stays the caller's.
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
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
        stop_process(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wasla_command() -> list[str]:
    """The CLI of this interpreter's install, so subprocesses use the same virtualenv."""
    return [sys.executable, "-m", "edge.cli"]


# storescu's option that proposes (first) a file's own transfer syntax; absent = its default uncompressed proposal.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": ["-xi"], "1.2.840.10008.1.2.2": ["-xb"], "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.4.50": ["-xy"], "1.2.840.10008.1.2.4.51": ["-xx"], "1.2.840.10008.1.2.4.57": ["-xs"],
    "1.2.840.10008.1.2.4.70": ["-xs"], "1.2.840.10008.1.2.4.80": ["-xt"], "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.4.91": ["-xw"], "1.2.840.10008.1.2.1.99": ["-xd"],
}


def storescu(port: int, files: list[Path], *, called: str = "WASLA", calling: str = "MODALITY", host: str = "127.0.0.1",
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Send with dcmtk's storescu, each file in its own transfer syntax (no re-encoding by the sender).

    storescu -R folds every syntax of one SOP class into one presentation context, and the SCP may then accept a
    syntax the file is not in; one association per transfer syntax keeps every file as it is, like a modality."""
    import pydicom

    exe = shutil.which("storescu")
    if not exe:
        raise WaslaError("dcmtk storescu is not installed (apt-get install dcmtk)")
    groups: dict[str, list[str]] = {}
    for f in files:
        try:
            ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - let storescu itself report an unreadable file
            ts = "?"
        groups.setdefault(ts, []).append(str(f))
    outs = [subprocess.run([exe, "-aet", calling, "-aec", called, *STORESCU_PROPOSE.get(ts, []), host, str(port), *group],
                           capture_output=True, text=True, timeout=timeout) for ts, group in groups.items()]
    return subprocess.CompletedProcess(outs[0].args if outs else [exe], max((o.returncode for o in outs), default=0),
                                       "".join(o.stdout for o in outs), "".join(o.stderr for o in outs))
