"""The common ingest path: judging files, storing or quarantining them, and recovering after a crash."""
from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from sync.core.errors import BadInputError, NotFoundError, OutOfResourcesError
from edge.ingest import adopt_orphans, expand_paths, ingest_file, ingest_paths, limits_from_config, meta_from_dataset
from edge.store import Store, file_sha256

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def limits(cfg):
    return limits_from_config(cfg)


def _copy_with_new_uid(src, dest):
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dest)
    return ds.SOPInstanceUID


def test_meta_from_dataset_takes_header_facts_and_refuses_missing_uids(sample):
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True)
    meta = meta_from_dataset(ds)
    assert (meta.sop_instance_uid, meta.study_uid) == (ds.SOPInstanceUID, ds.StudyInstanceUID)
    assert (meta.rows, meta.columns, meta.frames, meta.modality) == (ds.Rows, ds.Columns, 1, ds.Modality)
    assert meta.transfer_syntax == ds.file_meta.TransferSyntaxUID
    for keyword, words in (("SOPInstanceUID", "SOP Instance UID"), ("StudyInstanceUID", "Study Instance UID")):
        partial = Dataset()
        for other in {"SOPInstanceUID", "StudyInstanceUID"} - {keyword}:
            setattr(partial, other, ds[other].value)
        with pytest.raises(BadInputError, match=words):
            meta_from_dataset(partial)


def test_good_file_is_stored_from_a_copy_and_the_original_is_left_alone(store, sample, limits):
    src = sample("US1_J2KR.dcm")
    before = file_sha256(src)

    first = ingest_file(store, src, source="cli", **limits)
    second = ingest_file(store, src, source="cli", **limits)

    assert first.status == "stored" and first.reason is None
    assert second.status == "duplicate" and second.instance_id == first.instance_id
    assert file_sha256(src) == before
    (row,) = store.query("SELECT * FROM instances")
    assert row["state"] == "received" and row["sha256"] == before
    assert not list(store.tmp_dir.iterdir())


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_each_kind_of_bad_file_is_quarantined_with_its_own_reason(store, sample, limits, tmp_path):
    good = sample("RG1_UNCR.dcm").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "truncated.dcm").write_bytes(good[:2000])
    (bad / "half.dcm").write_bytes(sample("US1_J2KR.dcm").read_bytes()[:70000])  # inside encapsulated pixel data
    (bad / "notes.txt").write_text("not an image\n" * 20)
    (bad / "raw.dcm").write_bytes(good[132:])  # a bare data set: no preamble, no file meta
    ds = pydicom.dcmread(sample("RG1_UNCR.dcm"))
    del ds.SOPInstanceUID
    ds.save_as(bad / "nouid.dcm")
    expected = {
        "empty.dcm": "empty file (0 bytes)",
        "truncated.dcm": "truncated DICOM",
        "half.dcm": "truncated DICOM",
        "notes.txt": "not a DICOM file",
        "raw.dcm": "without the Part 10 file header",
        "nouid.dcm": "no SOP Instance UID",
    }

    outcomes = {name: ingest_file(store, bad / name, source="cli", **limits) for name in expected}

    for name, words in expected.items():
        assert outcomes[name].status == "quarantined", name
        assert words in outcomes[name].reason, (name, outcomes[name].reason)
    # A cut file still names its instance, so its study is flagged for review rather than forgotten.
    assert outcomes["truncated.dcm"].sop_instance_uid == pydicom.dcmread(sample("RG1_UNCR.dcm")).SOPInstanceUID
    rows = store.quarantined()
    assert len(rows) == len(expected)
    assert all(r["reason"] for r in rows)
    assert not list(store.iter_spool_files()) and not list(store.tmp_dir.iterdir())


def test_too_large_file_is_quarantined_not_parsed(store, sample, cfg):
    out = ingest_file(store, sample("RG1_UNCR.dcm"), source="cli", max_pixels=cfg.storage.max_pixels,
                      max_file_bytes=1_000_000)
    assert out.status == "quarantined" and "file too large" in out.reason


def test_full_disk_is_refused_not_quarantined(cfg, sample, limits):
    store = Store(cfg.db_path, cfg.spool_dir, cfg.quarantine_dir, min_free_mb=10**12)
    try:
        with pytest.raises(OutOfResourcesError):
            ingest_file(store, sample("RG1_UNCR.dcm"), source="cli", **limits)
        assert store.query("SELECT * FROM instances") == []
        assert not list(store.tmp_dir.iterdir())
    finally:
        store.close()


def test_vanished_file_raises_not_found(store, tmp_path, limits):
    with pytest.raises(NotFoundError):
        ingest_file(store, tmp_path / "gone.dcm", source="cli", **limits)


def test_ingest_paths_walks_folders_skips_dotfiles_and_reports_progress(store, sample, limits, tmp_path):
    root = tmp_path / "usb"
    (root / "DICOM" / "nested").mkdir(parents=True)
    (root / ".Trashes").mkdir()
    _copy_with_new_uid(sample("RG1_UNCR.dcm"), root / "DICOM" / "IM0001")
    _copy_with_new_uid(sample("OBXXXX1A_rle.dcm"), root / "DICOM" / "nested" / "IM0002")
    (root / "DICOM" / "nested" / "IM0003").write_bytes(sample("RG1_UNCR.dcm").read_bytes()[:2000])
    (root / "DICOMDIR.txt").write_text("index\n")
    (root / ".DS_Store").write_bytes(b"\0" * 50)
    shutil.copy(sample("US1_J2KR.dcm"), root / ".Trashes" / "deleted.dcm")
    single = tmp_path / "single.dcm"
    _copy_with_new_uid(sample("US1_J2KR.dcm"), single)
    seen = []

    outcomes = ingest_paths(store, [root, single], max_pixels=limits["max_pixels"],
                            max_file_bytes=limits["max_file_bytes"], progress=lambda done, total: seen.append((done, total)))

    assert sorted(o.status for o in outcomes) == ["quarantined", "quarantined", "stored", "stored", "stored"]
    assert seen == [(i, 5) for i in range(1, 6)]
    assert {r["source"] for r in store.query("SELECT source FROM instances")} == {"cli"}
    with pytest.raises(NotFoundError):
        expand_paths([tmp_path / "no-such-folder"])


def test_adopt_orphans_registers_a_spool_file_whose_row_never_committed_and_drops_part_files(store, sample):
    # The crash window: the file was renamed into the spool, the process died before the row committed.
    src = sample("OBXXXX1A_rle.dcm")
    sha = file_sha256(src)
    orphan = store.spool_dir / sha[:2] / f"{sha}.dcm"
    orphan.parent.mkdir(parents=True)
    shutil.copy(src, orphan)
    leftover = store.new_tmp_path()
    leftover.write_bytes(b"half a C-STORE")

    assert adopt_orphans(store) == 1

    (row,) = store.query("SELECT * FROM instances")
    assert row["state"] == "received" and row["path"] == f"{sha[:2]}/{sha}.dcm" and row["source"] == "recovered"
    assert row["sop_instance_uid"] == pydicom.dcmread(orphan, stop_before_pixels=True).SOPInstanceUID
    assert not leftover.exists()
    assert adopt_orphans(store) == 0
    assert len(store.query("SELECT * FROM instances")) == 1


def _poison(tmp_path, name, mutate):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CR"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    mutate(ds)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


POISON = {
    "study_uid_with_space": lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3 4"),
    "study_uid_with_nul_inside": lambda ds: setattr(ds, "StudyInstanceUID", "1.2\x003"),
    "study_uid_of_200_chars": lambda ds: setattr(ds, "StudyInstanceUID", "1." + "2" * 200),
    "sop_uid_with_letters": lambda ds: setattr(ds, "SOPInstanceUID", "1.2.abc"),
    "frames_beyond_sqlite_integer": lambda ds: setattr(ds, "NumberOfFrames", "99999999999999999999999"),
    "sop_class_as_FD": lambda ds: (ds.__delitem__(0x00080016), ds.add_new(0x00080016, "FD", 1.5)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_poison_headers_are_quarantined_with_a_reason_and_the_next_file_is_still_stored(store, sample, limits,
                                                                                       tmp_path):
    poison = [_poison(tmp_path, name, mutate) for name, mutate in POISON.items()]
    good = tmp_path / "zz-good.dcm"
    good_uid = _copy_with_new_uid(sample("RG1_UNCR.dcm"), good)
    outcomes = ingest_paths(store, [*poison, good], source="cli", **limits)
    assert len(outcomes) == len(poison) + 1
    assert outcomes[-1].status == "stored", outcomes
    for outcome, name in zip(outcomes, POISON):
        if name == "sop_class_as_FD":
            continue  # a readable, if odd, class UID: stored, never triaged as anything it is not
        assert outcome.status == "quarantined" and outcome.reason, name
    reasons = {r["reason"] for r in store.query("SELECT reason FROM instances WHERE state = 'quarantined'")}
    assert any("not a valid DICOM UID" in r for r in reasons)
    assert store.query("SELECT state FROM instances WHERE sop_instance_uid = ?", [good_uid])[0]["state"] == "received"
    # Every stored row's identifiers fit the protocol's ids, so the uploader can never choke on them.
    from sync.wire import protocol
    from edge.uplink.outbox import flag_id

    for row in store.query("SELECT study_uid FROM instances WHERE study_uid IS NOT NULL"):
        assert protocol.valid_id(flag_id(row["study_uid"], "urgent"))


def test_flag_id_of_a_uid_the_protocol_cannot_carry_is_a_stable_hash():
    from sync.wire import protocol
    from edge.uplink.outbox import flag_id

    assert flag_id("1.2.3", "review") == "review-1.2.3"
    odd = flag_id("1.2.3 4\x00" + "9" * 300, "urgent")
    assert protocol.valid_id(odd) and odd == flag_id("1.2.3 4\x00" + "9" * 300, "urgent") and odd.startswith("urgent-h")


def test_valid_deflated_file_is_stored_not_called_truncated(store, limits):
    from pydicom.data import get_testdata_file

    outcome = ingest_file(store, get_testdata_file("image_dfl.dcm"), source="cli", **limits)
    assert outcome.status == "stored", outcome.reason


BOMB_PROBE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from bombs import deflate_bomb
from edge import ingest

path = deflate_bomb(Path(sys.argv[1]))  # ~600 KB that inflates to 600 MiB
meta_, bad = ingest._judge(path, 100_000_000, 2 * 2**30)
rss = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) // 1024
print(json.dumps({"reason": str(bad) if bad else None, "file_bytes": path.stat().st_size, "peak_rss_mb": rss}))
"""


@pytest.mark.timeout(180)
def test_deflate_bomb_is_refused_before_pydicom_inflates_it_with_memory_to_spare(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", BOMB_PROBE, str(tmp_path / "bomb.dcm")], cwd=repo,
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file_bytes"] < 2 * 2**20
    assert got["reason"] and "decompression bomb" in got["reason"]
    assert got["peak_rss_mb"] < 300, got


def _with_private_sequence(tmp_path, name: str, raw_sequence: bytes):
    """A small valid CR whose private element (0009,1010) is replaced by `raw_sequence` (explicit VR LE bytes)."""
    marker = b"PLACEHOLDER!"

    def add_placeholder(ds):
        ds.add_new(0x00090010, "LO", "WASLA TEST")
        ds.add_new(0x00091010, "OB", marker)

    path = _poison(tmp_path, name, add_placeholder)
    data = path.read_bytes()
    placeholder = b"\x09\x00\x10\x10OB\x00\x00" + len(marker).to_bytes(4, "little") + marker
    assert data.count(placeholder) == 1
    path.write_bytes(data.replace(placeholder, raw_sequence))
    return path


def _undefined_sequence(items: bytes) -> bytes:
    return b"\x09\x00\x10\x10SQ\x00\x00\xff\xff\xff\xff" + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _undefined_item(content: bytes) -> bytes:
    return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + content + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


@pytest.mark.timeout(60)
def test_a_100k_item_private_sequence_is_refused_in_well_under_a_second_and_the_next_study_is_stored(
        store, sample, limits, tmp_path):
    import time

    from sync.wire import dicom_scan

    one_item = _undefined_item(b"\x09\x00\x01\x10LO\x08\x00abcdefgh")
    big = _with_private_sequence(tmp_path, "huge-private-sequence", _undefined_sequence(one_item * 100_000))
    assert 3_000_000 < big.stat().st_size < 3_500_000  # the 3.2 MB file of issue 12, row 10
    good = tmp_path / "good.dcm"
    good_uid = _copy_with_new_uid(sample("RG1_UNCR.dcm"), good)

    t0 = time.perf_counter()
    refused = ingest_file(store, big, source="cli", **limits)
    took = time.perf_counter() - t0
    stored = ingest_file(store, good, source="cli", **limits)

    # pydicom alone parses all 100k items eagerly: 31 s at ingest and 11 s at triage on the box before the walk.
    assert took < 5, took
    assert refused.status == "quarantined"
    assert f"more than {dicom_scan.MAX_ITEMS} sequence items" in refused.reason
    assert stored.status == "stored" and stored.sop_instance_uid == good_uid


@pytest.mark.timeout(60)
def test_a_private_sequence_within_the_item_limit_is_stored_and_triage_reads_it_in_seconds(store, limits, tmp_path):
    import time

    import pydicom

    from edge import imaging

    one_item = _undefined_item(b"\x09\x00\x01\x10LO\x08\x00abcdefgh")
    path = _with_private_sequence(tmp_path, "large-private-sequence", _undefined_sequence(one_item * 20_000))

    t0 = time.perf_counter()
    outcome = ingest_file(store, path, source="cli", **limits)
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = pydicom.dcmread(store.instance_path(store.query("SELECT * FROM instances")[0]))  # as the triage worker
    (frame,) = imaging.render(ds, min_side=4)
    triage_s = time.perf_counter() - t0

    assert outcome.status == "stored", outcome.reason
    assert ingest_s < 2, ingest_s  # the walk keeps no sequence: no pydicom parse at ingest
    assert triage_s < 5, triage_s  # pydicom's eager parse of at most MAX_ITEMS items, then an 8x8 render
    assert frame.shape == (8, 8)


@pytest.mark.parametrize("depth", [40, 5000])
def test_sequences_nested_past_the_depth_limit_are_quarantined_without_a_recursion_error(store, limits, tmp_path,
                                                                                        depth):
    from sync.wire import dicom_scan

    nested = b""
    for _ in range(depth):
        nested = _undefined_sequence(_undefined_item(nested))
    path = _with_private_sequence(tmp_path, f"nested-{depth}", nested)

    outcome = ingest_file(store, path, source="cli", **limits)

    assert outcome.status == "quarantined"
    assert f"nested deeper than {dicom_scan.MAX_DEPTH} levels" in outcome.reason
