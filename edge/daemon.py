"""`wasla run`: wires store, model engine, DICOM SCP, watch folder and worker; speaks systemd notify; stops cleanly."""
from __future__ import annotations

import logging
import signal
import threading
import time

from edge import metrics
from sync.core import diskguard, liveness
from sync.core.service import sd_notify, setup_logging, watchdog_interval
from edge.config import Config
from edge.engine import Engine
from edge.results_writer import ResultsWriter
from edge.store import Store
from edge.worker import Worker

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.store: Store | None = None
        self.parts: list = []

    def start(self) -> None:
        from edge import ingest
        from edge.scp import StoreSCP
        from edge.watch import FolderWatcher

        cfg = self.cfg

        def open_store():
            store = Store.from_config(cfg)
            try:
                return store, store.recover(), ingest.adopt_orphans(store, **ingest.limits_from_config(cfg))
            except BaseException:
                store.close()
                raise

        # A box that starts on a full disk waits for space (and says so), instead of exiting and being restarted
        # in a loop by systemd until it gives up.
        self.store, back, adopted = diskguard.open_when_space(
            open_store, cfg.box.data_dir, "the box", stop=self.stop_event.is_set,
            on_wait=lambda message: sd_notify(f"READY=1\nSTATUS={message}\nWATCHDOG=1"))
        if back:
            log.info("%d interrupted instance(s) returned to the queue", back)
        if adopted:
            log.info("%d orphan spool file(s) re-registered", adopted)
        self.engine = Engine.load(cfg)
        # Results (SR always; SC only when configured to travel to the hub, else on demand by `wasla send`) are
        # written off the worker's thread; stopped last.
        self.results = ResultsWriter(self.store, box_id=cfg.box.id,
                                     with_sc=cfg.sync.enabled and cfg.sync.send_secondary_capture,
                                     max_pixels=cfg.storage.max_pixels)
        self.results.start()
        self.parts.append(self.results)
        self.latency = metrics.Histogram("wasla_triage_latency_seconds", "Seconds from claim to triage decision.")
        self.worker = Worker(self.store, self.engine)
        self.worker.after_triage = self._after_triage
        self.worker.start()
        self.parts.append(self.worker)
        if cfg.dicom.enabled:
            self.scp = StoreSCP(cfg, self.store, on_stored=self.worker.wake.set)
            self.scp.start()
            self.parts.append(self.scp)
            log.info("DICOM SCP %s listening on %s:%s", cfg.dicom.ae_title, cfg.dicom.bind, self.scp.port)
        if cfg.watch.enabled:
            self.watcher = FolderWatcher(cfg, self.store, on_stored=self.worker.wake.set)
            self.watcher.start()
            self.parts.append(self.watcher)
            log.info("watching %s", cfg.watch_dir)
        if cfg.sync.enabled:
            from edge.uplink.uploader import Uploader

            self.uploader = Uploader(cfg, self.store, self.engine)
            self.uploader.start()
            self.worker.on_triaged = self.uploader.pack_wake.set
            self.parts.append(self.uploader)
        from edge.control import ControlServer

        uploader = getattr(self, "uploader", None)
        self.control = ControlServer(cfg.box.data_dir, {
            "sync-now": uploader.nudge if uploader is not None else (lambda: {"sync": "off"})}).start()
        self.parts.append(self.control)
        exporter = metrics.start(cfg.metrics, metrics.box_collector(
            self.store, box_id=cfg.box.id, data_dir=cfg.box.data_dir, latency=self.latency, worker=self.worker,
            uploader_ref=lambda: getattr(self, "uploader", None)))
        if exporter is not None:
            self.parts.append(exporter)

    def _after_triage(self, row: dict, _label: str, pipeline_ms: float) -> None:
        self.results.notify(row["study_uid"])
        self.latency.observe(pipeline_ms / 1000)

    def stop(self) -> None:
        sd_notify("STOPPING=1")
        # Doors first (no new work accepted), then the worker finishes the instance in hand.
        for part in reversed(self.parts):
            try:
                part.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                log.exception("error while stopping %s", type(part).__name__)
        if self.store:
            self.store.close()

    def run_forever(self) -> int:
        def _on_signal(signum, _frame):
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        sd_notify("READY=1\nSTATUS=triage running")
        log.info("wasla box %s ready", self.cfg.box.id)
        interval = watchdog_interval()
        tick = min(interval, 5.0) if interval else 5.0
        next_purge = time.monotonic() + 60
        reported: list[str] = []
        while not self.stop_event.wait(tick):
            # Feed the watchdog only while every loop proves progress: a dead or stuck thread gets us restarted
            # (systemd's WatchdogSec) instead of a process that looks healthy and does nothing.
            found = liveness.problems(self.parts)
            if found != reported:
                for p in found:
                    log.error("not healthy: %s", p)
                sd_notify("STATUS=" + ("; ".join(found) if found else "triage running"))
                reported = found
            if interval and not found:
                sd_notify("WATCHDOG=1")
            if self.cfg.storage.keep_days and time.monotonic() >= next_purge:
                next_purge = time.monotonic() + 3600
                try:
                    self.store.purge(time.time() - self.cfg.storage.keep_days * 86400)
                except Exception:  # noqa: BLE001 - housekeeping must never stop the daemon
                    log.exception("purge failed")
        self.stop()
        log.info("stopped")
        return 0


def run(cfg: Config) -> int:
    setup_logging(cfg.log.level)
    return Daemon(cfg).run_forever()
