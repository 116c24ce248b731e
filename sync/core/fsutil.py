"""Durable file writes both daemons rely on: a file's bytes and a folder's entries forced to disk."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """After a rename or create in `path`: without it a power cut can forget the new entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int | None = None, tmp: Path | None = None,
                 durable_dir: bool = True) -> None:
    """`path` holds either its old content or all of `data`, whatever power cut comes: a temp file beside it,
    written and fsynced, renamed over `path`, and the folder's entry fsynced too (`durable_dir`). `mode`: exactly
    these permissions from the first instant (a key: 0o600); None: what the process umask gives (a service's
    UMask keeps patient files from other users). A failed write leaves no temp file behind."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leak half a file
        raise
    if durable_dir:
        fsync_dir(path.parent)
