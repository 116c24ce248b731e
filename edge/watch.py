"""The watch folder: files a modality (or a person) drops into a folder are ingested once settled, then removed.

Polling, not inotify: inotify sees nothing on CIFS/NFS shares and misses events on some FUSE/USB mounts, which is
exactly where clinic modalities export to; a scan every few seconds works on every filesystem and needs no
dependency.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge.config import Config
from sync.core.diskguard import is_disk_full
from sync.core.errors import NotFoundError, OutOfResourcesError
from edge.ingest import QUARANTINED, STORED, IngestOutcome, ingest_file, limits_from_config
from sync.core.liveness import Beat
from edge.store import Store

# Quarantine reasons after which the original stays in the folder: we hold no usable copy (unreadable file), or the
# copy may simply have stalled longer than settle_seconds (truncated); a later change makes us take it again.
_KEEP_ORIGINAL = ("cannot read file", "truncated DICOM")


def _ref(path: Path) -> str:
    # Modalities and USB exports often name files after the patient: logs get a stable short hash, never the name.
    return "f-" + hashlib.sha256(path.name.encode("utf-8", "replace")).hexdigest()[:10]


log = logging.getLogger(__name__)

# Names that copy tools and browsers use while a file is still being written.
_IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")

_Signature = tuple[int, int]  # size, mtime in ns


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(_IN_PROGRESS_SUFFIXES)


class FolderWatcher:
    """Scans `cfg.watch_dir`; a file is taken when its size and mtime held still for `settle_seconds`.

    Exactly once across restarts: the file is deleted only after `ingest_file` has committed its row, so a crash in
    between leaves it here to be taken again, and the store's duplicate check makes the second take harmless.
    """

    def __init__(self, cfg: Config, store: Store, *, on_stored: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.dir = Path(cfg.watch_dir)
        self.store = store
        self.poll_seconds = cfg.watch.poll_seconds
        self.settle_seconds = cfg.watch.settle_seconds
        self.limits = limits_from_config(cfg)
        self.on_stored = on_stored
        self._clock = clock
        # path -> (signature, monotonic time it was first seen with that signature)
        self._pending: dict[Path, tuple[_Signature, float]] = {}
        # Ingested but not deletable (permissions): remembered with their signature so they are not taken in a loop.
        self._stuck: dict[Path, _Signature] = {}
        # Symlinks and special files already refused (one quarantine row each, until they change).
        self._refused: dict[Path, _Signature] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beat = Beat("watch folder", max_silence=max(600.0, 20 * self.poll_seconds))
        self.dir.mkdir(parents=True, exist_ok=True)

    def _candidates(self) -> dict[Path, _Signature]:
        # Nothing is followed: os.walk does not enter symlinked folders, and a symlink or special file is refused
        # here (ingesting it would read, and quarantine a copy of, whatever it points at outside the folder).
        found: dict[Path, _Signature] = {}
        for root, dirs, names in os.walk(self.dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            links = [d for d in dirs if os.path.islink(Path(root) / d)]  # listed by os.walk, never entered
            for name in sorted([*names, *links]):
                if _skipped(name):
                    continue
                path = Path(root) / name
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found[path] = (st.st_size, st.st_mtime_ns)
                elif not stat.S_ISDIR(st.st_mode):
                    self._refuse(path, st)
        return found

    def _refuse(self, path: Path, st: os.stat_result) -> None:
        """A symlink, FIFO, socket or device in the folder: one quarantine row with the reason, never opened."""
        sig = (st.st_size, st.st_mtime_ns)
        if self._refused.get(path) == sig:
            return
        self._refused[path] = sig
        what = "symbolic link" if stat.S_ISLNK(st.st_mode) else "special file (not a regular file)"
        reason = f"{what} in the watch folder: refused, not followed or read"
        try:
            iid = self.store.add_quarantined(None, reason, source="watch", original_name=path.name)
            log.warning("watch folder: %s %s refused as #%s", what, _ref(path), iid)
        except Exception as err:  # noqa: BLE001 - recorded on the next pass
            self._refused.pop(path, None)
            log.error("watch folder: could not record a refused entry (%s)", type(err).__name__)

    def _settled(self, path: Path, sig: _Signature, now: float) -> bool:
        seen = self._pending.get(path)
        if seen is None or seen[0] != sig:
            self._pending[path] = (sig, now)
            # settle_seconds = 0 means "take on sight" (a folder filled by an atomic rename, for instance).
            return self.settle_seconds == 0
        return now - seen[1] >= self.settle_seconds

    def scan_once(self) -> list[IngestOutcome]:
        """One pass over the folder: take every settled file, return what happened to each."""
        now = self._clock()
        found = self._candidates()
        for gone in set(self._pending) - set(found):
            del self._pending[gone]
        for gone in set(self._stuck) - set(found):
            del self._stuck[gone]
        outcomes = []
        for path, sig in found.items():
            self.beat.tick()
            if self._stuck.get(path) == sig or not self._settled(path, sig, now):
                continue
            try:
                outcome = ingest_file(self.store, path, source="watch", follow_symlinks=False, **self.limits)
            except NotFoundError:
                self._pending.pop(path, None)  # taken away by someone else meanwhile
                continue
            except OutOfResourcesError as err:
                # Leave the file where it is: it is the only copy, and it will be taken once there is room.
                log.warning("watch folder paused: %s", err)
                break
            except OSError as err:
                log.warning("cannot take watch-folder file %s, will retry: %s", _ref(path), err.strerror or type(err).__name__)
                continue
            except Exception as err:  # noqa: BLE001 - one file must never stop the scan of the others
                if is_disk_full(err, self.store.spool_dir):
                    log.warning("watch folder paused: disk full")
                    break  # the file stays here, the only copy, and is taken once there is room
                # Left in place and skipped until it changes: the next poll must not hit the same wall.
                self._stuck[path] = sig
                log.error("watch-folder file %s could not be taken (%s); skipped until it changes", _ref(path),
                          type(err).__name__)
                continue
            outcomes.append(outcome)
            self._pending.pop(path, None)
            if outcome.status == QUARANTINED and (outcome.reason or "").startswith(_KEEP_ORIGINAL):
                self._stuck[path] = sig
                log.warning("watch folder: kept the original of quarantined #%s until it changes", outcome.instance_id)
                continue
            self._remove(path, sig)
            if outcome.status == STORED and self.on_stored is not None:
                self.on_stored()
        return outcomes

    def _remove(self, path: Path, sig: _Signature) -> None:
        try:
            self._unlink_inside(path, sig)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._stuck[path] = sig
            log.warning("ingested watch-folder file %s but cannot remove it (%s); it will be ignored until it changes",
                        _ref(path), err.strerror or type(err).__name__)

    def _unlink_inside(self, path: Path, sig: _Signature) -> None:
        """Delete `path` through directory descriptors opened without following links from the watch folder down,
        and only if it is still the regular file that was ingested: a sub-folder swapped for a symlink between
        scan and delete can never make us delete a file outside the folder."""
        rel = path.relative_to(self.dir).parts
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in rel[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
            st = os.stat(rel[-1], dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != sig:
                raise OSError(errno.EPERM, "changed since it was ingested; left in place")
            os.unlink(rel[-1], dir_fd=fd)
        finally:
            os.close(fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat.tick()
            try:
                self.scan_once()
            except Exception:  # noqa: BLE001 - a bad scan must not end the watcher; the next poll retries
                log.exception("watch folder scan failed")
            self._stop.wait(self.poll_seconds)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="wasla-watch", daemon=True)
        self._thread.start()

    def problems(self) -> list[str]:
        problem = self.beat.problem(self._thread)
        return [problem] if problem else []

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.poll_seconds, 1.0) + 30)
            self._thread = None
