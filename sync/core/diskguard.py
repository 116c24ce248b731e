"""A full disk, told apart from other failures, and the pause that waits for space to come back (box and hub)."""
from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Below this much free space an SQLite "disk I/O error" is a full disk: WAL and shared-memory files cannot grow
# (SQLITE_IOERR_SHMSIZE and friends), and that is what the operator must be told.
_NEARLY_NOTHING = 2 * 1024 * 1024
_RESUME_MARGIN = 16 * 1024 * 1024


def free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_disk_full(err: BaseException, path: Path | None = None) -> bool:
    """True for ENOSPC/EDQUOT anywhere in the cause chain, SQLite's SQLITE_FULL, or an I/O error on a full disk."""
    seen = 0
    cur: BaseException | None = err
    while cur is not None and seen < 8:
        err = cur
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(err, sqlite3.Error):
            name = getattr(err, "sqlite_errorname", "") or ""
            text = str(err)
            if name == "SQLITE_FULL" or "database or disk is full" in text:
                return True
            if path is not None and (name.startswith("SQLITE_IOERR") or "disk I/O error" in text):
                try:
                    return free_bytes(path) < _NEARLY_NOTHING
                except OSError:
                    return False
        cur = err.__cause__ or err.__context__
        seen += 1
    return False


def describe_store_error(err: BaseException, path: Path) -> str:
    """SQLite's own words, except that a full disk is called a full disk (SQLite says "disk I/O error")."""
    if is_disk_full(err, path):
        try:
            return f"disk full ({free_bytes(path) / 1e6:.0f} MB free)"
        except OSError:
            return "disk full"
    return str(err)


class Pause:
    """One part's "paused: disk full" state, logged once when it starts and once when it ends."""

    def __init__(self, what: str, path: Path, reserve_bytes: int):
        self.what = what
        self.path = Path(path)
        self.reserve_bytes = reserve_bytes
        self.paused = False
        self.since: float | None = None

    def room(self) -> bool:
        """True when work may go on; flips the state (and logs) as free space crosses the reserve."""
        try:
            free = free_bytes(self.path)
        except OSError:
            return True  # cannot tell: let the write itself fail and be caught
        # Hysteresis: a part paused by a failed write resumes only with some room to spare, or it would flap.
        needed = self.reserve_bytes + (_RESUME_MARGIN if self.paused else 0)
        if free < needed:
            self.hit(free)
            return False
        if self.paused:
            log.warning("disk space is back (%.0f MB free): %s resumed after %.0f s", free / 1e6, self.what,
                        time.monotonic() - (self.since or time.monotonic()))
            self.paused, self.since = False, None
        return True

    def hit(self, free: int | None = None) -> None:
        """A write failed for want of space (or the check found none): pause until room() sees space again."""
        if not self.paused:
            if free is None:
                try:
                    free = free_bytes(self.path)
                except OSError:
                    free = 0
            log.error("disk full (%.0f MB free, %.0f MB kept in reserve): %s paused until space returns",
                      free / 1e6, self.reserve_bytes / 1e6, self.what)
            self.paused, self.since = True, time.monotonic()


def open_when_space(open_fn: Callable[[], object], path: Path, what: str, *, wait: float = 10.0,
                    stop: Callable[[], bool] = lambda: False, on_wait: Callable[[str], None] | None = None):
    """Call `open_fn` until it succeeds; while it fails because the disk is full, say so and wait (not exit)."""
    warned = False
    while True:
        try:
            return open_fn()
        except Exception as err:
            if not is_disk_full(err, path) or stop():
                raise
            message = f"disk full: {what} waits for free space on {path}"
            if not warned:
                log.error("%s (%s)", message, type(err).__name__)
                warned = True
            if on_wait is not None:
                on_wait(message)
            time.sleep(wait)
