"""The uplink bandwidth budget: a rate cap (token bucket), local-time windows for bulk data and a daily byte quota."""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Callable

from sync.core.diskguard import is_disk_full

log = logging.getLogger(__name__)

FLAG, BULK, TELEMETRY = "flag", "bulk", "telemetry"


def parse_window(text: str) -> tuple[int, int]:
    """"22:00-06:00" -> (minute of day start, minute of day end); end may wrap past midnight."""
    a, b = text.split("-")
    ha, ma = map(int, a.split(":"))
    hb, mb = map(int, b.split(":"))
    return ha * 60 + ma, hb * 60 + mb


def in_windows(windows: list[tuple[int, int]], when: dt.datetime) -> bool:
    if not windows:
        return True
    m = when.hour * 60 + when.minute
    for start, end in windows:
        if start == end:
            return True
        if (start < end and start <= m < end) or (start > end and (m >= start or m < end)):
            return True
    return False


class Budget:
    """Thread-safe. `allow_bulk` says whether studies may go now; `delay` paces every publish to the rate cap.

    Flags are exempt from windows, quota and waiting, but they spend tokens and bytes like anything else, so the
    bulk that follows slows down to keep the average under the cap.
    """

    def __init__(self, *, max_rate_kbps: float = 0.0, windows: list[str] | None = None, daily_quota_mb: float = 0.0,
                 urgent_ignores_budget: bool = True, load_usage: Callable[[str], dict] | None = None,
                 save_usage: Callable[[str, str, int], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.rate = max_rate_kbps * 1000 / 8  # bytes per second
        self.windows = [parse_window(w) for w in windows or []]
        self.quota = int(daily_quota_mb * 1_000_000)
        self.urgent_ignores_budget = urgent_ignores_budget
        self.clock = clock
        self._load = load_usage or (lambda day: {})
        self._save = save_usage or (lambda day, kind, n: None)
        self._lock = threading.Lock()
        # One second of burst: enough for a flag or a chunk, never enough to flood the modem's buffer.
        self.burst = max(self.rate, 1.0)
        self.tokens = self.burst
        self._last = time.monotonic()
        self._day = ""
        self._usage: dict[str, int] = {}

    @classmethod
    def from_config(cls, sync_cfg, load_usage=None, save_usage=None) -> "Budget":
        return cls(max_rate_kbps=sync_cfg.max_rate_kbps, windows=sync_cfg.bulk_windows,
                   daily_quota_mb=sync_cfg.daily_quota_mb, urgent_ignores_budget=sync_cfg.urgent_ignores_budget,
                   load_usage=load_usage, save_usage=save_usage)

    def _today(self) -> str:
        day = dt.datetime.fromtimestamp(self.clock()).strftime("%Y-%m-%d")
        if day != self._day:
            self._day = day
            loaded = self._load(day) or {}
            self._usage = {k: int(loaded.get(k, 0) or 0) for k in (FLAG, BULK, TELEMETRY)}
        return day

    def usage(self) -> dict[str, int]:
        with self._lock:
            self._today()
            return dict(self._usage)

    def allow_bulk(self, urgent: bool = False) -> tuple[bool, str]:
        """(may studies and telemetry go now, why not)."""
        if urgent and self.urgent_ignores_budget:
            return True, ""
        with self._lock:
            self._today()
            if not in_windows(self.windows, dt.datetime.fromtimestamp(self.clock())):
                return False, "outside bulk window"
            if self.quota and self._usage[BULK] + self._usage[TELEMETRY] >= self.quota:
                return False, "daily quota spent"
        return True, ""

    def _refill(self) -> None:
        t = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (t - self._last) * self.rate)
        self._last = t

    def delay(self, nbytes: int) -> float:
        """Seconds to wait before `nbytes` of bulk may go under the rate cap (0 when uncapped)."""
        if not self.rate:
            return 0.0
        with self._lock:
            self._refill()
            need = min(nbytes, self.burst)
            return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def charge(self, kind: str, nbytes: int) -> None:
        """Count bytes that went out; tokens may go negative after a flag, which slows the next bulk."""
        with self._lock:
            day = self._today()
            self._usage[kind] = self._usage.get(kind, 0) + nbytes
            if self.rate:
                self._refill()
                self.tokens -= nbytes
        try:
            self._save(day, kind, nbytes)
        except Exception as err:  # noqa: BLE001 - losing a usage count must never stop the upload
            if is_disk_full(err):
                log.warning("could not record %d %s bytes: disk full", nbytes, kind)
            else:
                log.exception("could not record %d %s bytes", nbytes, kind)
