"""`wasla-hub run`: the receiver as a service (signals, readiness once the broker is up, an honest watchdog, housekeeping)."""
from __future__ import annotations

import logging
import threading
import time

from sync.core.diskguard import open_when_space
from sync.core.liveness import problems
from sync.hub.receiver import Receiver
from sync.hub.store import HubStore

log = logging.getLogger("sync.hub.receiver")


def run(cfg) -> int:
    """`wasla-hub run`: receive until SIGTERM/SIGINT."""
    import signal

    from sync.core.service import sd_notify, setup_logging

    setup_logging(cfg.log.level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_a: stop.set())
    # A hub that starts on a full disk waits for space (and says so) instead of exiting "disk I/O error" in a loop.
    store = open_when_space(lambda: HubStore.from_config(cfg), cfg.studies_dir, "the hub receiver",
                            stop=stop.is_set, on_wait=lambda m: sd_notify(f"READY=1\nSTATUS={m}\nWATCHDOG=1"))
    receiver = Receiver(cfg, store).start()
    forwarder = None
    if cfg.pacs.host:
        from sync.hub.forward import Forwarder

        forwarder = Forwarder(cfg, store).start()
        receiver.forwarder = forwarder
    from sync.core import metrics
    from sync.hub.metrics import hub_collector

    exporter = metrics.start(cfg.metrics, hub_collector(receiver.store, hub_id=cfg.hub.id, receiver=receiver))
    # READY once the broker connection is up (what "running" means for a receiver); a broker still down after a
    # minute does not hold the start forever: paho keeps retrying and the status says so.
    log.info("hub receiver %s started -> %s:%s", cfg.hub.id, cfg.broker.host, cfg.broker.port)
    deadline = time.monotonic() + 60.0
    while not stop.is_set() and not receiver.connected.wait(0.5) and time.monotonic() < deadline:
        pass
    connected = receiver.connected.is_set()
    sd_notify("READY=1\nSTATUS=" + ("receiving" if connected else "waiting for the broker"))
    reported: list[str] = []
    next_expiry = time.monotonic()
    while not stop.wait(5.0):
        if time.monotonic() >= next_expiry:
            next_expiry = time.monotonic() + 3600
            try:
                receiver.expire_partials()
            except Exception as err:  # noqa: BLE001 - housekeeping must never stop the receiver
                log.error("expiring partial transfers failed: %s", type(err).__name__)
        # Fed only while paho's thread lives and no message has hung it: systemd restarts a receiver that stalled.
        try:
            paused = receiver.tend_disk()
        except Exception as err:  # noqa: BLE001 - the check itself must not end the receiver
            log.error("disk check failed: %s", type(err).__name__)
            paused = None
        found = problems([receiver, *([forwarder] if forwarder else [])])
        if paused:
            found = [*found, paused]
        if found != reported:
            for p in found:
                if p != paused:  # the pause is logged by the disk guard itself, and is not ill health
                    log.error("not healthy: %s", p)
            sd_notify("STATUS=" + ("; ".join(found) if found else "receiving"))
            reported = found
        if not found or found == [paused]:
            sd_notify("WATCHDOG=1")
    if exporter is not None:
        exporter.stop()
    if forwarder is not None:
        forwarder.stop()
    receiver.stop()
    log.info("stopped")
    return 0
