"""The watch folder: settle before taking, take once, remove only after the row is committed."""
from __future__ import annotations

import shutil

import pydicom
import pytest

from harness import wait_until
from edge.ingest import ingest_file, limits_from_config
from edge.store import Store
from edge.watch import FolderWatcher

pytestmark = pytest.mark.timeout(120)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def watcher(cfg, store, clock):
    return FolderWatcher(cfg, store, clock=clock)


def _rows(store) -> list[dict]:
    return store.query("SELECT * FROM instances ORDER BY id")


def test_file_copied_slowly_in_two_halves_is_taken_once_after_it_settles(cfg, watcher, clock, store, sample):
    data = sample("RG1_UNCR.dcm").read_bytes()
    target = cfg.watch_dir / "IM0001.dcm"
    target.write_bytes(data[: len(data) // 2])

    assert watcher.scan_once() == []  # first sight
    clock.advance(cfg.watch.settle_seconds - 0.5)
    assert watcher.scan_once() == []  # not settled yet
    with open(target, "ab") as fh:  # the copy goes on after a pause
        fh.write(data[len(data) // 2:])
    clock.advance(1.0)
    assert watcher.scan_once() == []  # it changed: the settle time starts again
    assert _rows(store) == [] and target.exists()
    clock.advance(cfg.watch.settle_seconds)

    (outcome,) = watcher.scan_once()

    assert outcome.status == "stored"
    assert not target.exists()
    assert [r["state"] for r in _rows(store)] == ["received"]
    assert _rows(store)[0]["source"] == "watch"
    clock.advance(cfg.watch.settle_seconds)
    assert watcher.scan_once() == []


def test_file_left_behind_by_a_crash_after_commit_is_retaken_harmlessly(cfg, store, clock, sample):
    # The daemon committed the row, then died before deleting the file: the next run sees it again.
    target = cfg.watch_dir / "IM0001.dcm"
    target.parent.mkdir(parents=True)
    shutil.copy(sample("US1_J2KR.dcm"), target)
    assert ingest_file(store, target, source="watch", **limits_from_config(cfg)).status == "stored"
    restarted = FolderWatcher(cfg, store, clock=clock)

    restarted.scan_once()
    clock.advance(cfg.watch.settle_seconds)
    (outcome,) = restarted.scan_once()

    assert outcome.status == "duplicate"
    assert not target.exists()
    assert len(_rows(store)) == 1


def test_empty_truncated_and_text_files_are_quarantined_with_distinct_reasons(cfg, watcher, clock, store, sample):
    (cfg.watch_dir / "empty.dcm").write_bytes(b"")
    (cfg.watch_dir / "truncated.dcm").write_bytes(sample("RG1_UNCR.dcm").read_bytes()[:2000])
    (cfg.watch_dir / "notes.txt").write_text("the scanner says hello\n" * 10)

    watcher.scan_once()
    clock.advance(cfg.watch.settle_seconds)
    outcomes = watcher.scan_once()

    assert [o.status for o in outcomes] == ["quarantined"] * 3
    reasons = sorted(o.reason for o in outcomes)
    assert len(set(reasons)) == 3
    assert reasons[0].startswith("empty file (0 bytes)")
    assert reasons[1].startswith("not a DICOM file")
    assert reasons[2].startswith("truncated DICOM")
    # A truncated file may be a copy that stalled: the original stays, and is not taken again until it changes.
    assert [p.name for p in cfg.watch_dir.iterdir()] == ["truncated.dcm"]
    clock.advance(cfg.watch.settle_seconds)
    assert watcher.scan_once() == []
    assert len(store.quarantined()) == 3


def test_a_stalled_copy_quarantined_as_truncated_is_taken_again_once_complete(cfg, watcher, clock, store, sample):
    full = sample("RG1_UNCR.dcm").read_bytes()
    target = cfg.watch_dir / "IM0001.dcm"
    target.write_bytes(full[:4000])
    watcher.scan_once()
    clock.advance(cfg.watch.settle_seconds)
    assert [o.status for o in watcher.scan_once()] == ["quarantined"]
    target.write_bytes(full)  # the copy resumes and completes
    watcher.scan_once()
    clock.advance(cfg.watch.settle_seconds)
    assert [o.status for o in watcher.scan_once()] == ["stored"]
    assert not target.exists() and store.counts()["received"] == 1


def test_dotfiles_and_partial_copies_are_never_taken(cfg, watcher, clock, store, sample):
    for name in (".hidden.dcm", "IM0002.dcm.part", "IM0003.tmp"):
        shutil.copy(sample("RG1_UNCR.dcm"), cfg.watch_dir / name)
    (cfg.watch_dir / ".sync").mkdir()
    shutil.copy(sample("RG1_UNCR.dcm"), cfg.watch_dir / ".sync" / "IM0004.dcm")

    for _ in range(3):
        assert watcher.scan_once() == []
        clock.advance(cfg.watch.settle_seconds)

    assert _rows(store) == []
    assert len(list(cfg.watch_dir.rglob("*"))) == 5


def test_files_in_subfolders_are_taken_too(cfg, watcher, clock, store, sample):
    (cfg.watch_dir / "2024" / "CT").mkdir(parents=True)
    shutil.copy(sample("OBXXXX1A_rle.dcm"), cfg.watch_dir / "2024" / "CT" / "IM0001")

    watcher.scan_once()
    clock.advance(cfg.watch.settle_seconds)

    assert [o.status for o in watcher.scan_once()] == ["stored"]


def test_file_that_cannot_be_removed_is_taken_once_and_then_ignored(cfg, watcher, clock, store, sample,
                                                                    monkeypatch, caplog):
    target = cfg.watch_dir / "readonly.dcm"
    shutil.copy(sample("RG1_UNCR.dcm"), target)
    import os

    real_unlink = os.unlink

    def unlink(path, *, dir_fd=None):
        # The box runs as root in the tests, so permissions cannot be used: refuse this one name instead.
        if os.path.basename(str(path)) == target.name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    watcher.scan_once()
    clock.advance(cfg.watch.settle_seconds)

    assert [o.status for o in watcher.scan_once()] == ["stored"]
    assert "cannot remove it" in caplog.text and "readonly" not in caplog.text  # names may identify patients
    for _ in range(3):
        clock.advance(cfg.watch.settle_seconds)
        assert watcher.scan_once() == []
    assert target.exists() and len(_rows(store)) == 1


def test_full_disk_leaves_the_file_in_the_watch_folder(make_cfg, clock, sample):
    cfg = make_cfg(storage={"min_free_mb": 10**12})
    store = Store.from_config(cfg)
    try:
        target = cfg.watch_dir / "IM0001.dcm"
        watcher = FolderWatcher(cfg, store, clock=clock)
        shutil.copy(sample("RG1_UNCR.dcm"), target)
        watcher.scan_once()
        clock.advance(cfg.watch.settle_seconds)

        assert watcher.scan_once() == []
        assert target.exists() and _rows(store) == []
    finally:
        store.close()


def test_background_thread_takes_dropped_files_and_stops(make_cfg, sample):
    cfg = make_cfg(watch={"settle_seconds": 0.2, "poll_seconds": 0.05})
    store = Store.from_config(cfg)
    woken = []
    watcher = FolderWatcher(cfg, store, on_stored=lambda: woken.append(1))
    watcher.start()
    try:
        shutil.copy(sample("US1_J2KR.dcm"), cfg.watch_dir / "IM0001.dcm")
        wait_until(lambda: _rows(store) and not (cfg.watch_dir / "IM0001.dcm").exists(), timeout=30,
                   what="watch folder file taken")
        watcher.stop()
        uid = pydicom.dcmread(sample("US1_J2KR.dcm"), stop_before_pixels=True).SOPInstanceUID
        assert [r["sop_instance_uid"] for r in _rows(store)] == [uid]
        assert woken == [1]
    finally:
        watcher.stop()
        store.close()


# --- a watch folder that stays inside itself ----------------------------------------------------------------------
def test_symlinks_and_fifos_in_the_watch_folder_are_refused_with_a_reason_and_never_read(cfg, store, sample,
                                                                                        tmp_path):
    import os

    from edge.watch import FolderWatcher

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("root password")
    dicom_outside = outside / "x.dcm"
    dicom_outside.write_bytes(sample("RG1_UNCR.dcm").read_bytes())
    w = FolderWatcher(cfg, store)
    (w.dir / "link-to-secret.dcm").symlink_to(secret)
    (w.dir / "link-to-dicom.dcm").symlink_to(dicom_outside)
    (w.dir / "linked-folder").symlink_to(outside, target_is_directory=True)
    os.mkfifo(w.dir / "pipe.dcm")
    w.settle_seconds = 0
    assert w.scan_once() == []
    rows = store.query("SELECT state, reason, size, path FROM instances")
    assert len(rows) == 4 and {r["state"] for r in rows} == {"quarantined"}
    assert sum("symbolic link" in r["reason"] for r in rows) == 3 and sum("special file" in r["reason"] for r in rows) == 1
    assert all(r["size"] == 0 and not r["path"] for r in rows)  # nothing copied from outside
    assert not list(store.quarantine_dir.rglob("*.*"))
    assert secret.exists() and dicom_outside.exists()
    w.scan_once()
    assert len(store.query("SELECT id FROM instances")) == 4  # refused once, not on every poll


def test_a_folder_swapped_for_a_symlink_before_the_delete_never_deletes_outside(cfg, store, sample, tmp_path):
    from edge.ingest import ingest_file, limits_from_config
    from edge.watch import FolderWatcher

    w = FolderWatcher(cfg, store)
    sub = w.dir / "sub"
    sub.mkdir()
    f = sub / "a.dcm"
    f.write_bytes(sample("RG1_UNCR.dcm").read_bytes())
    st = f.stat()
    ingest_file(store, f, source="watch", **limits_from_config(cfg))
    # Between ingest and delete, someone swaps the sub-folder for a link to a folder holding a same-named file.
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "a.dcm"
    victim.write_bytes(f.read_bytes())
    import os

    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    f.unlink()
    sub.rmdir()
    sub.symlink_to(victim_dir, target_is_directory=True)
    w._remove(f, (st.st_size, st.st_mtime_ns))
    assert victim.exists()


def test_a_file_swapped_for_a_symlink_after_the_listing_is_refused_not_read(cfg, store, tmp_path):
    from edge.ingest import ingest_file, limits_from_config

    secret = tmp_path / "secret.txt"
    secret.write_text("root password")
    link = cfg.watch_dir / "a.dcm"
    cfg.watch_dir.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    out = ingest_file(store, link, source="watch", follow_symlinks=False, **limits_from_config(cfg))
    assert out.status == "quarantined" and "cannot read file" in out.reason
    assert not list(store.quarantine_dir.rglob("*.*"))
