"""Proof of progress for the daemons' loops and callbacks, read by the systemd watchdog feed (box and hub)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class Beat:
    """One loop's pulse: `tick()` every pass; `busy()` around a callback that may block (a message handler).

    A thread that is alive but stuck (a decode that never returns, a lock never released) stops ticking, so the
    watchdog is no longer fed and systemd restarts the service: liveness comes from work done, not from a timer."""

    def __init__(self, name: str, max_silence: float = 120.0, max_busy: float = 300.0):
        self.name = name
        self.max_silence = max_silence
        self.max_busy = max_busy
        self.last = time.monotonic()
        self._busy_since: float | None = None
        self._lock = threading.Lock()

    def tick(self) -> None:
        self.last = time.monotonic()

    @contextmanager
    def busy(self):
        with self._lock:
            self._busy_since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._busy_since = None
            self.tick()

    def problem(self, thread: threading.Thread | None = None, *, idle_ok: bool = False) -> str | None:
        """None while healthy; else one line saying what is wrong (logged, and put in systemd's STATUS)."""
        now = time.monotonic()
        if thread is not None and not thread.is_alive():
            return f"{self.name}: thread has stopped"
        with self._lock:
            since = self._busy_since
        if since is not None and now - since > self.max_busy:
            return f"{self.name}: one step has been running for {now - since:.0f} s"
        if not idle_ok and since is None and now - self.last > self.max_silence:
            return f"{self.name}: no progress for {now - self.last:.0f} s"
        return None


def paho_thread(client) -> threading.Thread | None:
    """paho's network thread, to be taken right after loop_start(): paho forgets it when it dies, we must not."""
    return getattr(client, "_thread", None)


def problems(parts) -> list[str]:
    """Every part's health problems; a part without a `problems()` method has nothing to report."""
    out: list[str] = []
    for part in parts:
        check = getattr(part, "problems", None)
        if check is None:
            continue
        try:
            out.extend(check())
        except Exception as err:  # noqa: BLE001 - a broken check is itself a problem, not a crash
            out.append(f"{type(part).__name__}: health check failed ({type(err).__name__})")
    return out
