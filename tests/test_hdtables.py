"""highdicom's module tables decoded lazily: the same content as highdicom's own, at a fraction of the memory."""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from sync.core import hdtables

REPO = Path(__file__).resolve().parent.parent


def test_the_lazy_table_holds_exactly_what_highdicom_ships_for_every_module():
    pytest.importorskip("highdicom")
    full = json.loads(pkgutil.get_data("highdicom", hdtables.RESOURCE))
    lazy = hdtables.LazyModuleMap(pkgutil.get_data("highdicom", hdtables.RESOURCE).decode())
    assert set(lazy) == set(full) and len(lazy) == len(full)
    for key, value in full.items():
        assert lazy[key] == value, key
    assert "no-such-module" not in lazy
    with pytest.raises(KeyError):
        lazy["no-such-module"]


def test_highdicom_answers_the_same_iod_questions_through_the_lazy_table():
    pytest.importorskip("highdicom")
    from highdicom import _standard_utils as su

    assert hdtables.install()
    assert su.get_module_attribute_map() is hdtables.lazy_table()
    import highdicom.base as hb

    assert hb.get_module_attribute_map is su.get_module_attribute_map, "the name imported into highdicom.base"
    # CR, DX, US, Comprehensive SR, Secondary Capture: what a box reads and writes.
    for sop in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.6.1",
                "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"):
        for attr in ("ContentDate", "BodyPartExamined", "PixelSpacing", "ContentSequence", "NumberOfFrames"):
            lazy = su.is_attribute_in_iod(attr, sop)
            full = json.loads(pkgutil.get_data("highdicom", hdtables.RESOURCE))
            iods, iod_of = su.get_iod_module_map(), su.get_sop_class_iod_map()
            expected = any(a["keyword"] == attr for m in iods[iod_of[sop]] for a in full[m["key"]])
            assert lazy == expected, (attr, sop)


def test_writing_the_first_study_sr_raises_the_peak_memory_by_under_100_mb():
    """In a fresh process (the daemon's situation): the first SR used to add ~250 MB at peak."""
    code = """
import os, sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
def mem(key):
    return [int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
from conftest import make_config
from edge.store import Store
from edge import results_dicom
from test_sync_support import make_cr, triage
w = Path(tempfile.mkdtemp()); store = Store.from_config(make_config(w))
triage(store, make_cr(w / "a.dcm", side=256), "normal")
uid = store.query("SELECT study_uid FROM instances")[0]["study_uid"]
before = mem('VmRSS')
rows = results_dicom.ensure_results(store, uid, box_id="b")
print(mem('VmHWM') - before, len(rows))
"""
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    grew, n = map(int, out.stdout.split()[-2:])
    assert n == 1
    assert grew < 100, f"the first SR raised the peak by {grew} MB"
