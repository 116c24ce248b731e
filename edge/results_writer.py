"""Inside `wasla run`: the thread that writes each study's results documents once its images are triaged."""
from __future__ import annotations

import logging
import threading
import time

from edge.results_dicom import SC, SOURCE, SR, ensure_results, remove_orphans
from edge.store import QUEUED, TRIAGED, Store
from sync.core.diskguard import Pause, is_disk_full
from sync.core.errors import NotFoundError, StateError, WaslaError
from sync.core.liveness import Beat

log = logging.getLogger(__name__)


class ResultsWriter:
    """Inside `wasla run`: writes a study's results once its images are triaged, off the worker's thread.

    The worker only calls `notify` (a dict write); this thread waits until the study has been quiet for
    `settle_seconds` and has nothing left to triage, so a study arriving image by image gets one document, not one
    per image. The SC (a render of the key image) is written only with `with_sc` (sync on: it travels to the hub);
    otherwise `wasla send` makes it on demand."""

    def __init__(self, store: Store, *, box_id: str, with_sc: bool = False, max_pixels: int = 100_000_000,
                 settle_seconds: float = 1.0):
        self.store = store
        self.box_id = box_id
        self.kinds = (SR, SC) if with_sc else (SR,)
        self.max_pixels = max_pixels
        self.settle_seconds = settle_seconds
        self._dirty: dict[str, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beat = Beat("results writer", max_silence=600.0)
        self.disk = Pause("results documents", store.spool_dir, store.own_reserve_bytes)
        self.written = 0

    def notify(self, study_uid: str) -> None:
        with self._lock:
            self._dirty[study_uid] = time.monotonic()
        self._wake.set()

    def run_once(self, now: float | None = None) -> int:
        """Write results for every study that has settled; returns how many studies were handled."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [uid for uid, t in self._dirty.items() if now - t >= self.settle_seconds]
        done = 0
        for uid in due:
            if not self.disk.room():
                return done  # the studies stay due; written once space returns
            try:
                ensure_results(self.store, uid, box_id=self.box_id, kinds=self.kinds, max_pixels=self.max_pixels)
                self.written += 1
            except StateError:
                continue  # more images came in: the worker notifies again when they are done
            except NotFoundError as err:
                log.info("no results document for study %s: %s", uid, err)
            except Exception as err:  # noqa: BLE001 - one study's document must not stop the others'
                if is_disk_full(err, self.store.spool_dir):
                    self.disk.hit()
                    return done  # still due: written once space returns
                log.error("results for study %s could not be written: %s", uid, type(err).__name__
                          if not isinstance(err, WaslaError) else err)
            with self._lock:
                if self._dirty.get(uid, now + 1) <= now:
                    del self._dirty[uid]
            done += 1
        return done

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat.tick()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a bad study must not stop the others' results
                log.exception("results writer step failed")
            with self._lock:
                pending = bool(self._dirty)
            self._wake.wait(self.settle_seconds / 2 if pending else 5.0)
            self._wake.clear()

    def catch_up(self) -> int:
        """Studies triaged but without results (the box stopped in between): queue them; returns how many."""
        rows = self.store.query(
            "SELECT DISTINCT i.study_uid FROM instances i WHERE i.state IN (?, ?) AND i.source != ? "
            "AND NOT EXISTS (SELECT 1 FROM instances d WHERE d.study_uid = i.study_uid AND d.source = ?)",
            [TRIAGED, QUEUED, SOURCE, SOURCE])
        for r in rows:
            self.notify(r["study_uid"])
        return len(rows)

    def start(self) -> None:
        removed = remove_orphans(self.store)
        if removed:
            log.info("removed %d uncommitted results file(s)", removed)
        missing = self.catch_up()
        if missing:
            log.info("%d triaged study(ies) still need their results document", missing)
        self._thread = threading.Thread(target=self._run, name="results-writer", daemon=True)
        self._thread.start()

    def problems(self) -> list[str]:
        problem = self.beat.problem(self._thread)
        return [problem] if problem else []

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        # What the worker finished last still gets its document.
        self.run_once(now=time.monotonic() + self.settle_seconds)

