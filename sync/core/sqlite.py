"""SQLite plumbing shared by the box's and the hub's stores: one writer transaction that never leaves a lock held
or a transaction open, and study lookup by UID prefix."""
from __future__ import annotations

import contextlib
import sqlite3

from sync.core.errors import NotFoundError


def find_study(query, study_uid: str) -> dict:
    """The studies row for a UID or a unique prefix of one (technicians copy a prefix from a table); box and hub."""
    rows = query("SELECT * FROM studies WHERE study_uid = ?", [study_uid])
    if not rows:
        rows = query("SELECT * FROM studies WHERE study_uid LIKE ? LIMIT 2", [study_uid + "%"])
        if len(rows) != 1:
            raise NotFoundError(f"study {study_uid} not found" if not rows else f"study prefix {study_uid} is ambiguous")
    return rows[0]


@contextlib.contextmanager
def write_transaction(lock, conn, *, durable: bool = True):
    """BEGIN IMMEDIATE under `lock`, COMMIT on success, ROLLBACK on an exception; the lock is never left held,
    not even when BEGIN itself times out (another process holds the file). Shared by the box and the hub stores."""
    with lock:
        if not durable:
            conn.execute("PRAGMA synchronous=NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (SQLITE_FULL on a full disk) can leave the transaction open: every later
                # BEGIN would then fail too, long after space has returned.
                _rollback(conn)
                raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous=FULL")


def _rollback(conn) -> None:
    if getattr(conn, "conn", conn).in_transaction:  # a sqlite_utils Database wraps the connection
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite rolled back by itself (it does on some I/O errors)
