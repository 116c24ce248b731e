"""The hub index in a real PostgreSQL server (hub.database_url), started by this module: receivers filing studies
end to end, receivers sharing one database, the worklist, parity with SQLite, and errors that hide the password."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import pytest

from sync.core.errors import ConfigError, StoreError
from harness import free_port, stop_process, wait_for_port, wait_until
from sync.wire import codecs, protocol
from sync.hub import config as hub_config
from sync.hub.store import HubStore
from test_sync_support import (Box, RawBox, assert_hub_holds_exactly, hub_cfg, hub_view, make_cr, start_hub,
                               stored_sops, triage)

PASSWORD = "pw-Zq7-not-in-any-message"


def pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and postgres (Debian's layout)."""
    def version(p: Path) -> tuple:
        return tuple(int(x) if x.isdigit() else 0 for x in p.parent.parent.name.split("."))

    found = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if (p.parent / "postgres").is_file()),
                   key=version)
    return found[-1].parent if found else None


PG_BIN = pg_bin_dir()


class PgServer:
    """A private PostgreSQL cluster in a temp folder on a free port: password auth over TCP, stop()/start() at will.

    PostgreSQL refuses to run as root: as root, the cluster belongs to the "postgres" system user (else "nobody") and
    its processes drop to that user. The folder sits directly under the temp dir because pytest's tmp_path lies
    under a root-only folder that user could not enter."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="wasla-pg-"))
        self.data, self.sock, self.log_path = self.root / "data", self.root / "sock", self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.user: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            self.user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.sock.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.user:
            for p in (self.root, self.sock, pwfile):
                os.chown(p, self.user["user"], self.user["group"])
        try:
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "wasla", "--pwfile", str(pwfile),
                       "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        except BaseException:
            self.cleanup()
            raise
        pwfile.unlink()

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=120, **self.user)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stdout}{out.stderr}")

    def start(self) -> "PgServer":
        # fsync off: PostgreSQL's own durability is not under test here, and the test machine's disk is shared.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.sock),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=50",
                 "-c", "shared_buffers=16MB"], cwd=self.root, stdout=log, stderr=subprocess.STDOUT, **self.user)
        wait_for_port(self.port, proc=self.proc, timeout=60)
        wait_until(self._accepting, timeout=60, what="PostgreSQL accepting connections")
        return self

    def _accepting(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open sessions are cut, as when a server goes down under a receiver."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        self.proc = None

    def url(self, dbname: str, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://wasla:{password}@127.0.0.1:{port or self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg():
    """The module's server; the tests that need one skip where the PostgreSQL binaries are absent."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                    "(apt-get install postgresql; scripts/setup.sh with the test extra does it)")
    server = PgServer(PG_BIN)
    try:
        server.start()
    except Exception:
        print(server.log_path.read_text(errors="replace") if server.log_path.exists() else "(no server log)")
        server.cleanup()
        raise
    yield server
    server.cleanup()


_dbs = iter(range(1, 10**6))


@pytest.fixture
def pg_url(pg):
    """A fresh, empty database on the module's server, for one test."""
    return pg.create_database(f"hub_{next(_dbs)}")


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

def test_worklist_ordered_by_urgency_then_age(tmp_path, pg_url, capsys, monkeypatch):
    from sync.hub import cli as hub_cli

    monkeypatch.setattr(hub_cli, "_state", {})  # hub_cli caches its config per process: keep ours out of later tests
    store = _store(tmp_path, pg_url)
    try:
        t0 = time.time() - 1000
        for n, (uid, label) in enumerate([("1.1", "normal"), ("1.2", "urgent"), ("1.3", "review"), ("1.4", "urgent"),
                                          ("1.5", "normal"), ("1.6", "review")]):
            store.record_flag("box-a", {"flag_id": f"f{uid}", "study_uid": uid, "label": label, "at": t0 + n * 10,
                                        "n_instances": 1}, None)
        # A later image made 1.5 urgent (an escalation wins; its age stays its first flag's), and 1.3 was read.
        store.record_flag("box-a", {"flag_id": "f1.5b", "study_uid": "1.5", "label": "urgent", "at": t0 + 500}, None)
        store.record_flag("box-a", {"flag_id": "f1.1b", "study_uid": "1.1", "label": "normal", "at": t0 + 600}, None)
        store.add_read("1.3", "normal", None, "dr-a")
        wl = store.worklist()
        assert [(r["study_uid"], r["label"]) for r in wl] == [
            ("1.2", "urgent"), ("1.4", "urgent"), ("1.5", "urgent"), ("1.3", "review"), ("1.6", "review"),
            ("1.1", "normal")]
        assert [r["since"] for r in wl[:3]] == [t0 + 10, t0 + 30, t0 + 40]
        assert [r["study_uid"] for r in store.worklist(unread_only=True)] == ["1.2", "1.4", "1.5", "1.6", "1.1"]
        assert [r["study_uid"] for r in store.worklist(limit=2)] == ["1.2", "1.4"]
    finally:
        store.close()
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(f'[hub]\ndata_dir = "{tmp_path / "hub"}"\ndatabase_url = "{pg_url}"\n')
    capsys.readouterr()
    assert hub_cli.main(["--config", str(hub_toml), "worklist", "--json", "--unread"]) == 0
    assert [r["study_uid"] for r in json.loads(capsys.readouterr().out)] == ["1.2", "1.4", "1.5", "1.6", "1.1"]


def _script(store: HubStore) -> list:
    """Every public method HubStore offers the receiver, the CLI and the metrics, in one run; what they return."""
    out = []
    store.seen("box-a")
    store.seen("box-a", chunk=True, dup=True)
    store.record_status("box-a", True, 1000.0)
    store.record_flag("box-a", {"flag_id": "f1", "study_uid": "1.2.3", "label": "review", "reasons": ["x"],
                                "modality": "CR", "n_instances": 2, "at": 1001.0}, b"\xff\xd8jpeg")
    store.record_flag("box-a", {"flag_id": "f1", "study_uid": "1.2.3", "label": "review", "at": 1001.0}, None)
    body = b"0123456789" * 1000
    m = {"transfer": "tA", "study_uid": "1.2.3", "label": "urgent", "size": len(body),
         "sha256": hashlib.sha256(body).hexdigest(), "chunk_size": 4096, "count": 3}
    out.append(store.upsert_transfer("box-a", m)["state"])
    out.append(store.upsert_transfer("box-a", {**m, "sop_instance_uid": "1.2.3.1", "codec": "jpegls",
                                               "transfer_syntax": "1.2.840.10008.1.2.4.80", "original_size": 20000,
                                               "ratio": 2.0})["ratio"])
    with pytest.raises(StoreError, match="differ"):
        store.upsert_transfer("box-a", {**m, "size": 1})
    with pytest.raises(StoreError, match="another device"):
        store.upsert_transfer("box-b", m)
    out.append([store.put_chunk("tA", i, i * 4096, body[i * 4096:(i + 1) * 4096]) for i in (2, 0, 2, 1)])
    out.append(sorted(store.have("tA")))
    out.append([store.claim_for_verify("tA"), store.claim_for_verify("tA")])
    store.discard_chunks("tA", "sha mismatch")
    out.append((store.transfer("tA")["state"], store.transfer("tA")["retries"], sorted(store.have("tA"))))
    for i in range(3):
        store.put_chunk("tA", i, i * 4096, body[i * 4096:(i + 1) * 4096])
    out.append(store.claim_for_verify("tA"))
    t = store.transfer("tA")
    out.append([store.commit_instance(t, "1.2.3.1", "1.2.3", body), store.commit_instance(t, "1.2.3.1", "1.2.3", body)])
    out.append(store.instance_file(store.stored_copy("1.2.3.1")).read_bytes() == body)
    out.append(store.stored_copy(None))
    store.upsert_transfer("box-a", {**m, "transfer": "tB", "sha256": "f" * 64})
    store.fail_transfer("tB", "not DICOM")
    out.append(store.transfer("tB")["state"])
    store.dead_letter("wasla/v1/box-a/up/chunk", "box-a", "bad frame", b"\x00" * 100)
    s = store.study("1.2")  # a unique prefix, as technicians type it
    out.append({k: s[k] for k in ("study_uid", "label", "reasons", "modality", "n_expected", "n_instances",
                                  "wire_bytes", "original_bytes")})
    out.append([(i["sop_instance_uid"], i["size"], i["path"]) for i in s["instances"]])
    read = store.add_read("1.2.3", "abnormal", "50% opacity", "dr-b")
    out.append([(r["read_id"] == read["read_id"], r["by"], r["note"]) for r in store.reads_to_publish("box-a", 0)])
    out.append(len(store.reads_to_publish("box-a", time.time() + 10)))
    store.read_published(read["read_id"])
    out.append(len(store.reads_to_publish("box-a", 0)))
    store.record_heartbeat("box-a", {"queue_depth": 3, "oldest_unsent_at": 999.5, "reads_applied": [read["read_id"]],
                                     "link": {"rtt_ms": 40}, "models": ["cxr"], "disk_free_mb": 100})
    out.append(len(store.reads_to_publish("box-a", time.time() + 10)))
    out.append([{k: v for k, v in b.items() if not k.endswith(("_seen", "_at"))} for b in store.boxes()])
    out.append([{k: d[k] for k in ("topic", "device", "reason", "size")} for d in store.dead_letters()])
    out.append([{k: r[k] for k in ("study_uid", "label", "n_instances", "wire_bytes", "read_disposition")}
                for r in store.worklist()])
    out.append(store.query("SELECT COALESCE(SUM(size), 0) AS b, COUNT(*) AS n, AVG(size) AS a FROM transfers "
                           "WHERE label LIKE ? AND reason != '100%?'", ["urg%"]))
    out.append(store.query("SELECT times FROM flags WHERE flag_id = :f", {"f": "f1"}))
    with pytest.raises(Exception):
        store.query("SELECT nope FROM studies")
    out.append(store.query("SELECT 1 AS one"))  # the connection is usable after a failed statement
    return out


def test_same_calls_give_the_same_answers_on_sqlite_and_postgresql(tmp_path, pg_url):
    from sync.core import metrics
    from sync.hub.metrics import hub_collector

    answers, scraped = {}, {}
    for name, url in (("sqlite", ""), ("postgresql", pg_url)):
        store = _store(tmp_path / name, url)
        try:
            answers[name] = _script(store)
            text = metrics.exposition(hub_collector(store, hub_id="h")())
            scraped[name] = sorted(line for line in text.splitlines() if "age_seconds{" not in line)
        finally:
            store.close()
    assert (tmp_path / "sqlite" / "hub" / "hub.db").exists()
    assert not (tmp_path / "postgresql" / "hub" / "hub.db").exists()
    assert answers["postgresql"] == answers["sqlite"]
    assert scraped["postgresql"] == scraped["sqlite"]


# --- configuration and errors -----------------------------------------------------------------------------------

def test_database_url_is_a_strict_hub_key_and_selects_the_index():
    assert hub_config.parse("").hub.database_url == ""
    cfg = hub_config.parse('[hub]\ndatabase_url = "postgresql://hub@db.local:5433/wasla"\n')
    assert cfg.hub.database_url == "postgresql://hub@db.local:5433/wasla"
    for bad, why in (('"mysql://x@h/db"', "must be empty"), ('"postgresql://u:pw-Zq7@h:99999/db"', "port"),
                     ('"postgresql://u:pw-Zq7@h:5432"', "names no database"), ("5", "database_url")):
        with pytest.raises(ConfigError, match=why) as exc:
            hub_config.parse(f"[hub]\ndatabase_url = {bad}\n")
        assert "hub.database_url" in str(exc.value) and "pw-Zq7" not in str(exc.value)


def test_wrong_url_or_stopped_server_gives_store_error_without_the_password(tmp_path, pg, pg_url):
    from sync.hub.store_pg import redact

    wrong = {"wrong password": pg.url("postgres", password="wrong-" + PASSWORD),
             "no server": pg.url("postgres", port=free_port()),
             "no database": pg.url("no_such_db"),
             "password in the query": f"postgresql://wasla@127.0.0.1:{pg.port}/no_such_db?password={PASSWORD}"}
    for case, url in wrong.items():
        with pytest.raises(StoreError) as exc:
            _store(tmp_path, url)
        msg = str(exc.value)
        assert PASSWORD not in msg and "***" in msg and "127.0.0.1:" in msg, (case, msg)
        assert exc.value.__cause__ is None and exc.value.__suppress_context__, "the driver's own text is not chained"
    assert redact(pg_url) == f"postgresql://wasla:***@127.0.0.1:{pg.port}/{pg_url.rsplit('/', 1)[1]}"

    store = _store(tmp_path, pg_url)
    store.seen("box-a")
    pg.stop()
    try:
        with pytest.raises(StoreError) as exc:
            store.seen("box-a")  # the session was cut under it
        with pytest.raises(StoreError) as exc2:
            store.worklist()     # and no server to reconnect to
        with pytest.raises(StoreError) as exc3:
            _store(tmp_path, pg_url)
        for e in (exc, exc2, exc3):
            assert PASSWORD not in str(e.value) and "***" in str(e.value)
    finally:
        pg.start()
    store.seen("box-a")  # reconnected: nothing was lost
    assert store.query("SELECT messages FROM boxes")[0]["messages"] == 2
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.worklist()


def test_missing_driver_gives_store_error_and_sqlite_never_needs_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    with pytest.raises(StoreError, match=r"driver is not installed.*postgres") as exc:
        _store(tmp_path, f"postgresql://wasla:{PASSWORD}@127.0.0.1:1/hub")
    assert PASSWORD not in str(exc.value) and "wasla:***@127.0.0.1:1/hub" in str(exc.value)
    s = _store(tmp_path, "")
    s.seen("box-a")
    assert s.boxes()[0]["device"] == "box-a"
    s.close()


def test_fleet_list_reads_last_seen_from_a_postgresql_hub_index(tmp_path, pg_url):
    from provisioning.fleet import _hub_last_seen

    store = _store(tmp_path, pg_url)
    try:
        store.seen("clinic-07")
    finally:
        store.close()
    seen = _hub_last_seen(pg_url)
    assert set(seen) == {"clinic-07"}
    assert seen["clinic-07"][:4] == time.strftime("%Y", time.gmtime())
    # only looks: a database without the hub's tables gets an error, not the tables
    empty = pg_url.rsplit("/", 1)[0] + "/postgres"
    with pytest.raises(StoreError, match="boxes"):
        _hub_last_seen(empty)
    import psycopg

    with psycopg.connect(empty) as c:
        assert c.execute("SELECT to_regclass('public.boxes')").fetchone()[0] is None


def test_a_burst_of_flags_is_committed_in_batches_in_postgresql_and_one_bad_flag_spoils_none(tmp_path, broker, parts,
                                                                                            pg_url):
    from test_sync_transfer import burst_with_a_poison_and_a_collision

    burst_with_a_poison_and_a_collision(tmp_path, broker, parts, pg_url)


def test_postgresql_index_records_its_migrations_once_and_adopts_one_from_before_them(tmp_path, pg_url):
    import psycopg

    from sync.hub import migrations

    want = [n for n, _name, _step in migrations.MIGRATIONS]
    with psycopg.connect(pg_url, autocommit=True) as conn:  # an index as the first release created it
        conn.execute(migrations.pg_types(migrations.SCHEMA.replace(", claimed_by TEXT", "")))
    stores = [_store(tmp_path, pg_url) for _ in range(2)]  # the second finds everything applied
    try:
        rows = stores[0].query("SELECT number FROM _migrations ORDER BY number")
        assert [r["number"] for r in rows] == want
        cols = stores[0].query("SELECT column_name FROM information_schema.columns WHERE table_name = 'transfers'")
        assert "claimed_by" in {r["column_name"] for r in cols}
    finally:
        for s in stores:
            s.close()
