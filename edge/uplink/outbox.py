"""The box's outbox over its SQLite store: which flags and instance transfers exist, what the hub confirmed, reads in."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from sync.core.errors import StateError
from edge.store import ACKNOWLEDGED, QUARANTINED, QUEUED, SENT, TRIAGED, Store
from sync.wire import protocol
from sync.core.fsutil import atomic_write

log = logging.getLogger(__name__)

FLAG, TRANSFER, PACK = "flag", "transfer", "pack"  # pack: an instance that cannot be packed (failed rows only)
PENDING, CONFIRMED, DONE, FAILED = "pending", "confirmed", "done", "failed"
ACTIVE = (PENDING, CONFIRMED)
# Within a band the transfer with the fewest bytes left goes first (one large CR must not hold a dozen small studies
# for minutes on a 256 kbit/s link), but a transfer queued longer than this goes in arrival order ahead of newer ones,
# so a steady stream of small studies can never starve a large one.
FAIR_AFTER_S = 1800.0


def transfer_id(device: str, sop_instance_uid: str, sha256: str) -> str:
    # Deterministic: re-encoding the same instance after a crash yields the same id, so the hub resumes it.
    return hashlib.sha256(f"{device}\0{sop_instance_uid}\0{sha256}".encode()).hexdigest()[:32]


def flag_id(study_uid: str, label: str) -> str:
    """`label-studyuid`, or `label-h<sha256 prefix>` for a UID the protocol's id pattern cannot carry (rows from
    before ingest checked UIDs): a flag that cannot be encoded would block every flag and study behind it."""
    fid = f"{label}-{study_uid}"
    if protocol.valid_id(fid):
        return fid
    return f"{label}-h{hashlib.sha256(study_uid.encode('utf-8', 'replace')).hexdigest()[:40]}"


def remaining_bytes(row: dict) -> int:
    """Bytes of a transfer the hub has not confirmed (0 for flags and fully confirmed transfers)."""
    if row["kind"] != TRANSFER or row["state"] != PENDING:
        return 0
    try:
        have = sum(b - a + 1 for a, b in json.loads(row["have"] or "[]"))
    except (ValueError, TypeError):
        have = 0
    return max(0, int(row["size"] or 0) - have * int(row["chunk_size"] or 0))


def _send_order(row: dict, now: float) -> tuple:
    # Flags and aged transfers: arrival order, ahead of the fresh transfers of their band, which go smallest first.
    if row["kind"] != TRANSFER or now - (row["created_at"] or now) > FAIR_AFTER_S:
        return (row["priority"], 0, 0, row["id"])
    return (row["priority"], 1, remaining_bytes(row), row["id"])


class Outbox:
    """All sync bookkeeping goes through here, in the store's single-writer transactions."""

    def __init__(self, store: Store, wire_dir: Path, device: str):
        self.store = store
        self.wire_dir = Path(wire_dir)
        self.wire_dir.mkdir(parents=True, exist_ok=True)
        self.device = device

    # --- what needs queueing ----------------------------------------------------------------------------------
    def studies_needing_flags(self) -> list[dict]:
        """Labelled studies with triaged work whose current label has not been flagged yet (new or escalated)."""
        return self.store.query(
            "SELECT s.study_uid, s.label, s.reasons, s.modality, s.n_instances, s.first_received_at FROM studies s "
            # Driven from the (state, id) index: a box with years of acknowledged studies is not rescanned.
            # Quarantined too: a patient whose only image was unreadable must still reach the radiologist's list.
            "WHERE s.study_uid IN (SELECT i.study_uid FROM instances i WHERE i.state IN (?, ?, ?)) AND s.label IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = 'flag' AND o.flag_id = s.label || '-' || s.study_uid) "
            "ORDER BY CASE s.label WHEN 'urgent' THEN 0 WHEN 'review' THEN 1 ELSE 2 END, s.first_received_at",
            [TRIAGED, QUEUED, QUARANTINED])

    def instances_to_pack(self, limit: int = 50) -> list[dict]:
        """Triaged instances of labelled studies, most urgent study first."""
        return self.store.query(
            "SELECT i.*, s.label AS study_label FROM instances i JOIN studies s ON s.study_uid = i.study_uid "
            "WHERE i.state = ? AND s.label IS NOT NULL "
            # An instance whose packing failed for good waits for `wasla requeue` (which clears the pack row).
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = 'pack' AND o.instance_id = i.id) "
            "ORDER BY CASE s.label WHEN 'urgent' THEN 0 WHEN 'review' THEN 1 ELSE 2 END, i.id LIMIT ?",
            [TRIAGED, limit])

    def add_flag(self, study_uid: str, label: str, payload: dict) -> str:
        fid = flag_id(study_uid, label)
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO outbox (kind, priority, state, study_uid, label, flag_id, payload, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [FLAG, protocol.flag_priority(label), PENDING, study_uid, label, fid, json.dumps(payload), now, now])
            # An escalated study takes its images already in the queue along to the new priority.
            db.execute("UPDATE outbox SET priority = ?, label = ? WHERE kind = ? AND study_uid = ? AND state IN (?, ?)",
                       [protocol.study_priority(label), label, TRANSFER, study_uid, *ACTIVE])
        return fid

    def add_transfer(self, inst: dict, enc, label: str | None, chunk_size: int) -> str:
        """Write the wire file durably, then insert the transfer and move the instance triaged -> queued together."""
        sha = hashlib.sha256(enc.data).hexdigest()
        tid = transfer_id(self.device, inst["sop_instance_uid"], sha)
        path = self.wire_dir / f"{tid}.dcm"
        # the folder's entry is not forced: the row that points at this file is committed (and fsynced) next
        atomic_write(path, enc.data, tmp=path.with_suffix(".part"), durable_dir=False)
        now = time.time()
        size = len(enc.data)
        with self.store.transaction() as db:
            self.store.transition(db, inst["id"], QUEUED)
            # A transfer that failed because its wire file was lost comes back under the same (deterministic) id.
            db.execute("DELETE FROM outbox WHERE transfer_id = ? AND state = ?", [tid, FAILED])
            db.execute(
                "INSERT OR IGNORE INTO outbox (kind, priority, state, study_uid, instance_id, label, transfer_id, "
                "wire_path, size, sha256, chunk_size, count, codec, transfer_syntax, original_size, ratio, have, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', ?, ?)",
                [TRANSFER, protocol.study_priority(label), PENDING, inst["study_uid"], inst["id"], label, tid,
                 path.name, size, sha, chunk_size, -(-size // chunk_size), enc.codec, enc.transfer_syntax_uid,
                 enc.original_size, round(enc.ratio, 4), now, now])
        log.info("queued transfer %s for %s: %d bytes in %d chunks (%s, ratio %.2f)", tid, inst["sop_instance_uid"],
                 size, -(-size // chunk_size), enc.codec, enc.ratio)
        return tid

    # --- what to send -----------------------------------------------------------------------------------------
    def active(self, now: float | None = None) -> list[dict]:
        """What may go, in sending order: by band, then fewest bytes remaining (aged rows first, oldest first)."""
        rows = self.store.query("SELECT * FROM outbox WHERE state IN (?, ?) ORDER BY priority, id", list(ACTIVE))
        now = time.time() if now is None else now
        return sorted(rows, key=lambda r: _send_order(r, now))

    def backlog_bytes(self) -> int:
        """Bytes of transfers still to go: what the link is busy with before a newly packed study's turn."""
        rows = self.store.query("SELECT kind, state, size, chunk_size, have FROM outbox WHERE kind = ? AND state = ?",
                                [TRANSFER, PENDING])
        return sum(remaining_bytes(r) for r in rows)

    def get(self, transfer: str) -> dict | None:
        rows = self.store.query("SELECT * FROM outbox WHERE transfer_id = ?", [transfer])
        return rows[0] if rows else None

    def wire_path(self, row: dict) -> Path:
        return self.wire_dir / row["wire_path"]

    def read_chunk(self, row: dict, index: int) -> bytes:
        """One chunk of the wire file; OSError when the file is gone or shorter than its transfer says (a short chunk
        would be refused by the hub forever, never reaching the whole-file check that triggers a re-pack)."""
        expected = min(row["chunk_size"], row["size"] - index * row["chunk_size"])
        with open(self.wire_path(row), "rb") as fh:
            fh.seek(index * row["chunk_size"])
            data = fh.read(row["chunk_size"])
        if len(data) != expected:
            raise OSError(f"wire file has {len(data)} bytes for chunk {index}, expected {expected}")
        return data

    def wire_intact(self, row: dict) -> bool:
        try:
            return hashlib.sha256(self.wire_path(row).read_bytes()).hexdigest() == row["sha256"]
        except OSError:
            return False

    def bump_attempts(self, row_id: int) -> None:
        """Counts manifests sent: a transfer with attempts > 0 was under way before and asks the hub first."""
        with self.store.transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", [row_id])

    # --- what the hub said ------------------------------------------------------------------------------------
    def flag_done(self, fid: str) -> bool:
        with self.store.transaction() as db:
            cur = db.execute("UPDATE outbox SET state = ?, done_at = ?, updated_at = ? WHERE flag_id = ? AND state = ?",
                             [DONE, time.time(), time.time(), fid, PENDING])
            return cur.rowcount > 0

    def pack_failed(self, inst: dict, reason: str) -> None:
        """Record that an instance cannot be packed for the wire: shown by `wasla sync` and `wasla doctor`."""
        now = time.time()
        with self.store.transaction() as db:
            db.execute("INSERT INTO outbox (kind, priority, state, study_uid, instance_id, label, reason, created_at, "
                       "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [PACK, protocol.study_priority(inst.get("study_label") or "normal"), FAILED, inst["study_uid"],
                        inst["id"], inst.get("study_label"), reason[:500], now, now])
        log.error("instance #%s %s", inst["id"], reason)

    def flag_failed(self, fid: str, reason: str) -> bool:
        with self.store.transaction() as db:
            cur = db.execute("UPDATE outbox SET state = ?, reason = ?, updated_at = ? WHERE flag_id = ? AND state = ?",
                             [FAILED, reason[:500], time.time(), fid, PENDING])
            return cur.rowcount > 0

    def record_have(self, transfer: str, have: set[int]) -> set[int] | None:
        """Merge chunks the hub confirmed; all of them -> state confirmed, instance queued -> sent. Returns the union."""
        with self.store.transaction() as db:
            row = db.execute("SELECT id, state, have, count, instance_id FROM outbox WHERE transfer_id = ?",
                             [transfer]).fetchone()
            if row is None or row[1] not in ACTIVE:
                return None
            merged = protocol.from_ranges(json.loads(row[2] or "[]")) | {i for i in have if 0 <= i < row[3]}
            state = CONFIRMED if len(merged) == row[3] else PENDING
            db.execute("UPDATE outbox SET have = ?, state = ?, updated_at = ? WHERE id = ?",
                       [json.dumps(protocol.to_ranges(merged)), state, time.time(), row[0]])
            if state == CONFIRMED:
                self._advance(db, row[4], SENT)
            return merged

    def reset_have(self, transfer: str) -> None:
        """The hub threw the transfer away (whole-file sha mismatch) or never had it: every chunk goes again, and an
        instance that counted as sent (all chunks confirmed) is queued again until the hub's final ack."""
        with self.store.transaction() as db:
            row = db.execute("SELECT instance_id FROM outbox WHERE transfer_id = ? AND state IN (?, ?)",
                             [transfer, *ACTIVE]).fetchone()
            db.execute("UPDATE outbox SET have = '[]', state = ?, attempts = attempts + 1, updated_at = ? "
                       "WHERE transfer_id = ? AND state IN (?, ?)", [PENDING, time.time(), transfer, *ACTIVE])
            if row is not None:
                self._back_to(db, row[0], (SENT,), QUEUED)

    def repack(self, transfer: str, reason: str) -> None:
        """The box's own wire copy is gone or damaged: fail this transfer and send the instance back to packing,
        which encodes it again from the spool (a transfer of the same id replaces this failed row)."""
        with self.store.transaction() as db:
            row = db.execute("SELECT instance_id FROM outbox WHERE transfer_id = ?", [transfer]).fetchone()
            db.execute("UPDATE outbox SET state = ?, reason = ?, updated_at = ? WHERE transfer_id = ?",
                       [FAILED, f"{reason}; packed again"[:500], time.time(), transfer])
            if row is not None:
                self._back_to(db, row[0], (QUEUED, SENT), TRIAGED)
        log.warning("transfer %s: %s; the instance is packed again", transfer, reason)

    def _back_to(self, db, instance_id: int | None, from_states: tuple[str, ...], to: str) -> None:
        if instance_id is None:
            return
        state = db.execute("SELECT state FROM instances WHERE id = ?", [instance_id]).fetchone()
        if state is not None and state[0] in from_states:
            self.store.transition(db, instance_id, to)

    def acknowledged(self, transfer: str) -> bool:
        """The hub verified and stored the instance: sent -> acknowledged, and the wire copy is no longer needed."""
        with self.store.transaction() as db:
            row = db.execute("SELECT id, state, count, instance_id, wire_path FROM outbox WHERE transfer_id = ?",
                             [transfer]).fetchone()
            if row is None or row[1] not in ACTIVE:
                return False
            now = time.time()
            db.execute("UPDATE outbox SET state = ?, have = ?, done_at = ?, updated_at = ? WHERE id = ?",
                       [DONE, json.dumps([[0, row[2] - 1]]), now, now, row[0]])
            self._advance(db, row[3], SENT)
            self._advance(db, row[3], ACKNOWLEDGED)
        (self.wire_dir / row[4]).unlink(missing_ok=True)
        return True

    def row_failed(self, row_id: int, reason: str) -> None:
        """Take a row that can never be sent out of the queue, with its reason (shown by `wasla sync`)."""
        with self.store.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                       [FAILED, reason[:500], time.time(), row_id])
        log.error("outbox row %s failed for good: %s", row_id, reason)

    def failed(self, transfer: str, reason: str) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, reason = ?, updated_at = ? WHERE transfer_id = ?",
                       [FAILED, reason[:500], time.time(), transfer])
        log.error("transfer %s refused by the hub: %s", transfer, reason)

    def _advance(self, db, instance_id: int | None, to: str) -> None:
        if instance_id is None:
            return
        state = db.execute("SELECT state FROM instances WHERE id = ?", [instance_id]).fetchone()
        if state is None or state[0] == to or (to == SENT and state[0] == ACKNOWLEDGED):
            return
        try:
            self.store.transition(db, instance_id, to)
        except StateError as err:
            log.warning("instance #%s: %s", instance_id, err)

    # --- reads, dead letters, usage ---------------------------------------------------------------------------
    def apply_read(self, study_uid: str, read_id: str, disposition: str, note: str | None, by: str | None,
                   at: float) -> bool:
        """Write the radiologist's read onto the study; False if the read was applied before (a redelivery)."""
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM sync_reads WHERE read_id = ?", [read_id]).fetchone():
                return False
            db.execute("INSERT INTO sync_reads (read_id, study_uid, applied_at) VALUES (?, ?, ?)",
                       [read_id, study_uid, time.time()])
            cur = db.execute("UPDATE studies SET read_disposition = ?, read_note = ?, read_by = ?, read_at = ? "
                             "WHERE study_uid = ? AND (read_at IS NULL OR read_at <= ?)",
                             [disposition, note, by, at, study_uid, at])
            if cur.rowcount == 0 and not db.execute("SELECT 1 FROM studies WHERE study_uid = ?", [study_uid]).fetchone():
                log.warning("read %s for unknown study %s kept as received only", read_id, study_uid)
        log.info("read %s applied to study %s: %s", read_id, study_uid, disposition)
        return True

    def recent_reads(self, limit: int = 50) -> list[str]:
        return [r["read_id"] for r in self.store.query(
            "SELECT read_id FROM sync_reads WHERE applied_at > ? ORDER BY applied_at DESC LIMIT ?",
            [time.time() - 7 * 86400, limit])]

    def dead_letter(self, topic: str, reason: str, payload: bytes) -> None:
        with self.store.transaction() as db:
            db["sync_dead_letters"].insert({"at": time.time(), "topic": topic[:300], "reason": reason[:500],
                                            "size": len(payload), "head": payload[:64].hex()})
        log.warning("dead letter on %s: %s", topic, reason)

    def load_usage(self, day: str) -> dict:
        rows = self.store.query("SELECT flag, bulk, telemetry FROM sync_usage WHERE day = ?", [day])
        return rows[0] if rows else {}

    def add_usage(self, day: str, kind: str, n: int) -> None:
        assert kind in ("flag", "bulk", "telemetry")
        with self.store.transaction() as db:
            db.execute(f"INSERT INTO sync_usage (day, {kind}) VALUES (?, ?) "
                       f"ON CONFLICT(day) DO UPDATE SET {kind} = {kind} + excluded.{kind}", [day, n])

    # --- reporting --------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """What `wasla sync` and the heartbeat report."""
        by_state = {f"{r['kind']}_{r['state']}": r["n"] for r in self.store.query(
            "SELECT kind, state, COUNT(*) AS n FROM outbox GROUP BY kind, state")}
        pending = self.store.query(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest, "
            "COALESCE(SUM(size), 0) AS bytes FROM outbox WHERE state IN (?, ?)", list(ACTIVE))[0]
        ratio = self.store.query("SELECT SUM(original_size) AS o, SUM(size) AS w FROM outbox WHERE kind = ?",
                                 [TRANSFER])[0]
        return {
            "counts": by_state, "queue_depth": pending["n"], "oldest_unsent_at": pending["oldest"],
            "queued_bytes": pending["bytes"],
            "wire_ratio": round(ratio["o"] / ratio["w"], 3) if ratio["w"] else None,
            "dead_letters": self.store.query("SELECT COUNT(*) AS n FROM sync_dead_letters")[0]["n"],
        }

    def study_transfers(self, study_uid: str) -> list[dict]:
        return self.store.query("SELECT kind, state, label, transfer_id, flag_id, size, original_size, ratio, codec, "
                                "have, count, reason FROM outbox WHERE study_uid = ? ORDER BY id", [study_uid])

    def active_rows(self, limit: int = 50) -> list[dict]:
        return self.store.query("SELECT id, kind, priority, state, study_uid, label, transfer_id, size, count, have, "
                                "created_at, reason FROM outbox WHERE state IN (?, ?, ?) ORDER BY priority, id LIMIT ?",
                                [*ACTIVE, FAILED, limit])
