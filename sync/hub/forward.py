"""The hub's durable forward queue to the hospital PACS: every verified instance goes there by C-STORE, in a syntax
the PACS renders, retried across PACS outages and hub restarts, refused ones dead-lettered with their reason."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

from sync.core.errors import BadInputError
from sync.core.liveness import Beat
from sync.wire.transcode import for_pacs

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 600.0
BATCH = 16
CLAIM_STALE_S = 300.0
# DIMSE statuses that mean "stored" (PS3.4 B.2.3: success and the warnings: coercion, elements discarded).
_STORED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


class PacsUnreachable(Exception):
    """No association (PACS down, network cut, wrong AE title): nothing is counted against the instances."""


def enqueue_new(store, since: float | None) -> int:
    """Queue every stored instance that has no forward row yet (those stored since `since`; all when None).

    Run by the forwarder itself, so an instance stored by any receiver, before the PACS was configured or while
    this hub was down, is forwarded without the receiving path knowing about PACS at all."""
    where, params = ("AND i.stored_at >= ?", [since]) if since is not None else ("", [])
    with store.tx() as db:
        cur = db.execute(
            f"{store.index.insert_or_ignore} INTO forwards (sop_instance_uid, study_uid, state, next_at, queued_at) "
            f"SELECT i.sop_instance_uid, i.study_uid, 'queued', 0, i.stored_at FROM instances i WHERE NOT EXISTS "
            f"(SELECT 1 FROM forwards f WHERE f.sop_instance_uid = i.sop_instance_uid) {where}"
            f"{store.index.on_conflict_ignore}", params)
        return max(cur.rowcount, 0)


def claim_due(store, claimant: str, now: float, limit: int = BATCH) -> list[dict]:
    """Due rows, claimed for this forwarder (another receiver's forwarder skips them), urgent studies first."""
    rows = store.query(
        "SELECT f.sop_instance_uid, f.study_uid, f.attempts, i.path FROM forwards f JOIN instances i ON "
        "i.sop_instance_uid = f.sop_instance_uid LEFT JOIN studies s ON s.study_uid = f.study_uid "
        "WHERE f.state = 'queued' AND f.next_at <= ? AND (f.claimed_by IS NULL OR f.claimed_by = ? OR "
        "f.claimed_at < ?) ORDER BY CASE s.label WHEN 'urgent' THEN 0 WHEN 'review' THEN 1 ELSE 2 END, f.queued_at "
        "LIMIT ?", [now, claimant, now - CLAIM_STALE_S, limit])
    mine = []
    with store.tx() as db:
        for r in rows:
            cur = db.execute("UPDATE forwards SET claimed_by = ?, claimed_at = ? WHERE sop_instance_uid = ? AND "
                             "state = 'queued' AND (claimed_by IS NULL OR claimed_by = ? OR claimed_at < ?)",
                             [claimant, now, r["sop_instance_uid"], claimant, now - CLAIM_STALE_S])
            if cur.rowcount > 0:
                mine.append(r)
    return mine


def mark_sent(store, sop: str, syntax: str) -> None:
    with store.tx() as db:
        db.execute("UPDATE forwards SET state = 'sent', sent_at = ?, syntax = ?, reason = NULL, claimed_by = NULL "
                   "WHERE sop_instance_uid = ?", [time.time(), syntax, sop])


def mark_failed(store, sop: str, reason: str, *, dead: bool, next_at: float, counts: bool = True) -> None:
    with store.tx() as db:
        db.execute("UPDATE forwards SET state = ?, attempts = attempts + ?, next_at = ?, reason = ?, "
                   "claimed_by = NULL WHERE sop_instance_uid = ?",
                   ["dead" if dead else "queued", int(counts), next_at, reason[:500], sop])


def release(store, claimant: str) -> None:
    with store.tx() as db:
        db.execute("UPDATE forwards SET claimed_by = NULL WHERE claimed_by = ? AND state = 'queued'", [claimant])


def release_earlier_runs(store, hub_id: str) -> int:
    """Claims an earlier run of this receiver held when it was killed: its next start takes them up at once."""
    with store.tx() as db:
        prefix = hub_id + ":"
        cur = db.execute("UPDATE forwards SET claimed_by = NULL WHERE substr(claimed_by, 1, ?) = ? AND "
                         "state = 'queued'", [len(prefix), prefix])
        return max(cur.rowcount, 0)


def requeue(store, sop_prefix: str | None = None) -> int:
    """Dead-lettered forwards (all, or one instance/study by UID prefix) back to the queue: `wasla-hub forwards --retry`."""
    where, params = "", []
    if sop_prefix:
        where, params = " AND (sop_instance_uid LIKE ? OR study_uid LIKE ?)", [sop_prefix + "%", sop_prefix + "%"]
    with store.tx() as db:
        cur = db.execute(f"UPDATE forwards SET state = 'queued', attempts = 0, next_at = 0, reason = NULL "
                         f"WHERE state = 'dead'{where}", params)
        return max(cur.rowcount, 0)


def summary(store) -> dict:
    rows = store.query("SELECT state, COUNT(*) AS n, MIN(queued_at) AS oldest FROM forwards GROUP BY state")
    out = {"queued": 0, "sent": 0, "dead": 0, "oldest_queued_at": None}
    for r in rows:
        out[r["state"]] = r["n"]
        if r["state"] == "queued":
            out["oldest_queued_at"] = r["oldest"]
    return out


def listing(store, state: str | None = None, limit: int = 100) -> list[dict]:
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    return store.query(f"SELECT sop_instance_uid, study_uid, state, attempts, queued_at, sent_at, next_at, syntax, "
                       f"reason FROM forwards {where} ORDER BY queued_at DESC LIMIT ?", [*params, limit])


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's own identifier of a study (its DicomInstanceHasher: SHA-1 of "PatientID|StudyInstanceUID" in five
    groups of eight hex digits), so the worklist can link a study in Orthanc Explorer without asking Orthanc."""
    import hashlib

    h = hashlib.sha1(f"{patient_id}|{study_uid}".encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def backoff(cfg, attempts: int) -> float:
    return min(MAX_BACKOFF_S, cfg.pacs.retry_seconds * (2 ** max(0, attempts - 1)))


class Forwarder:
    """One thread: queue what is new, send what is due, in batches over one association. Never raises."""

    def __init__(self, cfg, store):
        self.cfg = cfg
        self.store = store
        self.claimant = f"{cfg.hub.id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.beat = Beat("PACS forwarder", max_busy=max(600.0, 4 * cfg.pacs.timeout_seconds))
        self.unreachable_since: float | None = None
        self.last_error: str | None = None
        self._outage_attempts = 0
        self._pause_until = 0.0
        self._watermark: float | None = None
        self._thread: threading.Thread | None = None
        self.tmp_dir = Path(cfg.hub.data_dir) / "forward-tmp"

    def start(self) -> "Forwarder":
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.glob("*.dcm"):
            stale.unlink(missing_ok=True)
        if back := release_earlier_runs(self.store, self.cfg.hub.id):
            log.info("%d forward(s) interrupted by the last stop taken up again", back)
        self._thread = threading.Thread(target=self._run, name="pacs-forwarder", daemon=True)
        self._thread.start()
        log.info("forwarding verified instances to PACS %s@%s:%s", self.cfg.pacs.ae_title, self.cfg.pacs.host,
                 self.cfg.pacs.port)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.pacs.timeout_seconds + 5)
        try:
            release(self.store, self.claimant)
        except Exception as err:  # noqa: BLE001 - a stale claim expires by itself
            log.warning("could not release forward claims: %s", type(err).__name__)

    def problems(self) -> list[str]:
        problem = self.beat.problem(self._thread, idle_ok=True)
        return [problem] if problem else []

    def _run(self) -> None:
        while not self.stop_event.is_set():
            self.beat.tick()
            try:
                with self.beat.busy():
                    sent = self.step()
            except Exception:  # noqa: BLE001 - the forwarder must outlive any instance, database or PACS error
                log.exception("forwarding step failed")
                sent = 0
            if not sent:
                self.wake.wait(2.0)
                self.wake.clear()

    def step(self, now: float | None = None) -> int:
        """One round; returns how many instances reached the PACS."""
        now = time.time() if now is None else now
        start = self._watermark
        queued = enqueue_new(self.store, None if start is None else start - 120.0)
        self._watermark = now
        if queued:
            log.info("%d instance(s) queued for the PACS", queued)
        if now < self._pause_until:
            return 0
        rows = claim_due(self.store, self.claimant, now)
        if not rows:
            return 0
        try:
            sent = self._send(rows)
        except PacsUnreachable as err:
            self._outage(str(err), rows)
            return 0
        if self.unreachable_since is not None:
            log.info("PACS reachable again after %.0f s", time.time() - self.unreachable_since)
        self.unreachable_since, self._outage_attempts = None, 0
        return sent

    def _outage(self, reason: str, rows: list[dict]) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.time()
            log.warning("PACS unreachable (%s): %d instance(s) wait for it", reason, len(rows))
        self.last_error = reason
        self._outage_attempts += 1
        self._pause_until = time.time() + backoff(self.cfg, self._outage_attempts)
        release(self.store, self.claimant)

    def _prepare(self, row: dict):
        """(path to send, syntax, SOP class) for one row; the PACS copy is written to a temp file if transcoded."""
        path = self.store.studies_dir / row["path"]
        data = path.read_bytes()
        copy = for_pacs(data, frozenset(self.cfg.pacs.accept_syntaxes), self.cfg.pacs.transcode_to)
        if copy.transcoded:
            path = self.tmp_dir / f"{uuid.uuid4().hex}.dcm"
            path.write_bytes(copy.data)
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return path, copy, str(ds.SOPClassUID)

    def _send(self, rows: list[dict]) -> int:
        from pynetdicom import AE

        p = self.cfg.pacs
        ready, sent = [], 0
        for row in rows:
            try:
                ready.append((row, *self._prepare(row)))
            except (BadInputError, OSError, ValueError, AttributeError) as err:
                # The stored copy cannot become a PACS copy (damaged on disk, a pixel stream no decoder takes):
                # retrying will not change that; the operator sees it in `wasla-hub forwards --dead`.
                reason = f"cannot prepare the PACS copy: {err if isinstance(err, BadInputError) else type(err).__name__}"
                log.error("forward of %s dead-lettered: %s", row["sop_instance_uid"], reason)
                mark_failed(self.store, row["sop_instance_uid"], reason, dead=True, next_at=0)
        if not ready:
            return 0
        ae = AE(ae_title=p.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = p.timeout_seconds
        contexts = sorted({(sop_class, copy.transfer_syntax_uid) for _r, _p, copy, sop_class in ready})
        for sop_class, syntax in contexts[:128]:
            ae.add_requested_context(sop_class, [syntax])
        try:
            assoc = ae.associate(p.host, p.port, ae_title=p.ae_title)
        except Exception as err:  # noqa: BLE001 - DNS, socket or pynetdicom errors all mean "not reachable now"
            self._cleanup(ready)
            raise PacsUnreachable(type(err).__name__) from err
        if not assoc.is_established:
            self._cleanup(ready)
            raise PacsUnreachable("association rejected" if assoc.is_rejected else "no association")
        try:
            for row, path, copy, _sop_class in ready:
                if not assoc.is_established:
                    raise PacsUnreachable("association lost")
                sop = row["sop_instance_uid"]
                try:
                    status = assoc.send_c_store(path)
                except ValueError as err:  # no accepted presentation context for this SOP class / syntax
                    self._refused(row, f"PACS took no context for it ({type(err).__name__})")
                    continue
                code = int(status.Status) if status is not None and "Status" in status else None
                if code is None:
                    raise PacsUnreachable("no response to C-STORE")
                if code in _STORED:
                    mark_sent(self.store, sop, copy.transfer_syntax_uid)
                    sent += 1
                    log.info("forwarded %s to the PACS (%s%s)", sop, copy.transfer_syntax_uid,
                             ", transcoded" if copy.transcoded else "")
                else:
                    self._refused(row, f"PACS refused it: status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
            self._cleanup(ready)
        return sent

    def _refused(self, row: dict, reason: str) -> None:
        attempts = int(row["attempts"]) + 1
        dead = attempts >= self.cfg.pacs.max_refusals
        log.warning("forward of %s: %s (%d of %d)%s", row["sop_instance_uid"], reason, attempts,
                    self.cfg.pacs.max_refusals, "; dead-lettered" if dead else "")
        self.last_error = reason
        mark_failed(self.store, row["sop_instance_uid"], reason, dead=dead,
                    next_at=time.time() + backoff(self.cfg, attempts))

    def _cleanup(self, ready) -> None:
        for _row, path, copy, _sop_class in ready:
            if copy.transcoded:
                Path(path).unlink(missing_ok=True)
