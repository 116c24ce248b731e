"""Store: migrations, state machine, exactly-once claims, recovery, duplicates, quarantine, study labels."""
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from sync.core.errors import OutOfResourcesError, StateError
from edge.store import MIGRATIONS, InstanceMeta, Store


def make_store(tmp_path, **kw):
    return Store(tmp_path / "wasla.db", tmp_path / "spool", tmp_path / "quarantine", **kw)


def put(store, uid, study="1.2.3", payload=b"DICM-ish"):
    tmp = store.new_tmp_path()
    tmp.write_bytes(payload + uid.encode())
    return store.add_instance(tmp, InstanceMeta(sop_instance_uid=uid, study_uid=study, modality="CR"), source="test")


def test_migrations_are_recorded_and_not_reapplied(tmp_path):
    s = make_store(tmp_path)
    s.close()
    s = make_store(tmp_path)
    rows = s.query("SELECT number FROM _migrations")
    assert [r["number"] for r in rows] == [m[0] for m in MIGRATIONS]
    assert s.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"


def test_added_instance_is_in_spool_and_row_is_committed_for_other_connections(tmp_path):
    s = make_store(tmp_path)
    res = put(s, "1.1")
    assert res.path.is_file() and not res.duplicate
    other = sqlite3.connect(tmp_path / "wasla.db")
    assert other.execute("SELECT state FROM instances WHERE sop_instance_uid='1.1'").fetchone() == ("received",)
    assert list(s.tmp_dir.iterdir()) == []


def test_same_sop_instance_twice_is_stored_once(tmp_path):
    s = make_store(tmp_path)
    a = put(s, "1.1")
    b = put(s, "1.1")
    assert b.duplicate and b.id == a.id
    assert s.counts()["received"] == 1


def test_concurrent_claims_never_hand_out_the_same_instance(tmp_path):
    s = make_store(tmp_path)
    for i in range(40):
        put(s, f"1.{i}")
    got, lock = [], threading.Lock()

    def claim():
        while (row := s.claim_next()) is not None:
            with lock:
                got.append(row["id"])

    threads = [threading.Thread(target=claim) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(got) == sorted(set(got)) and len(got) == 40


def test_restart_returns_interrupted_processing_to_the_queue(tmp_path):
    s = make_store(tmp_path)
    put(s, "1.1")
    assert s.claim_next()["state"] == "processing"
    s.close()
    s = make_store(tmp_path)
    assert s.recover() == 1
    assert s.counts()["received"] == 1


def test_study_label_is_the_most_severe_of_its_instances(tmp_path):
    s = make_store(tmp_path)
    put(s, "1.1"), put(s, "1.2"), put(s, "9.9", study="other")
    for uid, label in (("1.1", "normal"), ("1.2", "urgent")):
        row = s.claim_next()
        s.record_triage(row["id"], label, [], [{"model": "m", "model_version": "1", "backend": "b", "label": label,
                                                 "scores": {"x": 1}, "thresholds": {}, "timings": {}}])
    study = s.study("1.2.3")
    assert study["label"] == "urgent" and study["n_instances"] == 2
    assert s.studies(label="urgent")[0]["study_uid"] == "1.2.3"


def test_triaged_instance_cannot_be_triaged_twice(tmp_path):
    s = make_store(tmp_path)
    put(s, "1.1")
    row = s.claim_next()
    s.record_triage(row["id"], "normal", [], [])
    with pytest.raises(StateError):
        s.record_triage(row["id"], "urgent", [], [])


def test_quarantined_instance_flags_its_study_for_review_and_can_be_requeued(tmp_path):
    s = make_store(tmp_path)
    put(s, "1.1")
    row = s.claim_next()
    s.quarantine(row["id"], "cannot decode pixel data")
    assert s.quarantined()[0]["reason"] == "cannot decode pixel data"
    assert s.study("1.2.3")["label"] == "review"
    assert s.requeue(study_uid="1.2.3") == 1
    assert s.counts()["received"] == 1


def test_nearly_full_disk_refuses_new_data(tmp_path):
    s = make_store(tmp_path, min_free_mb=10**12)
    with pytest.raises(OutOfResourcesError, match="disk nearly full"):
        s.check_space(1000)


def test_quarantine_of_unreadable_file_keeps_the_bytes_and_the_reason(tmp_path):
    s = make_store(tmp_path)
    tmp = s.new_tmp_path()
    tmp.write_bytes(b"not dicom")
    iid = s.add_quarantined(tmp, "not a DICOM file", source="watch", original_name="x.txt")
    row = s.quarantined()[0]
    assert row["id"] == iid and row["reason"] == "not a DICOM file"
    assert open(row["path"], "rb").read() == b"not dicom"
    assert not tmp.exists()
    assert os.listdir(s.tmp_dir) == []


def test_a_migration_that_fails_half_way_leaves_no_trace_and_the_next_start_applies_it(tmp_path, monkeypatch):
    from edge import store as store_mod, store_migrations

    def broken(db):
        db["half_done"].create({"id": int}, pk="id")
        raise sqlite3.OperationalError("power cut")

    s = make_store(tmp_path)
    s.close()
    monkeypatch.setattr(store_migrations, "MIGRATIONS", store_migrations.MIGRATIONS + [(99, "broken", broken)])
    with pytest.raises(store_mod.StoreError, match="cannot migrate"):
        make_store(tmp_path)
    monkeypatch.setattr(store_migrations, "MIGRATIONS", store_migrations.MIGRATIONS[:-1] + [
        (99, "fixed", lambda db: db["half_done"].create({"id": int}, pk="id"))])
    s = make_store(tmp_path)
    assert 99 in [r["number"] for r in s.query("SELECT number FROM _migrations")]


def test_purge_deletes_only_files_of_instances_the_hub_acknowledged_long_enough_ago(tmp_path):
    import time as _time

    s = make_store(tmp_path)
    kept, gone = put(s, "1.1"), put(s, "1.2")
    for res in (kept, gone):
        row = s.claim_next()
        s.record_triage(row["id"], "normal", [], [])
        for to in ("queued", "sent", "acknowledged"):
            with s.transaction() as db:
                s.transition(db, row["id"], to)
    s.db.execute("UPDATE instances SET updated_at = 0 WHERE id = ?", [gone.id])
    assert s.purge(_time.time() - 86400) == 1
    assert not gone.path.exists() and kept.path.exists()
    assert s.counts()["purged"] == 1 and s.counts()["acknowledged"] == 1


def test_a_study_whose_only_image_was_quarantined_is_still_flagged_to_the_hub(tmp_path):
    from edge.uplink.outbox import Outbox

    s = make_store(tmp_path)
    put(s, "1.1", study="9.9")
    s.quarantine(s.claim_next()["id"], "pixel data could not be decoded")
    flags = Outbox(s, tmp_path / "outbox", "box-a").studies_needing_flags()
    assert [(f["study_uid"], f["label"]) for f in flags] == [("9.9", "review")]


def test_readers_open_the_store_read_only_and_leave_its_journal_files_to_the_store_owner(cfg):
    writer = Store.from_config(cfg)
    writer.close()
    reader = Store.reader(cfg)
    try:
        assert reader.counts() is not None
        with pytest.raises(Exception, match="readonly"):
            reader.db.execute("INSERT INTO _migrations VALUES (999, 'x', 0)")
    finally:
        reader.close()
    if os.geteuid() != 0:
        return
    # The daemon's own user owns the store; root (a technician's sudo) runs a reader while the daemon is stopped.
    # SQLite run as root gives the journal files it creates the database file's owner; this holds it to that.
    db = Path(cfg.db_path)
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)
    os.chown(db, 4242, 4242)
    reader = Store.reader(cfg)  # e.g. `sudo wasla status --watch`, still open when the daemon starts
    try:
        reader.counts()
        for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert not side.exists() or side.stat().st_uid == 4242, f"{side.name} left to root"
    finally:
        reader.close()
