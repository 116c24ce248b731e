"""The uploader's in-flight window: QoS 1 publishes the broker has not acknowledged yet, and the bulk bytes among them.

Not thread-safe by itself: the uploader holds its lock around every call (paho's thread acks, the send thread
publishes).
"""
from __future__ import annotations

import time


class InflightWindow:
    def __init__(self) -> None:
        self._out: dict[int, tuple[int, float]] = {}  # message id -> (bulk bytes, when published, monotonic)
        self._early: set[int] = set()  # PUBACKs that arrived before publish() returned their id
        self.bytes = 0

    def published(self, mid: int, bulk_bytes: int) -> None:
        """Track a publish. Every QoS 1 publish is tracked (non-bulk with 0 bytes): a PUBACK for an id never
        registered would otherwise stay early and, once paho reuses the id, exempt a later chunk from the cap."""
        if mid in self._early:
            self._early.discard(mid)  # the broker was faster than paho's return
            return
        self._out[mid] = (bulk_bytes, time.monotonic())
        self.bytes += bulk_bytes

    def acked(self, mid: int) -> tuple[int, float] | None:
        """The acknowledged publish's (bulk bytes, seconds since it left), or None if publish() has not seen it."""
        entry = self._out.pop(mid, None)
        if entry is None:
            self._early.add(mid)
            return None
        self.bytes -= entry[0]
        return entry[0], time.monotonic() - entry[1]

    def clear(self) -> None:
        """A new connection: whatever was out before the cut is unknown now (the hub's resume answer tells)."""
        self._out.clear()
        self._early.clear()
        self.bytes = 0

    def would_exceed(self, length: int, cap: int) -> bool:
        """Whether `length` more bulk bytes go past `cap`; an empty window always takes one, however large."""
        return bool(self.bytes) and self.bytes + length > cap
