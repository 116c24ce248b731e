"""A short fuzz run (fixed seed) of the box's untrusted-DICOM reader, the hub's decoder and the wire decoder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_targets  # noqa: E402

# The long run is scripts/fuzz.py (docs/fuzzing.md); this one is sized for CI: ~60 s of cases on one worker.
CI_SECONDS = 55
CI_SEED = 20261202


@pytest.mark.timeout(150)
def test_a_minute_of_mutated_dicom_and_wire_messages_finds_no_crash_hang_or_blow_up(tmp_path):
    report = fuzz_targets.fuzz(CI_SECONDS, CI_SEED, out_dir=tmp_path / "crashes")

    print(report.summary())
    assert all(report.cases[t] > 20 for t in fuzz_targets.TARGETS), dict(report.cases)
    assert report.crashes == {}, report.summary()


@pytest.mark.timeout(60)
def test_the_harness_reports_a_hang_a_memory_blow_up_a_native_crash_and_a_stray_exception():
    worker = fuzz_targets.Worker(memory=1536 * 2**20)
    try:
        results = {what: worker.run("selftest", {"data": what}, timeout=3.0)
                   for what in ("fine", "hang", "memory", "die", "raise", "fine")}
    finally:
        worker.stop()

    assert results["fine"]["status"] == "ok"
    assert "hang" in results["hang"]["signature"]
    assert "MemoryError" in results["memory"]["signature"]
    assert "worker died" in results["die"]["signature"]
    assert "KeyError" in results["raise"]["signature"]
    assert worker.starts == 3  # the first start, then a fresh worker after the hang and after the native crash
