"""The hub index's numbered migrations: each recorded once, an index from before them adopted, a failing one rolled
back whole, and receivers starting together on a new index all opening it."""
from __future__ import annotations


def test_receivers_starting_together_on_a_new_sqlite_index_all_open_it(tmp_path):
    import threading

    from sync.hub.store import SqliteIndex

    for attempt in range(20):  # the races (WAL switch, added columns) showed within a few tries
        db = tmp_path / f"try{attempt}" / "hub.db"
        barrier, opened, errors = threading.Barrier(4), [], []

        def start():
            try:
                barrier.wait(10)
                opened.append(SqliteIndex(db))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for index in opened:
            index.close()
        assert not errors, errors
        assert len(opened) == 4


def test_hub_index_records_its_migrations_and_adopts_an_index_from_before_them(tmp_path):
    import sqlite3

    from sync.hub import migrations
    from sync.hub.store import SqliteIndex

    fresh = SqliteIndex(tmp_path / "new" / "hub.db")
    numbers = [r["number"] for r in fresh.query("SELECT number FROM _migrations ORDER BY number")]
    assert numbers == [n for n, _name, _step in migrations.MIGRATIONS]
    fresh.close()
    # An index as the first release created it: base tables only, no bookkeeping, a row in it.
    old = tmp_path / "old" / "hub.db"
    old.parent.mkdir()
    conn = sqlite3.connect(old)
    conn.executescript(migrations.SCHEMA.replace(", claimed_by TEXT", ""))
    conn.execute("INSERT INTO reads (read_id, study_uid, device, disposition, at) VALUES ('r1', '1.2', 'b', 'normal', 1)")
    conn.commit()
    conn.close()
    index = SqliteIndex(old)
    try:
        assert {r["name"] for r in index.query("PRAGMA table_info(reads)")} >= {"findings", "disposition"}
        assert index.query("SELECT read_id FROM reads") == [{"read_id": "r1"}]
        assert len(index.query("SELECT * FROM _migrations")) == len(migrations.MIGRATIONS)
    finally:
        index.close()
    assert SqliteIndex(old).query("SELECT COUNT(*) AS n FROM _migrations")[0]["n"] == len(migrations.MIGRATIONS)


def test_a_failing_migration_leaves_the_hub_index_as_it_was(tmp_path, monkeypatch):
    from sync.core.errors import StoreError
    from sync.hub import migrations
    from sync.hub.store import SqliteIndex

    SqliteIndex(tmp_path / "hub.db").close()
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS,
                                                   (99, "a new table, then a broken step",
                                                    "CREATE TABLE later (x INTEGER); ALTER TABLE nowhere ADD y")])
    try:
        SqliteIndex(tmp_path / "hub.db")
        raise AssertionError("the broken migration was accepted")
    except StoreError as err:
        assert "nowhere" in str(err)
    monkeypatch.undo()
    index = SqliteIndex(tmp_path / "hub.db")
    try:
        assert not index.query("SELECT name FROM sqlite_master WHERE name = 'later'")
        assert 99 not in {r["number"] for r in index.query("SELECT number FROM _migrations")}
    finally:
        index.close()
