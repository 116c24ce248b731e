"""Association slots for the SCP: exactly `max_associations` at once, a cap per peer, no slot for a silent socket.

pynetdicom's own limit counts every acceptor thread, including sockets that never sent an A-ASSOCIATE-RQ and
associations already released whose threads are still winding down, so junk connections and a quick succession of
real ones were refused "local limit exceeded" below the configured number. Here a slot is taken only when a peer
has asked for an association, and given back at release, abort or close, whichever comes first.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation related), local-limit-exceeded (PS3.8 9.3.4).
_TRANSIENT, _PRESENTATION, _LOCAL_LIMIT = 0x02, 0x03, 0x02


class Slots:
    """Counts granted associations, in total and per calling address; thread-safe, idempotent release."""

    def __init__(self, total: int, per_peer: int):
        self.total = total
        self.per_peer = per_peer
        self._held: dict[int, tuple[str, object]] = {}
        self._by_peer: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, key: int, peer: str, owner=None) -> bool:
        """`owner` (the association thread) lets a slot whose release event never came be reclaimed."""
        with self._lock:
            for k, (_p, thread) in list(self._held.items()):
                if thread is not None and not thread.is_alive():
                    self._release(k)
            if key in self._held:
                return True
            if len(self._held) >= self.total or self._by_peer[peer] >= self.per_peer:
                return False
            self._held[key] = (peer, owner)
            self._by_peer[peer] += 1
            return True

    def give_back(self, key: int) -> None:
        with self._lock:
            self._release(key)

    def _release(self, key: int) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._by_peer[held[0]] -= 1
            if self._by_peer[held[0]] <= 0:
                del self._by_peer[held[0]]

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._held)

    # --- pynetdicom event handlers (notification events: they must never raise) ---------------------------------
    def on_requested(self, event, request_timeout: float, acse_timeout: float) -> None:
        assoc = event.assoc
        try:
            peer = str(assoc.requestor.address)
            if not self.take(id(assoc), peer, assoc):
                log.warning("association from %s refused: %d of %d slots in use (%d per peer)", peer, self.in_use,
                            self.total, self.per_peer)
                assoc.acse.send_reject(_TRANSIENT, _PRESENTATION, _LOCAL_LIMIT)
                # As pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ before the
                # socket is closed, so the modality reads "rejected, transient" (retry later), not an abort.
                assoc.kill()
                return
            # The short timeout guarded the wait for this request; a peer that spoke gets the normal one back.
            if acse_timeout != request_timeout:
                assoc.acse_timeout = acse_timeout
        except Exception:  # noqa: BLE001 - a failing check must not leave the peer hanging or the slot taken
            log.exception("association slot check failed")
            self.give_back(id(assoc))

    def on_closed(self, event) -> None:
        try:
            self.give_back(id(event.assoc))
        except Exception:  # noqa: BLE001
            log.exception("association slot release failed")

    def handlers(self, request_timeout: float, acse_timeout: float) -> list:
        return [(evt.EVT_REQUESTED, self.on_requested, [request_timeout, acse_timeout]),
                (evt.EVT_RELEASED, self.on_closed), (evt.EVT_ABORTED, self.on_closed),
                (evt.EVT_REJECTED, self.on_closed), (evt.EVT_CONN_CLOSE, self.on_closed)]


class BoundedServer(ThreadedAssociationServer):
    """Caps open TCP connections (one thread each), in total and per address, before any DICOM is read."""

    max_connections = 64
    max_connections_per_peer = 16

    def verify_request(self, request, client_address) -> bool:
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        try:
            live = [a for a in self.active_associations if a.is_alive()]
            mine = sum(1 for a in live if str(a.requestor.address) == peer)
        except Exception:  # noqa: BLE001 - never refuse a modality because the count failed
            log.exception("connection count failed")
            return True
        if len(live) >= self.max_connections or mine >= self.max_connections_per_peer:
            log.warning("connection from %s dropped: %d open from it, %d in all", peer, mine, len(live))
            return False
        return True
