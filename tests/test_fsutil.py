"""Atomic file writes shared by box, hub and fleet: all or nothing, exact permissions, no temp file left behind."""
import os
import stat

import pytest

from sync.core.fsutil import atomic_write


def test_atomic_write_replaces_the_whole_file_and_keeps_a_key_private(tmp_path):
    path = tmp_path / "box.key"
    path.write_bytes(b"old")
    atomic_write(path, b"new key", mode=0o600)
    assert path.read_bytes() == b"new key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box.key"]


def test_atomic_write_without_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "study.dcm", b"x" * 10)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "study.dcm").stat().st_mode) == 0o640


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "pointer"
    path.write_bytes(b"1.2.0\n")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"1.2.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pointer"]
