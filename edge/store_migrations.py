"""The box store's schema history: small numbered functions, each applied once with its bookkeeping row, in one
transaction (sqlite-utils' migration style)."""
from __future__ import annotations

import time
from typing import Callable

import sqlite_utils


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["instances"].create({
        "id": int, "sop_instance_uid": str, "study_uid": str, "series_uid": str, "sop_class_uid": str,
        "modality": str, "body_part": str, "view_position": str, "transfer_syntax": str,
        "rows": int, "columns": int, "frames": int,
        "path": str, "sha256": str, "size": int, "source": str, "calling_ae": str,
        "state": str, "reason": str, "label": str, "attempts": int,
        "received_at": float, "updated_at": float, "triaged_at": float,
    }, pk="id", not_null={"state", "path", "received_at"}, defaults={"attempts": 0})
    db.execute("CREATE UNIQUE INDEX ux_instances_sop ON instances(sop_instance_uid) WHERE sop_instance_uid IS NOT NULL")
    db["instances"].create_index(["state", "id"])
    db["instances"].create_index(["study_uid"])
    db["studies"].create({
        "study_uid": str, "label": str, "reasons": str, "modality": str, "n_instances": int,
        "first_received_at": float, "updated_at": float, "triaged_at": float,
        "read_disposition": str, "read_note": str, "read_by": str, "read_at": float,
    }, pk="study_uid", defaults={"n_instances": 0})
    db["studies"].create_index(["label", "first_received_at"])
    db["results"].create({
        "id": int, "instance_id": int, "model": str, "model_version": str, "backend": str,
        "scores": str, "thresholds": str, "label": str, "reasons": str, "timings": str, "created_at": float,
    }, pk="id", foreign_keys=[("instance_id", "instances", "id")])
    db["results"].create_index(["instance_id"])
    db["events"].create({"id": int, "at": float, "kind": str, "detail": str}, pk="id")


def _m002_receive_timing(db: sqlite_utils.Database) -> None:
    # How long a door took from first byte to the row (benchmarks' "receive" stage).
    db["instances"].add_column("receive_ms", float)


def _m003_sync_outbox(db: sqlite_utils.Database) -> None:
    # The uploader's source of truth (edge/uplink/outbox.py): one row per flag or per instance transfer.
    db["outbox"].create({
        "id": int, "kind": str, "priority": int, "state": str, "study_uid": str, "instance_id": int, "label": str,
        "flag_id": str, "transfer_id": str, "payload": str, "wire_path": str, "size": int, "sha256": str,
        "chunk_size": int, "count": int, "codec": str, "transfer_syntax": str, "original_size": int, "ratio": float,
        "have": str, "attempts": int, "reason": str, "created_at": float, "updated_at": float, "done_at": float,
    }, pk="id", not_null={"kind", "priority", "state", "created_at"}, defaults={"attempts": 0, "have": "[]"})
    db.execute("CREATE UNIQUE INDEX ux_outbox_flag ON outbox(flag_id) WHERE flag_id IS NOT NULL")
    db.execute("CREATE UNIQUE INDEX ux_outbox_transfer ON outbox(transfer_id) WHERE transfer_id IS NOT NULL")
    db["outbox"].create_index(["state", "priority", "id"])
    db["outbox"].create_index(["study_uid"])
    db["sync_dead_letters"].create({"id": int, "at": float, "topic": str, "reason": str, "size": int, "head": str},
                                   pk="id")
    db["sync_usage"].create({"day": str, "flag": int, "bulk": int, "telemetry": int}, pk="day",
                            defaults={"flag": 0, "bulk": 0, "telemetry": 0})
    db["sync_reads"].create({"read_id": str, "study_uid": str, "applied_at": float}, pk="read_id")


MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "initial schema", _m001_initial),
    (2, "receive timing", _m002_receive_timing),
    (3, "sync outbox, dead letters, usage, reads", _m003_sync_outbox),
]


def migrate(db: sqlite_utils.Database) -> list[int]:
    """Apply pending migrations in order; return the numbers applied."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (number INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
    done = {row[0] for row in db.execute("SELECT number FROM _migrations").fetchall()}
    applied = []
    for number, name, fn in MIGRATIONS:
        if number in done:
            continue
        # Explicit BEGIN: the connection is in autocommit mode, where `with conn:` would not make the DDL atomic,
        # and a power cut mid-migration must leave the old schema, not half of the new one.
        db.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?, ?)", [number, name, time.time()])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        applied.append(number)
    return applied
