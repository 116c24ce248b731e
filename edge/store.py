"""The box's durable queue: SQLite (WAL) rows for instances, studies and results, and the spool files they point to."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from sync.core.fsutil import fsync_dir
from sync.core.diskguard import describe_store_error
from sync.core.sqlite import find_study, write_transaction
from sync.core.errors import NotFoundError, OutOfResourcesError, StateError, StoreError
from edge import store_migrations
from edge.store_migrations import MIGRATIONS, migrate  # noqa: F401 - MIGRATIONS: the store's schema history
from edge.triage import most_severe

log = logging.getLogger(__name__)

# Instance states (ARCHITECTURE.md). The sync states (queued .. purged) are driven by the uploader.
RECEIVED, PROCESSING, TRIAGED, QUARANTINED = "received", "processing", "triaged", "quarantined"
QUEUED, SENT, ACKNOWLEDGED, PURGED = "queued", "sent", "acknowledged", "purged"
STATES = (RECEIVED, PROCESSING, TRIAGED, QUEUED, SENT, ACKNOWLEDGED, PURGED, QUARANTINED)
TRANSITIONS: dict[str, set[str]] = {
    RECEIVED: {PROCESSING, QUARANTINED},
    PROCESSING: {TRIAGED, QUARANTINED, RECEIVED},
    TRIAGED: {QUEUED, RECEIVED, QUARANTINED},  # -> quarantined: its spool file no longer matches its sha256
    QUEUED: {SENT, QUEUED, TRIAGED},   # -> triaged: its wire copy was lost, pack it again from the spool
    SENT: {ACKNOWLEDGED, QUEUED, TRIAGED},
    ACKNOWLEDGED: {PURGED},
    PURGED: set(),
    QUARANTINED: {RECEIVED},
}


@dataclass(frozen=True)
class InstanceMeta:
    """Header facts extracted at ingest; none of them identifies the patient."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    transfer_syntax: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1


@dataclass(frozen=True)
class AddResult:
    id: int
    duplicate: bool
    path: Path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Store:
    """One connection guarded by one lock: every writer in the daemon goes through it (readers in other processes are free)."""

    def __init__(self, db_path: Path, spool_dir: Path, quarantine_dir: Path, min_free_mb: int = 0):
        self.db_path = Path(db_path)
        self.spool_dir = Path(spool_dir)
        self.quarantine_dir = Path(quarantine_dir)
        self.min_free_mb = min_free_mb
        # Incoming studies stop at min_free_mb; the box's own writes (triage rows, SRs, wire copies, WAL) go on down
        # to a quarter of it, so what was accepted can still be triaged and sent, and SQLite never hits the wall.
        self.own_reserve_bytes = int(min_free_mb * 1e6 / 4)
        for d in (self.db_path.parent, self.spool_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss, which is what lets us say "stored" to the modality.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as err:
            raise StoreError(f"cannot open store {self.db_path}: {describe_store_error(err, self.db_path)}") from err
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        with self._lock:
            try:
                migrate(self.db)
            except sqlite3.Error as err:
                raise StoreError(f"cannot migrate store {self.db_path}: {describe_store_error(err, self.db_path)}") from err

    @classmethod
    def from_config(cls, cfg) -> "Store":
        return cls(cfg.db_path, cfg.spool_dir, cfg.quarantine_dir, cfg.storage.min_free_mb)

    @classmethod
    def reader(cls, cfg) -> "Store":
        """The store as the technician's read-only commands (status, results, show, doctor) open it: a read-only
        connection that migrates nothing and creates no folder, so a reader can never change what the daemon owns.
        A store that does not exist yet, or one the installed code would still migrate, is opened as a writer."""
        path = Path(cfg.db_path)
        if not path.is_file():
            return cls.from_config(cfg)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False,
                                   isolation_level=None)
            done = {r[0] for r in conn.execute("SELECT number FROM _migrations")}
        except sqlite3.Error:
            return cls.from_config(cfg)  # no bookkeeping table yet: a store this code has never opened
        if not {number for number, _name, _fn in store_migrations.MIGRATIONS} <= done:
            conn.close()
            return cls.from_config(cfg)
        self = cls.__new__(cls)
        self.db_path, self.spool_dir, self.quarantine_dir = path, Path(cfg.spool_dir), Path(cfg.quarantine_dir)
        self.min_free_mb = cfg.storage.min_free_mb
        self.own_reserve_bytes = int(self.min_free_mb * 1e6 / 4)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        return self

    @property
    def tmp_dir(self) -> Path:
        return self.spool_dir / "tmp"

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # --- transactions ------------------------------------------------------------------------------------
    def _tx(self, durable: bool = True):
        """One write transaction under the store lock. durable=False skips the commit's fsync: only for marks a
        crash may lose harmlessly (a lost `processing` claim is what recover() undoes anyway); the next durable
        commit's fsync covers the earlier WAL frames too."""
        return write_transaction(self._lock, self.db, durable=durable)

    def query(self, sql: str, params: Any = ()) -> list[dict]:
        with self._lock:
            return list(self.db.query(sql, params))

    # --- disk ------------------------------------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.spool_dir).free / 1e6

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Refuse new data before the disk is so full that SQLite or the spool could be corrupted."""
        free = self.free_mb()
        if free - incoming_bytes / 1e6 < self.min_free_mb:
            need = f" ({incoming_bytes / 1e6:.0f} MB incoming)" if incoming_bytes >= 1e6 else ""
            raise OutOfResourcesError(f"disk nearly full: {max(free, 0):.0f} MB free{need}, {self.min_free_mb} MB "
                                      "kept in reserve")

    def new_tmp_path(self) -> Path:
        return self.tmp_dir / f"{time.time_ns()}-{os.getpid()}-{threading.get_ident()}.part"

    # --- ingest ------------------------------------------------------------------------------------------
    def add_instance(self, tmp_path: Path, meta: InstanceMeta, *, source: str, calling_ae: str | None = None,
                     started: float | None = None) -> AddResult:
        """Move a fully written, fsynced temp file into the spool and commit its row. Only then may a door say yes.

        `started` is the door's time.perf_counter() at the first byte, recorded as receive_ms."""
        size = tmp_path.stat().st_size
        sha = file_sha256(tmp_path)
        dest = self.spool_dir / sha[:2] / f"{sha}.dcm"
        with self._tx() as db:
            existing = db.execute("SELECT id, path, state FROM instances WHERE sop_instance_uid = ?",
                                  [meta.sop_instance_uid]).fetchone()
            if existing is not None and existing[2] != QUARANTINED:
                tmp_path.unlink(missing_ok=True)
                log.info("duplicate instance %s ignored (already stored as #%s)", meta.sop_instance_uid, existing[0])
                return AddResult(existing[0], True, self.spool_dir / existing[1])
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_path, dest)
            fsync_dir(dest.parent)
            now = time.time()  # as late as possible: received_at is when the instance is safely ours
            row = {
                **meta.__dict__, "path": str(dest.relative_to(self.spool_dir)), "sha256": sha, "size": size,
                "source": source, "calling_ae": calling_ae, "state": RECEIVED, "reason": None, "label": None,
                "received_at": now, "updated_at": now,
                "receive_ms": round((time.perf_counter() - started) * 1000, 2) if started is not None else None,
            }
            if existing is not None:  # a quarantined copy is replaced by a good resend
                db["instances"].update(existing[0], {**row, "attempts": 0})
                iid = existing[0]
            else:
                iid = db["instances"].insert(row).last_pk
            self._touch_study(db, meta.study_uid, meta.modality, now)
        return AddResult(iid, False, dest)

    def add_quarantined(self, tmp_path: Path | None, reason: str, *, source: str, original_name: str | None = None,
                        meta: InstanceMeta | None = None, calling_ae: str | None = None) -> int:
        """Keep bad input for inspection, with its reason; never fail the caller for it."""
        now = time.time()
        dest_rel = ""
        size = 0
        sha = None
        if tmp_path is not None and tmp_path.exists():
            size = tmp_path.stat().st_size
            sha = file_sha256(tmp_path)
            dest = self.quarantine_dir / f"{time.time_ns()}-{sha[:12]}.bin"
            os.replace(tmp_path, dest)
            dest_rel = str(dest)
        fields_ = dict(meta.__dict__) if meta else {}
        with self._tx() as db:
            if meta is not None:
                existing = db.execute("SELECT id FROM instances WHERE sop_instance_uid = ?", [meta.sop_instance_uid]).fetchone()
                if existing is not None:
                    # Same UID already stored well: keep the good one, record the bad copy without a UID.
                    fields_["sop_instance_uid"] = None
            iid = db["instances"].insert({
                **fields_, "path": dest_rel, "sha256": sha, "size": size, "source": source, "calling_ae": calling_ae,
                "state": QUARANTINED, "reason": reason, "received_at": now, "updated_at": now,
            }).last_pk
            db["events"].insert({"at": now, "kind": "quarantine",
                                 "detail": json.dumps({"instance": iid, "reason": reason, "name": original_name})})
            if meta is not None and meta.study_uid:
                self._touch_study(db, meta.study_uid, meta.modality, now)
                self._refresh_study_label(db, meta.study_uid)
        log.warning("quarantined #%s from %s: %s", iid, source, reason)
        return iid

    @staticmethod
    def _touch_study(db, study_uid: str, modality: str, now: float) -> None:
        db.execute(
            "INSERT INTO studies (study_uid, modality, n_instances, first_received_at, updated_at) VALUES (?, ?, 0, ?, ?) "
            "ON CONFLICT(study_uid) DO UPDATE SET updated_at = excluded.updated_at, "
            "modality = COALESCE(studies.modality, excluded.modality)",
            [study_uid, modality, now, now])
        Store._recount(db, study_uid)

    @staticmethod
    def _recount(db, study_uid: str) -> None:
        # Counted, not incremented: a resend replacing a quarantined copy, or a bad duplicate, is not a new image,
        # and the hub waits for exactly this many (quarantined images and our own SR/SC never travel as images).
        db.execute("UPDATE studies SET n_instances = (SELECT COUNT(*) FROM instances WHERE study_uid = ? AND "
                   "state != ? AND COALESCE(source, '') != 'wasla') WHERE study_uid = ?",
                   [study_uid, QUARANTINED, study_uid])

    # --- processing ----------------------------------------------------------------------------------------
    def recover(self) -> int:
        """After a crash or stop, work left in `processing` goes back to the queue."""
        with self._tx() as db:
            cur = db.execute("UPDATE instances SET state = ?, updated_at = ? WHERE state = ?", [RECEIVED, time.time(), PROCESSING])
            return cur.rowcount

    def claim_next(self) -> dict | None:
        """Atomically take the oldest received instance into processing."""
        with self._tx(durable=False) as db:
            row = db.execute(
                "UPDATE instances SET state = ?, attempts = attempts + 1, updated_at = ? "
                "WHERE id = (SELECT id FROM instances WHERE state = ? ORDER BY id LIMIT 1) RETURNING *",
                [PROCESSING, time.time(), RECEIVED]).fetchone()
            if row is None:
                return None
            cols = [c[0] for c in db.execute("SELECT * FROM instances LIMIT 0").description]
            return dict(zip(cols, row))

    def _transition(self, db, instance_id: int, to: str, **extra) -> dict:
        row = db.execute("SELECT state, study_uid FROM instances WHERE id = ?", [instance_id]).fetchone()
        if row is None:
            raise NotFoundError(f"instance #{instance_id} not found")
        if to not in TRANSITIONS[row[0]]:
            raise StateError(f"instance #{instance_id}: {row[0]} -> {to} is not allowed")
        db["instances"].update(instance_id, {"state": to, "updated_at": time.time(), **extra})
        return {"state": row[0], "study_uid": row[1]}

    def record_triage(self, instance_id: int, label: str, reasons: list[dict], results: list[dict]) -> None:
        """processing -> triaged with its results and the study's label, in one transaction."""
        now = time.time()
        with self._tx() as db:
            prev = self._transition(db, instance_id, TRIAGED, label=label, triaged_at=now, reason=None)
            db.execute("DELETE FROM results WHERE instance_id = ?", [instance_id])
            for r in results:
                db["results"].insert({
                    "instance_id": instance_id, "model": r.get("model"), "model_version": r.get("model_version"),
                    "backend": r.get("backend"), "scores": json.dumps(r.get("scores")),
                    "thresholds": json.dumps(r.get("thresholds")), "label": r.get("label"),
                    "reasons": json.dumps(r.get("reasons", [])), "timings": json.dumps(r.get("timings", {})),
                    "created_at": now,
                })
            if not results:
                db["results"].insert({"instance_id": instance_id, "label": label, "reasons": json.dumps(reasons),
                                      "timings": json.dumps({}), "created_at": now})
            if prev["study_uid"]:
                self._refresh_study_label(db, prev["study_uid"])

    def quarantine(self, instance_id: int, reason: str) -> None:
        with self._tx() as db:
            prev = self._transition(db, instance_id, QUARANTINED, reason=reason)
            db["events"].insert({"at": time.time(), "kind": "quarantine",
                                 "detail": json.dumps({"instance": instance_id, "reason": reason})})
            if prev["study_uid"]:
                self._refresh_study_label(db, prev["study_uid"])
        log.warning("quarantined #%s: %s", instance_id, reason)

    def release(self, instance_id: int) -> None:
        """processing -> received: a clean stop hands unfinished work back."""
        with self._tx() as db:
            self._transition(db, instance_id, RECEIVED)

    @staticmethod
    def _refresh_study_label(db, study_uid: str) -> None:
        Store._recount(db, study_uid)
        rows = db.execute("SELECT state, label, reason FROM instances WHERE study_uid = ?", [study_uid]).fetchall()
        labels = [r[1] for r in rows if r[0] not in (RECEIVED, PROCESSING, QUARANTINED) and r[1]]
        reasons: list[dict] = []
        if any(r[0] == QUARANTINED for r in rows):
            # A patient whose image could not be read has not been triaged: a human must look.
            labels.append("review")
            reasons.append({"code": "instance_quarantined"})
        label = most_severe(labels) if labels else None
        pending = any(r[0] in (RECEIVED, PROCESSING) for r in rows)
        db.execute("UPDATE studies SET label = ?, reasons = ?, triaged_at = ? WHERE study_uid = ?",
                   [label, json.dumps(reasons), None if pending or label is None else time.time(), study_uid])

    def requeue(self, *, instance_id: int | None = None, study_uid: str | None = None, quarantined_only: bool = False) -> int:
        """Send triaged or quarantined instances through the pipeline again (e.g. after a model update)."""
        states = (QUARANTINED,) if quarantined_only else (QUARANTINED, TRIAGED)
        with self._tx() as db:
            if instance_id is not None:
                where, params = "id = ?", [instance_id]
            elif study_uid is not None:
                where, params = "study_uid = ?", [study_uid]
            else:
                raise StoreError("requeue needs an instance id or a study uid")
            # Results the box wrote itself (SR/SC, source "wasla") are never triaged: they are rewritten instead.
            rows = db.execute(f"SELECT id, state, path FROM instances WHERE {where} AND COALESCE(source, '') != 'wasla'",
                              params).fetchall()
            if not rows:
                raise NotFoundError(f"nothing to requeue for {study_uid or '#' + str(instance_id)}")
            n = 0
            for iid, state, path in rows:
                # A quarantined file that never reached the spool (unreadable input) cannot be re-run.
                if state in states and path and not Path(path).is_absolute():
                    db["instances"].update(iid, {"state": RECEIVED, "label": None, "reason": None, "updated_at": time.time()})
                    # A pack failure recorded for it (edge/uplink/packer.py) is forgotten: it is tried afresh.
                    db.execute("DELETE FROM outbox WHERE kind = 'pack' AND instance_id = ?", [iid])
                    n += 1
            return n

    def purge(self, acknowledged_before: float) -> int:
        """Delete the spool files of instances the hub acknowledged before the cutoff (acknowledged -> purged).

        Rows stay, so results, reads and the audit trail remain; only the pixels are gone from the box."""
        with self._tx() as db:
            rows = db.execute("SELECT id, path FROM instances WHERE state = ? AND updated_at < ?",
                              [ACKNOWLEDGED, acknowledged_before]).fetchall()
            for iid, _path in rows:
                self._transition(db, iid, PURGED)
        # Files go after the commit: a crash in between leaves a file without a purpose, never a row without a file.
        for _iid, path in rows:
            if path and not Path(path).is_absolute():
                (self.spool_dir / path).unlink(missing_ok=True)
        if rows:
            log.info("purged the files of %d acknowledged instance(s)", len(rows))
        return len(rows)

    # --- reads -----------------------------------------------------------------------------------------------
    def spool_damage(self, row: dict) -> str | None:
        """Why the spool file of instance `row` no longer is what was received (missing, other size, other
        sha256), or None. The uploader checks before packing; `wasla doctor` checks every file still to send."""
        path = self.instance_path(row)
        try:
            size = path.stat().st_size
        except OSError as err:
            return f"spool file unreadable: {type(err).__name__}"
        if row.get("size") and size != row["size"]:
            return f"spool file is {size} bytes, {row['size']} were received: damaged on disk, ask the modality to resend"
        if row.get("sha256") and file_sha256(path) != row["sha256"]:
            return "spool file sha256 differs from the one recorded at receipt: damaged on disk, ask the modality to resend"
        return None

    def instance_path(self, row: dict) -> Path:
        return self.spool_dir / row["path"]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for r in self.query("SELECT state, COUNT(*) AS n FROM instances GROUP BY state"):
            out[r["state"]] = r["n"]
        return out

    def label_counts(self) -> dict[str, int]:
        return {r["label"] or "pending": r["n"] for r in self.query("SELECT label, COUNT(*) AS n FROM studies GROUP BY label")}

    def last_ingest(self) -> float | None:
        rows = self.query("SELECT MAX(received_at) AS t FROM instances")
        return rows[0]["t"] if rows else None

    def studies(self, *, label: str | None = None, since: float | None = None, until: float | None = None,
                limit: int = 100) -> list[dict]:
        where, params = ["1=1"], []
        if label:
            where.append("label = ?"); params.append(label)
        if since is not None:
            where.append("first_received_at >= ?"); params.append(since)
        if until is not None:
            where.append("first_received_at < ?"); params.append(until)
        sql = (f"SELECT * FROM studies WHERE {' AND '.join(where)} "
               "ORDER BY CASE label WHEN 'urgent' THEN 0 WHEN 'review' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END, "
               "first_received_at DESC LIMIT ?")
        rows = self.query(sql, params + [limit])
        for r in rows:
            r["reasons"] = json.loads(r["reasons"] or "[]")
        return rows

    def quarantined(self, limit: int = 100) -> list[dict]:
        return self.query("SELECT id, sop_instance_uid, study_uid, source, reason, size, received_at, path "
                          "FROM instances WHERE state = ? ORDER BY id DESC LIMIT ?", [QUARANTINED, limit])

    def study(self, study_uid: str) -> dict:
        study = find_study(self.query, study_uid)
        study["reasons"] = json.loads(study["reasons"] or "[]")
        study["instances"] = self.query("SELECT * FROM instances WHERE study_uid = ? ORDER BY id", [study["study_uid"]])
        for inst in study["instances"]:
            inst["results"] = self.query("SELECT * FROM results WHERE instance_id = ? ORDER BY id", [inst["id"]])
            for r in inst["results"]:
                for k in ("scores", "thresholds", "reasons", "timings"):
                    r[k] = json.loads(r[k]) if r[k] else None
        return study

    def iter_spool_files(self) -> Iterator[Path]:
        for sub in self.spool_dir.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                yield from sub.glob("*.dcm")

    def known_paths(self) -> set[str]:
        return {r["path"] for r in self.query("SELECT path FROM instances")}

    # --- for edge/uplink/outbox.py: its own tables, and instance transitions in the same transaction ----------------------
    def transaction(self):
        """BEGIN IMMEDIATE under the writer lock; commits on success, rolls back on an exception."""
        return self._tx()

    def transition(self, db, instance_id: int, to: str, **extra) -> dict:
        """One state-machine step inside `transaction()`; StateError when the machine does not allow it."""
        return self._transition(db, instance_id, to, **extra)
