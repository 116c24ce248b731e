"""The hub's index in PostgreSQL (hub.database_url): connection, locking, schema and SQL dialect under HubStore."""
from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sync.core.errors import ConflictError, StoreError
from sync.hub import migrations

# Advisory lock keys. The one-bigint and the two-int key spaces never overlap (PostgreSQL's rule). There is no
# global write lock: receivers conflict only on the rows they both touch (HubStore's upserts take row locks), and
# with boxes partitioned over receivers (sync/hub/partitions.py) that is almost never.
SCHEMA_LOCK = 0x5741534C42
INSTANCE_LOCK_CLASS = 0x5741  # with hashtext(SOP Instance UID) as the second key

CONNECT_TIMEOUT_S = 10
LOCK_TIMEOUT_S = 30

_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str, named: bool) -> str:
    def sub(m: re.Match) -> str:
        tok = m.group(0)
        if tok[0] in "'\"":  # a literal or quoted name: no placeholder inside, but psycopg still reads its %
            return tok.replace("%", "%%")
        if tok == "?":
            return "%s"
        if tok == "%":
            return "%%"
        return f"%({m.group(1)})s" if named else tok

    return _TOKEN.sub(sub, sql)


def translate(sql: str, params=()) -> tuple[str, list | dict]:
    """SQLite-style SQL (`?` or `:name` placeholders) as psycopg takes it (`%s`, `%(name)s`, a literal % doubled):
    HubStore's methods and every query() caller (CLI, metrics, tests) keep writing one dialect."""
    if isinstance(params, Mapping):
        return _pyformat(sql, True), dict(params)
    return _pyformat(sql, False), list(params)


def redact(url: str) -> str:
    """The URL as errors and logs may show it: user:***@host, password=*** in the query."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    netloc = f"{user}{':***' if colon else ''}@{hostport}" if at else hostport
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                      safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "password"]
    return sorted({s for p in found for s in (p, unquote(p)) if s}, key=len, reverse=True)


def _scrub(err: BaseException, secrets: list[str]) -> str:
    text = " ".join(str(err).split())  # libpq's hints span lines; a log line should not
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _driver(where: str):
    try:
        import psycopg
    except ImportError as err:
        raise StoreError(f"hub index {where}: the PostgreSQL driver is not installed "
                         f"(pip install 'wasla[postgres]'): {err}") from None
    return psycopg


@functools.cache
def _number_loader():
    """numeric -> int or float, never Decimal: SUM() over BIGINT is numeric in PostgreSQL, and the CLI's JSON and the
    metrics do arithmetic with floats, as they do on SQLite's answers."""
    from psycopg.adapt import Loader

    class NumberLoader(Loader):
        def load(self, data):
            text = bytes(data).decode()
            try:
                return int(text)
            except ValueError:
                return float(text)

    return NumberLoader


class _Tx:
    """What HubStore's methods execute on inside tx(): the SQLite dialect they write, translated."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params=()):
        return self.conn.execute(*translate(sql, params))


class PostgresIndex:
    """HubStore's index in a PostgreSQL database that several receivers (processes, machines) may share."""

    insert_or_ignore, on_conflict_ignore, greatest = "INSERT", " ON CONFLICT DO NOTHING", "GREATEST"
    for_update = " FOR UPDATE"

    def __init__(self, url: str):
        self.url, self.where = url, redact(url)
        self._secrets = _secrets(url)
        self._psycopg = _driver(self.where)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._instances = threading.Lock()
        self._closed = False
        self.conn = self._connect()
        try:
            # Receivers starting together would race CREATE TABLE IF NOT EXISTS (a duplicate pg_type row): the
            # migrations run under SCHEMA_LOCK.
            migrations.migrate_pg(self.conn, SCHEMA_LOCK)
        except self._psycopg.Error as err:
            self.conn.close()
            raise StoreError(f"cannot open hub index {self.where}: {self._scrub(err)}") from None

    def _scrub(self, err: BaseException) -> str:
        return _scrub(err, self._secrets)

    def _connect(self):
        pg = self._psycopg
        from psycopg.rows import dict_row

        try:
            conn = pg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S,
                              application_name="wasla-hub")
        except pg.Error as err:
            # libpq may quote parts of a malformed conninfo: the cause is dropped, its text scrubbed.
            raise StoreError(f"cannot open hub index {self.where}: {self._scrub(err)}") from None
        conn.adapters.register_loader("numeric", _number_loader())
        try:
            # As SQLite's 30 s busy timeout: a receiver that hangs while holding a lock stalls the others for a
            # bounded time (their call fails with StoreError), and the server ends its transaction a little later.
            conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
            conn.execute(f"SET idle_in_transaction_session_timeout = '{2 * LOCK_TIMEOUT_S}s'")
        except pg.Error as err:
            conn.close()
            raise StoreError(f"cannot open hub index {self.where}: {self._scrub(err)}") from None
        return conn

    def _conn(self):
        if self._closed:
            raise StoreError(f"hub index {self.where} is closed")
        if self.conn.closed or self.conn.broken:
            # A server restart or failover: the next call reconnects, the failed one already raised StoreError.
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = self._connect()
        return self.conn

    def _lost(self, err: BaseException) -> StoreError:
        pg = self._psycopg
        if isinstance(err, (pg.errors.TransactionRollback, pg.errors.LockNotAvailable)):
            # A deadlock (PostgreSQL rolled this transaction back to free the other) or a lock wait past
            # lock_timeout: the caller may simply try again.
            return ConflictError(f"hub index {self.where}: {self._scrub(err)}")
        return StoreError(f"hub index {self.where}: {self._scrub(err)}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.conn.close()

    @contextlib.contextmanager
    def batch(self):
        """Many messages' writes in one transaction (one commit), as SqliteIndex.batch: tx() inside it is a SAVEPOINT
        (psycopg nests conn.transaction()), so one message's failure rolls back that message only. Without it every
        flag was its own commit and lock round trip: 1.0 CPU-ms and ~550 flags/s (scripts/bench_hub.py --pg)."""
        pg = self._psycopg
        with self._lock:
            conn = self._conn()
            try:
                with conn.transaction():
                    self._local.batch = True
                    try:
                        yield
                    finally:
                        self._local.batch = False
            except (pg.OperationalError, pg.InterfaceError) as err:
                raise self._lost(err) from err

    @contextlib.contextmanager
    def tx(self):
        pg = self._psycopg
        with self._lock:
            conn = self._conn()
            if getattr(self._local, "batch", False):
                with conn.transaction():  # a savepoint inside the batch
                    yield _Tx(conn)
                return
            try:
                with conn.transaction():
                    yield _Tx(conn)
            except (pg.OperationalError, pg.InterfaceError) as err:
                raise self._lost(err) from err

    def query(self, sql: str, params=()) -> list[dict]:
        pg = self._psycopg
        with self._lock:
            conn = self._conn()
            try:
                cur = conn.execute(*translate(sql, params))
                return cur.fetchall() if cur.description is not None else []
            except (pg.OperationalError, pg.InterfaceError) as err:
                raise self._lost(err) from err

    @contextlib.contextmanager
    def instance_lock(self, sop_instance_uid: str):
        """Held from commit_instance's look-up to its row: one receiver at a time files a given SOP instance.
        A session lock, since the file is written between two transactions; a lost session drops it by itself."""
        key = [INSTANCE_LOCK_CLASS, sop_instance_uid]
        with self._instances:  # a session lock is re-entrant: threads of this process queue here first
            self.query("SELECT pg_advisory_lock(?, hashtext(?))", key)
            try:
                yield
            finally:
                with contextlib.suppress(StoreError):
                    self.query("SELECT pg_advisory_unlock(?, hashtext(?))", key)


def read_only_query(url: str, sql: str, params=()) -> list[dict]:
    """One SELECT in a read-only session, for tools that only look (wasla-fleet list): unlike PostgresIndex it creates
    no schema, so it works with a read-only role and leaves a mistyped database untouched."""
    where, secrets = redact(url), _secrets(url)
    pg = _driver(where)
    from psycopg.rows import dict_row

    try:
        with pg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S,
                        application_name="wasla-fleet", options="-c default_transaction_read_only=on") as conn:
            conn.adapters.register_loader("numeric", _number_loader())
            return conn.execute(*translate(sql, params)).fetchall()
    except pg.Error as err:
        raise StoreError(f"hub index {where}: {_scrub(err, secrets)}") from None
