"""The uplink's measured goodput: bulk bytes the broker acknowledged while the sender always had more to send."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

MIN_RUN_ACKS = 4
MIN_RUN_S = 1.0


class LinkMeter:
    """Rate estimate for the codec choice (`sync.wire.codec_policy`).

    Only a busy sender measures the link: while the uploader always had a chunk waiting (held by the in-flight
    window or the rate cap), bytes acknowledged / time is the rate this box really gets. When it runs out of work
    (`idle`) the run ends: what follows may be a gap, not the link. Every MIN_RUN_S with at least MIN_RUN_ACKS acks
    folds into an EWMA; until the first has, the configured prior stands.
    """

    def __init__(self, prior_bytes_per_s: float, *, alpha: float = 0.3, clock: Callable[[], float] = time.monotonic):
        self._rate = float(prior_bytes_per_s)
        self.measured = False
        self._alpha = alpha
        self._clock = clock
        self._lock = threading.Lock()
        self._run_start: float | None = None
        self._run_bytes = 0
        self._run_acks = 0

    def acked(self, nbytes: int) -> None:
        now = self._clock()
        with self._lock:
            if self._run_start is None:
                # The first ack of a run only marks its start: its bytes were sent before we started timing.
                self._run_start, self._run_bytes, self._run_acks = now, 0, 0
                return
            self._run_bytes += nbytes
            self._run_acks += 1
            if self._run_acks >= MIN_RUN_ACKS and now - self._run_start >= MIN_RUN_S:
                self._fold(self._run_bytes / (now - self._run_start))
                self._run_start, self._run_bytes, self._run_acks = now, 0, 0

    def idle(self) -> None:
        """The sender has nothing it may send, or its connection dropped (a run spanning a cut would measure the
        outage, not the link): the run, if any, ends here."""
        with self._lock:
            self._run_start = None

    def _fold(self, rate: float) -> None:
        self._rate = rate if not self.measured else (1 - self._alpha) * self._rate + self._alpha * rate
        self.measured = True

    def rate(self) -> float:
        with self._lock:
            return self._rate
