"""A private PostgreSQL server for tests and benchmarks (its own cluster on a free port), and its pytest fixtures."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness import free_port, stop_process, wait_for_port, wait_until

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
