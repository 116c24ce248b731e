"""The triage worker: takes received instances from the store one at a time and records their outcome exactly once."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge import results_dicom
from edge.engine import Engine
from sync.core.errors import BadInputError, StoreError, WaslaError
from sync.core.diskguard import Pause, is_disk_full
from sync.core.liveness import Beat
from edge.store import PROCESSING, RECEIVED, Store

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, store: Store, engine: Engine, idle_wait: float = 0.2):
        self.store = store
        # Called after each committed triage: the uploader packs the flag at once (seconds matter for urgent).
        self.on_triaged = None
        # Also after each commit, with (row, label, pipeline_ms): results documents and metrics; must be quick.
        self.after_triage: Callable[[dict, str, float], None] | None = None
        self.engine = engine
        self.idle_wait = idle_wait
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        # A triage of one image takes well under a minute even on a Jetson; a loop silent for 10 min is stuck.
        self.beat = Beat("triage worker", max_silence=600.0)
        self.processed = 0
        self._thread: threading.Thread | None = None
        self.disk = Pause("triage", store.spool_dir, store.own_reserve_bytes) if store is not None else None
        self._unclaimed: set[int] = set()

    def process_one(self) -> bool:
        """Triage the oldest received instance; False when the queue is empty."""
        self._give_back_claims()
        if self.disk is not None and not self.disk.room():
            return False
        row = self.store.claim_next()
        if row is None:
            return False
        iid = row["id"]
        try:
            return self._process(row, iid)
        except Exception:
            # Not committed (a full disk, a locked file): the instance must not sit in `processing` until restart.
            self._unclaimed.add(iid)
            self._give_back_claims()
            raise

    def _give_back_claims(self) -> None:
        for iid in list(self._unclaimed):
            try:
                with self.store.transaction() as db:
                    db.execute("UPDATE instances SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                               [RECEIVED, time.time(), iid, PROCESSING])
                self._unclaimed.discard(iid)
            except Exception:  # noqa: BLE001 - still no room: tried again on the next pass
                return

    def _process(self, row: dict, iid: int) -> bool:
        if results_dicom.is_derived(row):
            # Our own SR/SC, put back in the queue by a requeue: triaging it would label the study "review".
            results_dicom.skip_triage(self.store, iid)
            return True
        t0 = time.perf_counter()
        try:
            outcome = self.engine.triage_file(self.store.instance_path(row))
        except BadInputError as err:
            self.store.quarantine(iid, str(err))
            return True
        except WaslaError as err:
            # A model or runtime failure is not the image's fault, but retrying forever would stall the queue.
            self.store.quarantine(iid, f"triage failed: {err}")
            return True
        except Exception as err:  # noqa: BLE001 - one bad instance must never stop the daemon
            # The type only, in the reason and the log: a library's message may quote a header value.
            log.error("unexpected error on instance #%s: %s", iid, type(err).__name__)
            self.store.quarantine(iid, f"internal error: {type(err).__name__}")
            return True
        t1 = time.perf_counter()
        outcome.timings["pipeline_ms"] = round((t1 - t0) * 1000, 2)
        for r in outcome.results:
            r["timings"] = dict(outcome.timings)
        self.store.record_triage(iid, outcome.label, outcome.reasons, outcome.results)
        if self.on_triaged:
            self.on_triaged()
        commit_ms = round((time.perf_counter() - t1) * 1000, 2)
        self.processed += 1
        if self.after_triage is not None:
            try:
                self.after_triage(row, outcome.label, outcome.timings["pipeline_ms"])
            except Exception:  # noqa: BLE001 - the triage is committed; a hook failure must not stop the worker
                log.exception("after_triage hook failed for instance #%s", iid)
        log.info("instance #%s %s triaged %s in %.0f ms (+%.1f ms commit)", iid, row["sop_instance_uid"],
                 outcome.label, outcome.timings["pipeline_ms"], commit_ms)
        return True

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.beat.tick()
            try:
                busy = self.process_one()
            except Exception as err:  # noqa: BLE001 - a locked database, a full disk or a failing hook must not end triage
                if self.disk is not None and is_disk_full(err, self.store.spool_dir):
                    self.disk.hit()  # logged once; room() resumes by itself when space returns
                elif isinstance(err, StoreError):
                    log.error("store error in worker: %s", err)
                else:
                    log.exception("unexpected error in the triage worker; going on")
                busy = False
            if not busy:
                self.wake.wait(self.idle_wait)
                self.wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="triage-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the instance in hand, then stop; anything still `processing` goes back to the queue on next start."""
        self.stop_event.set()
        self.wake.set()
        if self._thread:
            self._thread.join(timeout)

    def problems(self) -> list[str]:
        problem = self.beat.problem(self._thread)
        return [problem] if problem else []
