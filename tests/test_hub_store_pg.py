"""The hub index in a real PostgreSQL server (hub.database_url), started by this module: receivers filing studies
end to end, duplicates and replays, receivers sharing one database and racing for the same rows (the rest of the
PostgreSQL index tests: tests/test_hub_store_pg_parity.py; the server: tests/pgserver.py)."""
from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pydicom

from harness import wait_until
from sync.wire import codecs, protocol
from sync.hub.store import HubStore
from test_sync_support import (Box, RawBox, assert_hub_holds_exactly, hub_cfg, hub_view, make_cr, start_hub,
                               stored_sops, triage)

from pgserver import PASSWORD, PgServer, pg, pg_url  # noqa: F401 - fixtures


def _acked(box, n):
    return box.states()["acknowledged"] == n


def _store(root: Path, url: str) -> HubStore:
    return HubStore.from_config(hub_cfg(root, 1, database_url=url))


# --- end to end -------------------------------------------------------------------------------------------------


def test_receiver_files_studies_into_postgresql_end_to_end_bit_exact(tmp_path, broker, parts, pg_url):
    hub = start_hub(tmp_path, broker.port, database_url=pg_url)
    parts.append(hub)
    box = Box(tmp_path, broker.port).start()
    parts.append(box)
    files = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i) for i in range(3)]
    for f, label in zip(files, ("urgent", "review", "normal")):
        triage(box.store, f, label)
    wait_until(lambda: _acked(box, 3), timeout=60, what="all acknowledged")
    assert_hub_holds_exactly(tmp_path, files, database_url=pg_url)
    assert not (tmp_path / "hub" / "hub.db").exists(), "the index went to PostgreSQL, not to a SQLite file"
    assert not list((tmp_path / "hub" / "partial").glob("*.part")), "partial files are removed once filed"
    view = hub_view(tmp_path, pg_url)
    try:
        states = {r["state"]: r["n"] for r in view.query("SELECT state, COUNT(*) AS n FROM transfers "
                                                          "WHERE sop_instance_uid IS NOT NULL GROUP BY state")}
        assert set(states) == {"complete"} and states["complete"] >= 3
        assert view.query("SELECT COUNT(*) AS n FROM chunks")[0]["n"] == 0
        assert sorted(r["label"] for r in view.worklist()) == ["normal", "review", "urgent"]
    finally:
        view.close()


def test_duplicated_replayed_and_resent_chunks_end_in_one_exact_copy_in_postgresql(tmp_path, broker, parts, pg_url):
    hub = start_hub(tmp_path, broker.port, database_url=pg_url)
    parts.append(hub)
    raw = RawBox(broker.port)
    src = make_cr(tmp_path / "in" / "x.dcm", seed=7)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    data = codecs.encode_for_wire(src, codecs=["jpegls"]).data
    sha, cs = hashlib.sha256(data).hexdigest(), 4096
    pieces = [data[i:i + cs] for i in range(0, len(data), cs)]

    def chunk(tid, i):
        return protocol.encode_chunk_json(raw.device, transfer=tid, index=i, count=len(pieces), size=len(data),
                                          chunk_size=cs, sha256=sha, study_uid=str(ds.StudyInstanceUID),
                                          label="review", data=pieces[i])

    for i in [*reversed(range(len(pieces))), 0, 1]:   # out of order, then two duplicates
        raw.pub("chunk", chunk("t1", i))
    wait_until(lambda: raw.last("t1") and raw.last("t1")["status"] == "complete", timeout=15, what="complete")
    raw.pub("chunk", chunk("t1", 2))                    # a replay after completion is answered, not stored
    # The same instance under another transfer id (a re-encode after a box crash): acknowledged, not stored twice.
    raw.pub("manifest", protocol.encode("manifest", raw.device, transfer="t2", study_uid=str(ds.StudyInstanceUID),
                                        sop_instance_uid=str(ds.SOPInstanceUID), size=len(data), sha256=sha,
                                        chunk_size=cs, count=len(pieces), resume=True))
    wait_until(lambda: raw.last("t2") and raw.last("t2")["status"] == "complete", timeout=15, what="dup complete")
    wait_until(lambda: sum(a.get("transfer") == "t1" and a["status"] == "complete" for a in raw.acks) >= 2,
               timeout=15, what="replay answered")
    raw.c.loop_stop()
    assert stored_sops(tmp_path, pg_url) == [str(ds.SOPInstanceUID)]
    assert_hub_holds_exactly(tmp_path, [src], database_url=pg_url)
    view = hub_view(tmp_path, pg_url)
    try:
        assert view.query("SELECT dup_chunks FROM boxes")[0]["dup_chunks"] >= 3
        assert view.study(str(ds.StudyInstanceUID))["n_instances"] == 1
    finally:
        view.close()


def test_two_receivers_sharing_one_postgresql_database_split_the_boxes_and_file_each_study_once(
        tmp_path, broker, parts, pg_url):
    from sync.hub.partitions import owners
    from test_hub_partitions import _both_see_each_other, _boxes_for

    h1 = start_hub(tmp_path, broker.port, "hub-1", database_url=pg_url)
    h2 = start_hub(tmp_path, broker.port, "hub-2", database_url=pg_url)
    parts += [h1, h2]
    wait_until(lambda: _both_see_each_other(h1, h2), timeout=20, what="receivers see each other")
    ids = _boxes_for(owners(["hub-1", "hub-2"]), ["hub-1", "hub-2"])
    boxes = [Box(tmp_path / d, broker.port, d).start() for d in ids]
    parts += boxes
    study = pydicom.uid.generate_uid()
    files = []
    for n, box in enumerate(boxes):
        mine = [make_cr(tmp_path / "in" / f"{n}-{i}.dcm", seed=10 * n + i, study_uid=study if n == 0 and i < 3 else None)
                for i in range(4)]
        for i, f in enumerate(mine):
            triage(box.store, f, ("urgent", "review", "normal", "normal")[i])
        files += mine
    wait_until(lambda: all(_acked(b, 4) for b in boxes), timeout=90, what="all acknowledged")
    assert set(h1.by_device) == {ids[0]} and set(h2.by_device) == {ids[1]}, "each box stays with its receiver"
    assert_hub_holds_exactly(tmp_path, files, database_url=pg_url)
    view = hub_view(tmp_path, pg_url)
    try:
        assert view.study(study)["n_instances"] == 3 and view.study(study)["label"] == "urgent"
    finally:
        view.close()


def test_receivers_writing_for_different_boxes_never_wait_for_each_other_only_for_a_shared_row(tmp_path, pg_url):
    """No global write lock: while one receiver's batch is open, another files another box's flag at once; a flag
    for the very study the open batch holds waits for that row only, then lands."""
    a, b = _store(tmp_path, pg_url), _store(tmp_path, pg_url)

    def flag(store, device, fid, study, label):
        store.record_flag(device, {"flag_id": fid, "study_uid": study, "label": label, "at": time.time()}, None,
                          count_message=True)

    try:
        done = {"other": threading.Event(), "same": threading.Event()}
        with a.batch():
            flag(a, "box-a", "f1", "1.2.3.1", "normal")
            other = threading.Thread(target=lambda: (flag(b, "box-b", "f2", "1.2.3.2", "urgent"),
                                                     done["other"].set()))
            other.start()
            assert done["other"].wait(5), "another box's flag waited for an unrelated open batch"
            same = threading.Thread(target=lambda: (flag(b, "box-a", "f3", "1.2.3.1", "urgent"), done["same"].set()))
            same.start()
            assert not done["same"].wait(0.5), "a write to the row the open batch holds must wait for its commit"
        assert done["same"].wait(10)
        other.join(5)
        same.join(5)
        assert a.study("1.2.3.1")["label"] == "urgent" and a.study("1.2.3.2")["label"] == "urgent"
        assert {r["device"]: r["messages"] for r in a.query("SELECT device, messages FROM boxes")} == \
            {"box-a": 2, "box-b": 1}
    finally:
        a.close()
        b.close()


def test_racing_stores_claim_each_transfer_once_and_file_each_sop_once(tmp_path, pg_url):
    """Four receivers' stores on one database, released together on the same work: a new study and a new transfer
    created by all four at once (a manifest and its first chunk on two receivers), one of them verifying the
    transfer, and of four transfers of one SOP instance (one box's four encodings, e.g. re-encoded after crashes)
    exactly one filed, its file matching its row."""
    stores = [_store(tmp_path, pg_url) for _ in range(4)]
    try:
        rounds = 6
        for r in range(rounds):
            sop, study = f"1.2.826.0.1.{r}.1", f"1.2.826.0.1.{r}"
            bodies = [f"copy {k} of {sop}".encode() * (50 + k) for k in range(4)]
            mine = [{"transfer": f"t{r}-{k}", "study_uid": study, "label": "review", "size": len(body),
                     "sha256": hashlib.sha256(body).hexdigest(), "chunk_size": 4096, "count": 1}
                    for k, body in enumerate(bodies)]
            shared = {"transfer": f"shared{r}", "study_uid": study, "label": "urgent", "size": 1, "sha256": "0" * 64,
                      "chunk_size": 4096, "count": 1}
            barrier = threading.Barrier(4)
            transfers, claims, commits, errors = [None] * 4, [None] * 4, [None] * 4, []

            def work(k):
                try:
                    barrier.wait(10)
                    transfers[k] = stores[k].upsert_transfer("box-0", mine[k])
                    stores[k].upsert_transfer("box-0", shared)
                    barrier.wait(10)
                    claims[k] = stores[k].claim_for_verify(f"shared{r}")
                    barrier.wait(10)
                    commits[k] = stores[k].commit_instance(transfers[k], sop, study, bodies[k])
                except Exception as err:  # noqa: BLE001 - reported below
                    errors.append(err)
                    barrier.abort()

            threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
            assert claims.count(True) == 1, claims
            assert commits.count(True) == 1, commits
            row = stores[0].stored_copy(sop)
            assert row["transfer_id"] == f"t{r}-{commits.index(True)}"
            assert row["device"] == "box-0"
            assert hashlib.sha256(stores[0].instance_file(row).read_bytes()).hexdigest() == row["sha256"]
            s = stores[0].study(study)
            assert s["n_instances"] == 1 and s["label"] == "urgent"
            assert {stores[0].transfer(f"t{r}-{k}")["state"] for k in range(4)} == {"complete"}
        assert stores[0].query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == rounds
        assert stores[0].query("SELECT COUNT(*) AS n FROM transfers")[0]["n"] == rounds * 5
        assert sum(1 for _ in (tmp_path / "hub" / "studies").rglob("*.dcm")) == rounds
        assert not list((tmp_path / "hub" / "studies").rglob("*.tmp"))
    finally:
        for s in stores:
            s.close()


def test_four_boxes_racing_for_one_new_study_uid_leave_it_to_exactly_one(tmp_path, pg_url):
    """The ownership check sits inside the write transaction: no interleaving lets two boxes both own a study."""
    from sync.core.errors import UidCollisionError

    stores = [_store(tmp_path, pg_url) for _ in range(4)]
    try:
        for r in range(5):
            study = f"1.2.826.0.2.{r}"
            barrier = threading.Barrier(4)
            won, lost = [], []

            def work(k):
                barrier.wait(10)
                try:
                    stores[k].upsert_transfer(f"box-{k}", {"transfer": f"race{r}-{k}", "study_uid": study,
                                                           "size": 1, "sha256": "0" * 64, "chunk_size": 4096,
                                                           "count": 1})
                    won.append(k)
                except UidCollisionError:
                    lost.append(k)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(won) == 1 and len(lost) == 3, (won, lost)
            assert stores[0].study(study)["device"] == f"box-{won[0]}"
    finally:
        for s in stores:
            s.close()


# --- the worklist, the CLI and parity with SQLite -----------------------------------------------------------------
