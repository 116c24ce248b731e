"""The hub index on PostgreSQL behaves as on SQLite: the same answers, strict config, clean errors, migrations."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest

from sync.core.errors import ConfigError, StoreError
from harness import free_port
from sync.hub import config as hub_config
from sync.hub.store import HubStore
from test_sync_support import (hub_cfg)

from pgserver import PASSWORD, PgServer, pg, pg_url  # noqa: F401 - fixtures


def _acked(box, n):
    return box.states()["acknowledged"] == n


def _store(root: Path, url: str) -> HubStore:
    return HubStore.from_config(hub_cfg(root, 1, database_url=url))


# --- end to end -------------------------------------------------------------------------------------------------


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
