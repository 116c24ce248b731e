"""Test helpers: real `wasla run` and `wasla-hub run` processes with their own config, data folder, ports, model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import harness
from modelfactory import make_tiny_package

REPO = Path(__file__).resolve().parent.parent


def write_box_config(tmp: Path, *, models_dir: Path, trusted: Path, extra: str = "", broker_port: int = 1) -> Path:
    port = harness.free_port()
    cfg = tmp / "box.toml"
    cfg.write_text(f"""
[box]
id = "test-box"
data_dir = "{tmp / 'data'}"
[dicom]
port = {port}
bind = "127.0.0.1"
[models]
dir = "{models_dir}"
trusted_keys = ["{trusted}"]
[inference]
backend = "onnxruntime"
threads = 1
warmup = 1
[storage]
min_free_mb = 16
[sync]
broker_port = {broker_port}
{extra}
""")
    return cfg


def tiny_models(tmp: Path) -> tuple[Path, Path]:
    models_dir = tmp / "models"
    _folder, pub = make_tiny_package(models_dir, key_dir=tmp / "keys")
    return models_dir, pub


class BoxProcess:
    def __init__(self, cfg: Path):
        self.cfg = cfg
        self.port = int(next(l.split("=")[1] for l in cfg.read_text().splitlines() if l.startswith("port")))
        self.proc: subprocess.Popen | None = None
        self.log_path = cfg.parent / "daemon.log"

    def start(self, env: dict | None = None) -> "BoxProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "--config", str(self.cfg), "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        harness.wait_for_port(self.port, proc=self.proc, timeout=90)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            return self.proc.wait(timeout)
        return self.proc.returncode if self.proc else 0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "edge.cli", "--config", str(self.cfg), *args],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"wasla {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    def settled(self, expected: int) -> bool:
        st = self.cli_json("status")["states"]
        return st["received"] + st["processing"] == 0 and sum(st.values()) >= expected

    def daemon_log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Stopping:
    """Anything with a stop function, for the `parts` fixture's teardown."""

    def __init__(self, stop):
        self.stop = stop


class HubProcess:
    """`wasla-hub run` as a real process."""

    def __init__(self, root: Path, data_dir: Path, broker_port: int, min_free_mb: int = 8):
        self.root = root
        self.cfg = root / "hub.toml"
        self.cfg.write_text(f'[hub]\nid = "hub-1"\ndata_dir = "{data_dir}"\n[broker]\nport = {broker_port}\n'
                            f'keepalive_seconds = 10\n[receiver]\nmin_free_mb = {min_free_mb}\n')
        self.log_path = root / "hub.log"
        self.proc = None

    def start(self) -> "HubProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "sync.hub.cli", "--config", str(self.cfg), "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ))
        return self

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
