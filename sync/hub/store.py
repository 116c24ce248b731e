"""The hub's store: study files on disk plus an index (transfers, chunks, instances, studies, boxes, reads) in SQLite,
or in PostgreSQL through sync/hub/store_pg.py."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from sync.core.diskguard import describe_store_error
from sync.core.errors import StoreError, UidCollisionError
from sync.core.sqlite import find_study, write_transaction
from sync.hub import migrations
from sync.core.fsutil import atomic_write

log = logging.getLogger(__name__)

LABEL_ORDER = "CASE label WHEN 'urgent' THEN 0 WHEN 'review' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END"
SEVERITY = {"normal": 0, "review": 1, "urgent": 2}
CLAIM_STALE_S = 120.0


def safe_name(uid: str) -> str:
    # A DICOM UID (digits in dot-separated groups) becomes a path component as it is; anything else (".." included)
    # only as a hash.
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid or "") and len(uid) <= 64:
        return uid
    return hashlib.sha256((uid or "").encode()).hexdigest()[:32]


class SqliteIndex:
    """The default index: one SQLite file beside the study files. HubStore runs its SQL on this or on
    sync.hub.store_pg.PostgresIndex; both offer tx(), query(), close(), instance_lock() and the dialect below."""

    # The few SQL fragments the two dialects spell differently.
    insert_or_ignore, on_conflict_ignore, greatest = "INSERT OR IGNORE", "", "MAX"
    for_update = ""  # BEGIN IMMEDIATE already holds the whole file

    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self._wal()
            self.conn.execute("PRAGMA synchronous=FULL")
            migrations.migrate_sqlite(self.conn)
        except sqlite3.Error as err:
            raise StoreError(f"cannot open hub store {self.db_path}: {describe_store_error(err, self.db_path)}") from err
        self._lock = threading.RLock()
        self._local = threading.local()
        self._savepoints = 0

    def _wal(self) -> None:
        # Switching a new file to WAL takes it exclusively and SQLite's busy timeout does not cover that: receivers
        # starting together on a new index got "database is locked" at once. The switch is tried again for a while.
        for attempt in range(100):
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or attempt == 99:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def tx(self):
        # Several receivers share the file: BEGIN may time out, and write_transaction never keeps our lock then.
        if getattr(self._local, "batch", False):
            return self._savepoint()
        return write_transaction(self._lock, self.conn)

    @contextlib.contextmanager
    def batch(self):
        """One durable transaction (one fsync) around many messages' writes: tx() inside it is a SAVEPOINT, so one
        message's failure rolls back that message only. The caller acknowledges the messages after it returns."""
        with write_transaction(self._lock, self.conn):
            self._local.batch = True
            try:
                yield
            finally:
                self._local.batch = False

    @contextlib.contextmanager
    def _savepoint(self):
        with self._lock:
            self._savepoints += 1
            name = f"sp{self._savepoints}"
            self.conn.execute(f"SAVEPOINT {name}")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
                raise
            self.conn.execute(f"RELEASE {name}")

    def query(self, sql: str, params=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    @contextlib.contextmanager
    def instance_lock(self, sop_instance_uid: str):
        # Receivers beside each other are separate processes sharing this file: an flock on one of 256 lock files
        # (by UID hash) keeps two of them from filing the same SOP instance at once.
        slot = hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:2]
        lock_dir = self.db_path.parent / "locks"
        lock_dir.mkdir(exist_ok=True)
        fd = os.open(lock_dir / f"instance-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock


class HubStore:
    def __init__(self, db_path: Path | None, studies_dir: Path, partial_dir: Path, index=None):
        """`index` (a PostgresIndex) replaces the SQLite file at `db_path`; study files stay under studies_dir."""
        self.db_path = Path(db_path) if db_path is not None else None
        self.studies_dir, self.partial_dir = Path(studies_dir), Path(partial_dir)
        for d in (self.studies_dir, self.partial_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.index = index if index is not None else SqliteIndex(self.db_path)

    @classmethod
    def from_config(cls, cfg) -> "HubStore":
        """SQLite under data_dir, or the PostgreSQL database of hub.database_url (psycopg imported only then)."""
        if cfg.hub.database_url:
            from sync.hub.store_pg import PostgresIndex

            return cls(None, cfg.studies_dir, cfg.partial_dir, index=PostgresIndex(cfg.hub.database_url))
        return cls(cfg.db_path, cfg.studies_dir, cfg.partial_dir)

    def close(self) -> None:
        self.index.close()

    def tx(self):
        return self.index.tx()

    def batch(self):
        """Many messages in one durable transaction where the index can (SQLite); elsewhere each keeps its own."""
        batch = getattr(self.index, "batch", None)
        return batch() if batch is not None else contextlib.nullcontext()

    def query(self, sql: str, params=()) -> list[dict]:
        return self.index.query(sql, params)

    # --- boxes and dead letters ---------------------------------------------------------------------------------
    def seen(self, device: str, *, chunk: bool = False, dup: bool = False, bad: bool = False) -> None:
        now = time.time()
        with self.tx() as db:
            self._count(db, device, now, chunk=chunk, dup=dup, bad=bad)

    @staticmethod
    def _count(db, device: str, now: float, *, chunk: bool = False, dup: bool = False, bad: bool = False) -> None:
        # One statement (one round trip on PostgreSQL): it runs for every message a box sends.
        db.execute("INSERT INTO boxes (device, first_seen, last_seen, messages, chunks, dup_chunks, bad_messages) "
                   "VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT(device) DO UPDATE SET last_seen = excluded.last_seen, "
                   "messages = boxes.messages + 1, chunks = boxes.chunks + excluded.chunks, "
                   "dup_chunks = boxes.dup_chunks + excluded.dup_chunks, "
                   "bad_messages = boxes.bad_messages + excluded.bad_messages",
                   [device, now, now, int(chunk), int(dup), int(bad)])

    def dead_letter(self, topic: str, device: str | None, reason: str, payload: bytes) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO dead_letters (at, topic, device, reason, size, head) VALUES (?, ?, ?, ?, ?, ?)",
                       [time.time(), topic[:300], device, reason[:500], len(payload), payload[:64].hex()])
        log.warning("dead letter on %s: %s", topic, reason)

    def record_status(self, device: str, online: bool, at: float, *, count_message: bool = False) -> None:
        with self.tx() as db:
            if count_message:  # the row exists after this, for the UPDATE below
                self._count(db, device, time.time())
            db.execute("UPDATE boxes SET online = ?, status_at = ? WHERE device = ?", [int(online), at, device])

    def record_heartbeat(self, device: str, fields: dict, *, count_message: bool = False) -> None:
        with self.tx() as db:
            if count_message:
                self._count(db, device, time.time())
            db.execute("UPDATE boxes SET heartbeat = ?, heartbeat_at = ?, queue_depth = ?, oldest_unsent_at = ?, "
                       "online = 1 WHERE device = ?",
                       [json.dumps(fields), time.time(), fields.get("queue_depth"), fields.get("oldest_unsent_at"),
                        device])
            for rid in fields.get("reads_applied") or []:
                db.execute("UPDATE reads SET delivered_at = ? WHERE read_id = ? AND device = ? AND delivered_at IS NULL",
                           [time.time(), str(rid), device])

    # --- flags --------------------------------------------------------------------------------------------------
    def study_owner(self, study_uid: str) -> str | None:
        rows = self.query("SELECT device FROM studies WHERE study_uid = ?", [study_uid])
        return rows[0]["device"] if rows else None

    def check_owner(self, device: str, study_uid: str | None, sop_uid: str | None = None) -> None:
        """UidCollisionError when the study or instance is already held for another box (the first box keeps it)."""
        owner = self.study_owner(study_uid) if study_uid else None
        if owner is not None and owner != device:
            raise UidCollisionError("study", study_uid, owner, device)
        copy = self.stored_copy(sop_uid)
        if copy is not None and copy["device"] != device:
            raise UidCollisionError("instance", sop_uid, copy["device"], device)

    def record_collision(self, err: UidCollisionError) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT INTO uid_collisions (kind, uid, owner, claimant, first_at, last_at) "
                       "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(kind, uid, claimant) DO UPDATE SET "
                       "last_at = excluded.last_at, times = uid_collisions.times + 1",
                       [err.kind, err.uid[:128], err.owner, err.claimant, now, now])

    def collisions(self) -> list[dict]:
        return self.query("SELECT * FROM uid_collisions ORDER BY last_at DESC")

    def record_flag(self, device: str, f: dict, preview: bytes | None, *, count_message: bool = False) -> None:
        """File a flag; with count_message, the box's message counters go in the same transaction (a flag refused for
        a collision is then counted once, as a bad message, by the refusal)."""
        now = time.time()
        preview_path = None
        if preview:
            # Before the preview file is written: another box's study keeps its preview. (Its reasons and label are
            # kept by the owner check inside the transaction below, which is all a flag without a preview needs.)
            self.check_owner(device, f["study_uid"])
            folder = self.studies_dir / safe_name(f["study_uid"])
            folder.mkdir(parents=True, exist_ok=True)
            preview_path = folder / "preview.jpg"
            tmp = preview_path.with_suffix(".tmp")
            tmp.write_bytes(preview)
            os.replace(tmp, preview_path)
        with self.tx() as db:
            if count_message:
                self._count(db, device, now)
            db.execute("INSERT INTO flags (flag_id, device, study_uid, label, received_at) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT(device, flag_id) DO UPDATE SET times = flags.times + 1",
                       [f["flag_id"], device, f["study_uid"], f["label"], now])
            self._touch_study(db, device, f["study_uid"], f["label"], now)
            db.execute("UPDATE studies SET reasons = ?, modality = COALESCE(?, modality), "
                       f"n_expected = {self.index.greatest}(n_expected, ?), flagged_at = COALESCE(flagged_at, ?), "
                       "preview_path = COALESCE(?, preview_path) WHERE study_uid = ?",
                       [json.dumps(f.get("reasons") or []), f.get("modality"), f.get("n_instances") or 0,
                        f.get("at") or now, str(preview_path) if preview_path else None, f["study_uid"]])

    def _touch_study(self, db, device: str, study_uid: str, label: str | None, now: float) -> None:
        # Insert-then-lock, not look-then-insert: receivers sharing a PostgreSQL index take no global lock, so the
        # row is created by whichever comes first and the other waits on its row lock, then sees it.
        cur = db.execute("INSERT INTO studies (study_uid, device, label, first_seen, updated_at) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(study_uid) DO NOTHING", [study_uid, device, label, now, now])
        if cur.rowcount > 0:
            return
        row = db.execute(f"SELECT label, device FROM studies WHERE study_uid = ?{self.index.for_update}",
                         [study_uid]).fetchone()
        if row["device"] != device:
            # Checked inside the transaction: two boxes racing for one study UID cannot both win.
            raise UidCollisionError("study", study_uid, row["device"], device)
        if label and SEVERITY.get(label, -1) > SEVERITY.get(row["label"] or "", -1):
            # An escalation (a later image made it urgent) wins; a stale lower label never downgrades.
            db.execute("UPDATE studies SET label = ?, updated_at = ? WHERE study_uid = ?", [label, now, study_uid])

    # --- transfers ----------------------------------------------------------------------------------------------
    def upsert_transfer(self, device: str, m: dict) -> dict:
        """Create the transfer from a manifest or its first chunk (whichever comes first); return its row."""
        now = time.time()
        tid = m["transfer"]
        with self.tx() as db:
            cur = db.execute("INSERT INTO transfers (transfer_id, device, study_uid, label, size, sha256, chunk_size, "
                             "count, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                             "ON CONFLICT(transfer_id) DO NOTHING",
                             [tid, device, m["study_uid"], m.get("label"), m["size"], m["sha256"], m["chunk_size"],
                              m["count"], now, now])
            if cur.rowcount > 0:
                self._touch_study(db, device, m["study_uid"], m.get("label"), now)
            else:
                row = db.execute(f"SELECT device, size, sha256, chunk_size FROM transfers WHERE transfer_id = ?"
                                 f"{self.index.for_update}", [tid]).fetchone()
                if row["device"] != device:
                    raise StoreError(f"transfer {tid} belongs to another device")
                if (row["size"], row["sha256"], row["chunk_size"]) != (m["size"], m["sha256"], m["chunk_size"]):
                    raise StoreError(f"transfer {tid}: size, sha256 or chunk size differ from the first message")
            if "sop_instance_uid" in m:  # a manifest: the descriptive fields
                db.execute("UPDATE transfers SET sop_instance_uid = ?, codec = ?, transfer_syntax = ?, "
                           "original_size = ?, ratio = ?, label = COALESCE(?, label) WHERE transfer_id = ?",
                           [m["sop_instance_uid"], m.get("codec"), m.get("transfer_syntax"), m.get("original_size"),
                            m.get("ratio"), m.get("label"), tid])
            return dict(db.execute("SELECT * FROM transfers WHERE transfer_id = ?", [tid]).fetchone())

    def stored_copy(self, sop_instance_uid: str | None) -> dict | None:
        if not sop_instance_uid:
            return None
        rows = self.query("SELECT * FROM instances WHERE sop_instance_uid = ?", [sop_instance_uid])
        return rows[0] if rows else None

    def part_path(self, tid: str) -> Path:
        return self.partial_dir / f"{tid}.part"

    def put_chunk(self, tid: str, index: int, offset: int, data: bytes) -> bool:
        """Write a verified chunk durably, then record it; False when it was already here (a duplicate)."""
        if self.query("SELECT 1 FROM chunks WHERE transfer_id = ? AND idx = ?", [tid, index]):
            with self.tx() as db:
                db.execute("UPDATE transfers SET dup_chunks = dup_chunks + 1 WHERE transfer_id = ?", [tid])
            return False
        fd = os.open(self.part_path(tid), os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.tx() as db:
            cur = db.execute(f"{self.index.insert_or_ignore} INTO chunks (transfer_id, idx, at) VALUES (?, ?, ?)"
                             f"{self.index.on_conflict_ignore}", [tid, index, time.time()])
            db.execute("UPDATE transfers SET updated_at = ? WHERE transfer_id = ?", [time.time(), tid])
            return cur.rowcount > 0

    def have(self, tid: str) -> set[int]:
        return {r["idx"] for r in self.query("SELECT idx FROM chunks WHERE transfer_id = ?", [tid])}

    def transfer(self, tid: str) -> dict | None:
        rows = self.query("SELECT * FROM transfers WHERE transfer_id = ?", [tid])
        return rows[0] if rows else None

    def claim_for_verify(self, tid: str, by: str | None = None) -> bool:
        """One receiver verifies a complete transfer; a claim left by a crashed receiver goes stale and is retaken
        (at once by that receiver's next start: release_claims)."""
        now = time.time()
        with self.tx() as db:
            cur = db.execute("UPDATE transfers SET state = 'verifying', claimed_at = ?, claimed_by = ? "
                             "WHERE transfer_id = ? AND "
                             "(state = 'receiving' OR (state = 'verifying' AND claimed_at < ?))",
                             [now, by, tid, now - CLAIM_STALE_S])
            return cur.rowcount > 0

    def release_claims(self, hub_id: str, keep: str) -> int:
        """At a receiver's start: claims its previous run (same hub id, another claimant) left are given back."""
        with self.tx() as db:
            cur = db.execute("UPDATE transfers SET state = 'receiving', claimed_at = NULL, claimed_by = NULL "
                             "WHERE state = 'verifying' AND claimed_by LIKE ? AND claimed_by != ?",
                             [f"{hub_id}:%", keep])
            return cur.rowcount

    def partial_bytes(self, device: str) -> int:
        """Bytes a box has declared in transfers not yet finished (its quota's measure)."""
        rows = self.query("SELECT COALESCE(SUM(size), 0) AS n FROM transfers WHERE device = ? AND state IN "
                          "('receiving', 'verifying')", [device])
        return int(rows[0]["n"] or 0)

    def expire_partials(self, older_than: float) -> int:
        """Unfinished transfers untouched since `older_than` lose their chunks and row; a box that comes back
        sends the manifest again and starts a fresh one."""
        rows = self.query("SELECT transfer_id FROM transfers WHERE state = 'receiving' AND updated_at < ?",
                          [older_than])
        for r in rows:
            with self.tx() as db:
                db.execute("DELETE FROM chunks WHERE transfer_id = ?", [r["transfer_id"]])
                db.execute("DELETE FROM transfers WHERE transfer_id = ? AND state = 'receiving'",
                           [r["transfer_id"]])
            self.part_path(r["transfer_id"]).unlink(missing_ok=True)
        return len(rows)

    def discard_chunks(self, tid: str, reason: str) -> None:
        """The assembled file failed its sha256: start the transfer over."""
        with self.tx() as db:
            db.execute("DELETE FROM chunks WHERE transfer_id = ?", [tid])
            db.execute("UPDATE transfers SET state = 'receiving', claimed_at = NULL, retries = retries + 1, reason = ?, "
                       "updated_at = ? WHERE transfer_id = ?", [reason, time.time(), tid])
        self.part_path(tid).unlink(missing_ok=True)

    def fail_transfer(self, tid: str, reason: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE transfers SET state = 'failed', reason = ?, updated_at = ? WHERE transfer_id = ?",
                       [reason, time.time(), tid])
        self.part_path(tid).unlink(missing_ok=True)

    def commit_instance(self, t: dict, sop_uid: str, study_uid: str, data: bytes, counts_as_image: bool = True,
                        supersedes: tuple[str, ...] = ()) -> bool:
        """File first (temp, fsync, rename), then its row; exactly one copy per SOP Instance UID. True if new.

        `supersedes`: the result documents this one replaces (its PredecessorDocumentsSequence). Recorded whether or
        not they have arrived yet, so an older SR that comes in after its successor is hidden as well."""
        now = time.time()
        folder = self.studies_dir / safe_name(study_uid)
        dest = folder / f"{safe_name(sop_uid)}.dcm"
        # The index's instance lock spans look-up, file and row, so the file on disk is the copy its row describes
        # even when two receivers file one SOP instance (two transfers of it) at the same moment.
        with self.index.instance_lock(sop_uid):
            existing = self.stored_copy(sop_uid)
            if existing is not None and existing["device"] != t["device"]:
                raise UidCollisionError("instance", sop_uid, existing["device"], t["device"])
            if existing is None:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(dest, data, tmp=folder / f".{uuid.uuid4().hex}.tmp")
            with self.tx() as db:
                cur = db.execute(
                    f"{self.index.insert_or_ignore} INTO instances (sop_instance_uid, study_uid, device, transfer_id, "
                    "sha256, size, original_size, codec, transfer_syntax, path, stored_at, sop_class_uid) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?){self.index.on_conflict_ignore}",
                    [sop_uid, study_uid, t["device"], t["transfer_id"], t["sha256"], t["size"],
                     t.get("original_size") or t["size"], t.get("codec"), t.get("transfer_syntax"),
                     str(dest.relative_to(self.studies_dir)), now, t.get("sop_class_uid")])
                new = cur.rowcount > 0
                if new:
                    self._touch_study(db, t["device"], study_uid, t.get("label"), now)
                    db.execute("UPDATE studies SET n_instances = n_instances + ?, wire_bytes = wire_bytes + ?, "
                               "original_bytes = original_bytes + ?, updated_at = ? WHERE study_uid = ?",
                               [int(counts_as_image), t["size"], t.get("original_size") or t["size"], now, study_uid])
                db.execute("UPDATE transfers SET state = 'complete', completed_at = ?, sop_instance_uid = ?, "
                           "study_uid = ?, updated_at = ? WHERE transfer_id = ?", [now, sop_uid, study_uid, now,
                                                                                   t["transfer_id"]])
                db.execute("DELETE FROM chunks WHERE transfer_id = ?", [t["transfer_id"]])
                for old in supersedes:
                    if old != sop_uid:
                        db.execute(f"{self.index.insert_or_ignore} INTO superseded (sop_instance_uid, by_sop, "
                                   f"study_uid, at) VALUES (?, ?, ?, ?){self.index.on_conflict_ignore}",
                                   [old, sop_uid, study_uid, now])
        self.part_path(t["transfer_id"]).unlink(missing_ok=True)
        return new

    def instance_file(self, row: dict) -> Path:
        return self.studies_dir / row["path"]

    # --- reads, worklist, boxes ---------------------------------------------------------------------------------
    def study(self, study_uid: str) -> dict:
        s = find_study(self.query, study_uid)
        # A result document replaced by a later one (an image arrived after the first SR) carries superseded_by.
        s["instances"] = self.query("SELECT i.*, x.by_sop AS superseded_by FROM instances i LEFT JOIN superseded x "
                                    "ON x.sop_instance_uid = i.sop_instance_uid WHERE i.study_uid = ? "
                                    "ORDER BY i.stored_at", [s["study_uid"]])
        return s

    def add_read(self, study_uid: str, disposition: str, note: str | None, by: str | None,
                 findings: list[str] | None = None) -> dict:
        s = self.study(study_uid)
        read = {"read_id": uuid.uuid4().hex, "study_uid": s["study_uid"], "device": s["device"],
                "disposition": disposition, "note": note, "by": by, "at": time.time(),
                "findings": json.dumps(findings) if findings else None}
        with self.tx() as db:
            db.execute("INSERT INTO reads (read_id, study_uid, device, disposition, note, by, at, findings) "
                       "VALUES (:read_id, :study_uid, :device, :disposition, :note, :by, :at, :findings)", read)
            db.execute("UPDATE studies SET read_disposition = ?, read_note = ?, read_by = ?, read_at = ? "
                       "WHERE study_uid = ?", [disposition, note, by, read["at"], s["study_uid"]])
        return read

    def reads_to_publish(self, device: str, older_than: float) -> list[dict]:
        return self.query("SELECT * FROM reads WHERE device = ? AND delivered_at IS NULL AND "
                          "(published_at IS NULL OR published_at < ?) ORDER BY at", [device, older_than])

    def read_published(self, read_id: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE reads SET published_at = ? WHERE read_id = ?", [time.time(), read_id])

    def worklist(self, limit: int = 200, unread_only: bool = False) -> list[dict]:
        where = "WHERE read_disposition IS NULL" if unread_only else ""
        return self.query(f"SELECT study_uid, device, label, modality, n_instances, n_expected, wire_bytes, "
                          f"original_bytes, COALESCE(flagged_at, first_seen) AS since, read_disposition "
                          f"FROM studies {where} ORDER BY {LABEL_ORDER}, since ASC LIMIT ?", [limit])

    def boxes(self) -> list[dict]:
        rows = self.query("SELECT * FROM boxes ORDER BY device")
        for r in rows:
            hb = json.loads(r.pop("heartbeat") or "{}")
            r["link"] = hb.get("link") or {}
            r["models"] = hb.get("models") or []
            r["disk_free_mb"] = hb.get("disk_free_mb")
            r["dup_ratio"] = round(r["dup_chunks"] / r["chunks"], 3) if r["chunks"] else 0.0
            r["receiving"] = self.query("SELECT COUNT(*) AS n FROM transfers WHERE device = ? AND state IN "
                                        "('receiving', 'verifying')", [r["device"]])[0]["n"]
        return rows

    def dead_letters(self, limit: int = 100) -> list[dict]:
        return self.query("SELECT id, at, topic, device, reason, size FROM dead_letters ORDER BY id DESC LIMIT ?", [limit])
