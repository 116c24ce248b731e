"""The daemon's control channel: a Unix socket in the data folder on which the technician's CLI asks for things now.

`wasla sync --now` used to touch a file whose mtime the uploader polled: it could not tell whether a daemon heard it.
Over the socket the CLI gets an answer (what the daemon did, or that none is running). One JSON line each way,
bounded in size and time; the socket is the daemon user's and its group's only (0660), and a command it does not
know is answered with an error, never obeyed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from sync.core.errors import WaslaError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096
TIMEOUT_S = 5.0


class NoDaemonError(WaslaError):
    """Nothing listens on the control socket: the daemon is not running (or runs with another data folder)."""

    exit_code = 3


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


class ControlServer:
    """Answers one JSON request per connection: {"cmd": name} -> handlers[name]() (a dict) or {"error": ...}."""

    def __init__(self, data_dir: Path, handlers: dict[str, Callable[[], dict]]):
        self.path = socket_path(data_dir)
        self.handlers = handlers
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ControlServer":
        self.path.unlink(missing_ok=True)  # a socket file left by a daemon that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)  # created 0660: bind() has no mode argument
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._sock.accept()  # type: ignore[union-attr]
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with conn:
                try:
                    self._answer(conn)
                except Exception:  # noqa: BLE001 - one bad client must not end the channel
                    log.exception("control request failed")

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT_S)
        data = b""
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data.split(b"\n", 1)[0][:MAX_REQUEST])
            cmd = request.get("cmd") if isinstance(request, dict) else None
        except ValueError:
            cmd = None
        handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
        if handler is None:
            reply = {"ok": False, "error": f"unknown command {str(cmd)[:40]!r}"}
        else:
            log.info("control: %s", cmd)
            reply = {"ok": True, **handler()}
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(2)
        self.path.unlink(missing_ok=True)


def ask(data_dir: Path, cmd: str, timeout: float = TIMEOUT_S) -> dict:
    """Send one command to the running daemon and return its answer; NoDaemonError when none listens."""
    path = socket_path(data_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise NoDaemonError(f"no daemon answers on {path} ({type(err).__name__})") from None
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while b"\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data.split(b"\n", 1)[0])
    except ValueError as err:
        raise WaslaError(f"the daemon's answer on {path} is not JSON") from err
