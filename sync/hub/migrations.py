"""The hub index's schema history: numbered migrations, each applied once, with its bookkeeping row, in the same
transaction, on SQLite and PostgreSQL alike (as the box store's, edge/store.py).

A migration is SQL in SQLite's dialect (PostgreSQL gets it with its own integer and float types) or a column to add.
Receivers starting together take turns (SQLite's BEGIN IMMEDIATE, a PostgreSQL advisory lock), so each migration
runs once; a failing one rolls back whole and the index stays as it was. An index from before this table (schema
created by CREATE TABLE IF NOT EXISTS, columns added by hand) is adopted: its steps are re-run idempotently and
recorded. Append new migrations; never edit an applied one.
"""
from __future__ import annotations

import re
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
  transfer_id TEXT PRIMARY KEY, device TEXT NOT NULL, study_uid TEXT, sop_instance_uid TEXT, label TEXT,
  size INTEGER NOT NULL, sha256 TEXT NOT NULL, chunk_size INTEGER NOT NULL, count INTEGER NOT NULL,
  codec TEXT, transfer_syntax TEXT, original_size INTEGER, ratio REAL,
  state TEXT NOT NULL DEFAULT 'receiving', claimed_at REAL, retries INTEGER NOT NULL DEFAULT 0,
  dup_chunks INTEGER NOT NULL DEFAULT 0, reason TEXT, created_at REAL, updated_at REAL, completed_at REAL);
CREATE TABLE IF NOT EXISTS chunks (transfer_id TEXT NOT NULL, idx INTEGER NOT NULL, at REAL,
  PRIMARY KEY (transfer_id, idx));
CREATE TABLE IF NOT EXISTS instances (
  sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, device TEXT NOT NULL, transfer_id TEXT,
  sha256 TEXT, size INTEGER, original_size INTEGER, codec TEXT, transfer_syntax TEXT, path TEXT, stored_at REAL);
CREATE INDEX IF NOT EXISTS ix_instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS studies (
  study_uid TEXT PRIMARY KEY, device TEXT NOT NULL, label TEXT, reasons TEXT, modality TEXT,
  n_expected INTEGER NOT NULL DEFAULT 0, n_instances INTEGER NOT NULL DEFAULT 0,
  wire_bytes INTEGER NOT NULL DEFAULT 0, original_bytes INTEGER NOT NULL DEFAULT 0,
  flagged_at REAL, first_seen REAL, updated_at REAL, preview_path TEXT,
  read_disposition TEXT, read_note TEXT, read_by TEXT, read_at REAL);
CREATE TABLE IF NOT EXISTS flags (flag_id TEXT NOT NULL, device TEXT NOT NULL, study_uid TEXT, label TEXT,
  received_at REAL, times INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (device, flag_id));
CREATE TABLE IF NOT EXISTS boxes (device TEXT PRIMARY KEY, first_seen REAL, last_seen REAL, online INTEGER,
  status_at REAL, heartbeat TEXT, heartbeat_at REAL, queue_depth INTEGER, oldest_unsent_at REAL,
  messages INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0, dup_chunks INTEGER NOT NULL DEFAULT 0,
  bad_messages INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS reads (read_id TEXT PRIMARY KEY, study_uid TEXT NOT NULL, device TEXT NOT NULL,
  disposition TEXT NOT NULL, note TEXT, by TEXT, at REAL NOT NULL, published_at REAL, delivered_at REAL);
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY, at REAL, topic TEXT, device TEXT, reason TEXT,
  size INTEGER, head TEXT);
CREATE TABLE IF NOT EXISTS uid_collisions (kind TEXT NOT NULL, uid TEXT NOT NULL, owner TEXT NOT NULL,
  claimant TEXT NOT NULL, first_at REAL, last_at REAL, times INTEGER NOT NULL DEFAULT 1,
  PRIMARY KEY (kind, uid, claimant));
CREATE TABLE IF NOT EXISTS superseded (sop_instance_uid TEXT PRIMARY KEY, by_sop TEXT NOT NULL, study_uid TEXT,
  at REAL);
CREATE TABLE IF NOT EXISTS forwards (sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL DEFAULT 0,
  queued_at REAL, sent_at REAL, claimed_by TEXT, claimed_at REAL, syntax TEXT, reason TEXT);
CREATE INDEX IF NOT EXISTS ix_forwards_due ON forwards(state, next_at);
CREATE INDEX IF NOT EXISTS ix_instances_stored ON instances(stored_at);
CREATE TABLE IF NOT EXISTS box_info (device TEXT PRIMARY KEY, region TEXT, name TEXT);
CREATE TABLE IF NOT EXISTS web_users (username TEXT PRIMARY KEY, full_name TEXT, role TEXT NOT NULL, lang TEXT,
  pw_hash TEXT NOT NULL, failed INTEGER NOT NULL DEFAULT 0, locked_until REAL, created_at REAL, last_login REAL);
CREATE TABLE IF NOT EXISTS web_sessions (token_hash TEXT PRIMARY KEY, username TEXT NOT NULL, csrf TEXT NOT NULL,
  created_at REAL NOT NULL, last_seen REAL NOT NULL, remote TEXT);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, username TEXT, action TEXT NOT NULL,
  study_uid TEXT, detail TEXT, remote TEXT);
CREATE INDEX IF NOT EXISTS ix_audit_study ON audit(study_uid);
"""


# (number, name, step): step is a SQL script or (table, column, type) to add.
MIGRATIONS: list[tuple[int, str, str | tuple[str, str, str]]] = [
    (1, "base schema", SCHEMA),
    (2, "transfers.claimed_by: which receiver run holds a verification", ("transfers", "claimed_by", "TEXT")),
    (3, "reads.findings: the radiologist's coded findings", ("reads", "findings", "TEXT")),
    (4, "instances.sop_class_uid: what each stored instance is", ("instances", "sop_class_uid", "TEXT")),
]
BOOKKEEPING = "CREATE TABLE IF NOT EXISTS _migrations (number INTEGER PRIMARY KEY, name TEXT, applied_at REAL)"


def pg_types(sql: str) -> str:
    """SQLite's schema in PostgreSQL's types, so the two can never list different columns: PostgreSQL's REAL and
    INTEGER are 4 bytes (timestamps and byte counts need 8), and a rowid alias becomes an identity column."""
    sql = sql.replace("id INTEGER PRIMARY KEY", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", re.sub(r"\bINTEGER\b", "BIGINT", sql))


def _statements(script: str) -> list[str]:
    # The scripts hold no ';' inside a statement (no literals, no triggers): a split is enough, and it keeps every
    # statement inside the caller's transaction (sqlite3's executescript would commit first).
    return [s.strip() for s in script.split(";") if s.strip()]


def migrate_sqlite(conn) -> list[int]:
    """Apply what this SQLite index lacks (conn in autocommit mode, as SqliteIndex opens it); the numbers applied."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(BOOKKEEPING)
        done = {r[0] for r in conn.execute("SELECT number FROM _migrations")}
        applied = []
        for number, name, step in MIGRATIONS:
            if number in done:
                continue
            if isinstance(step, str):
                for stmt in _statements(step):
                    conn.execute(stmt)
            else:
                table, column, kind = step
                if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            conn.execute("INSERT INTO _migrations VALUES (?, ?, ?)", [number, name, time.time()])
            applied.append(number)
        conn.execute("COMMIT")
        return applied
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def migrate_pg(conn, lock_key: int) -> list[int]:
    """The same on PostgreSQL (a psycopg connection in autocommit mode), under an advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_key])
        conn.execute(pg_types(BOOKKEEPING))
        done = {r["number"] for r in conn.execute("SELECT number FROM _migrations").fetchall()}
        applied = []
        for number, name, step in MIGRATIONS:
            if number in done:
                continue
            if isinstance(step, str):
                for stmt in _statements(pg_types(step)):
                    conn.execute(stmt)
            else:
                table, column, kind = step
                conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {pg_types(kind)}")
            conn.execute("INSERT INTO _migrations VALUES (%s, %s, %s)", [number, name, time.time()])
            applied.append(number)
        return applied
