"""The receiver's inbox between paho's thread and the worker: urgent flags first, bounded in messages and in bytes.

After an outage a thousand boxes come back at once and the broker pushes their backlog (status, heartbeats, flags,
chunks) in arrival order. The worker takes it in the hub's own order instead: urgent flags, other flags, transfers,
then telemetry, first-in first-out within each class (a transfer's manifest stays ahead of its chunks; a box's
`online` status ahead of its will). A full inbox blocks paho's thread, and the broker holds the rest; the byte bound
keeps a burst of 1 MiB chunks from taking the hub's memory, and a message larger than the bound still gets in alone.
"""
from __future__ import annotations

import heapq
import itertools
import queue
import threading

from sync.wire import protocol

PRIO_URGENT_FLAG, PRIO_FLAG, PRIO_TRANSFER, PRIO_TELEMETRY = range(4)
_BY_KIND = {"flag": PRIO_FLAG, "manifest": PRIO_TRANSFER, "chunk": PRIO_TRANSFER, "heartbeat": PRIO_TELEMETRY,
            "status": PRIO_TELEMETRY}


def priority(topic: str, payload: bytes) -> int:
    kind = protocol.topic_kind(topic)
    prio = _BY_KIND.get(kind, PRIO_TRANSFER)
    # A cheap look, not a parse: the worker decodes and validates. A mislabelled flag only changes its turn.
    if prio == PRIO_FLAG and b'"urgent"' in payload[:4096]:
        return PRIO_URGENT_FLAG
    return prio


class PriorityInbox:
    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._heap: list[tuple[int, int, tuple]] = []
        self._bytes = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()

    def put(self, item: tuple, prio: int, nbytes: int) -> None:
        with self._cond:
            while self._heap and (len(self._heap) >= self.max_messages or self._bytes + nbytes > self.max_bytes):
                self._cond.wait()
            heapq.heappush(self._heap, (prio, next(self._seq), (item, nbytes)))
            self._bytes += nbytes
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> tuple:
        """The most important item; queue.Empty after `timeout` seconds without one (0: do not wait)."""
        with self._cond:
            if not self._heap and timeout != 0:
                self._cond.wait_for(lambda: bool(self._heap), timeout)
            if not self._heap:
                raise queue.Empty
            _prio, _seq, (item, nbytes) = heapq.heappop(self._heap)
            self._bytes -= nbytes
            self._cond.notify_all()
            return item

    def get_nowait(self) -> tuple:
        return self.get(0)

    def qsize(self) -> int:
        with self._cond:
            return len(self._heap)

    def nbytes(self) -> int:
        with self._cond:
            return self._bytes
