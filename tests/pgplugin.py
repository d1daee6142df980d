"""pytest plugin: real PostgreSQL servers for the integration tests.

Servers (one per version and role, started on first use, stopped at session end):
  * ``pair``: a (source, target) pair, parametrized over ``--pg-pairs`` (default
    ``15-18,18-18,15-15``); 18 -> 18 and 15 -> 15 use a second server of the same version.
  * ``source``: one server, parametrized over the source versions in ``--pg-pairs``.

Each test gets fresh databases (``db`` helpers below), so tests do not see each other's tables,
slots or publications. Set PGFERRY_PG15_BINDIR / PGFERRY_PG18_BINDIR to use other binaries.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest

from replicator.local.pgbouncer import LocalPgBouncer, find_pgbouncer
from replicator.local.servers import LocalServer, ServerError, find_bindir
from tests.tcpproxy import TcpProxy

_counter = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--pg-pairs", default="15-18,18-18,15-15",
                     help="source-target PostgreSQL major version pairs to run integration tests on")


def _pairs(config: pytest.Config) -> list[tuple[int, int]]:
    out = []
    for item in config.getoption("--pg-pairs").split(","):
        s, t = item.strip().split("-")
        out.append((int(s), int(t)))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    pairs = _pairs(metafunc.config)
    if "pair" in metafunc.fixturenames:
        metafunc.parametrize("pair", pairs, ids=[f"{s}to{t}" for s, t in pairs], indirect=True)
    if "source" in metafunc.fixturenames:
        versions = sorted({s for s, _ in pairs})
        metafunc.parametrize("source", versions, ids=[f"pg{v}" for v in versions], indirect=True)


_MISSING: dict[int, str] = {}  # versions this machine lacks -> how to get them (the summary says)


def _require(version: int) -> None:
    """Skip a test whose server version this machine does not have, saying how to get it; in CI
    (CI=true) a missing version fails instead: the README's test command (.ci/run) installs it."""
    if version not in _MISSING:
        try:
            find_bindir(version)
            _MISSING[version] = ""
        except ServerError as exc:
            _MISSING[version] = str(exc)
    if _MISSING[version]:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(_MISSING[version])
        pytest.skip(f"{_MISSING[version]} (or run the README's test command, bash .ci/run, which installs it)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for version, why in sorted(_MISSING.items()):
        if why:
            terminalreporter.write_line(f"pgferry: the tests on PostgreSQL {version} were skipped: {why}; "
                                        "`bash .ci/run` installs it and runs them all", yellow=True)


class _Servers:
    def __init__(self) -> None:
        self.started: dict[tuple[int, str], LocalServer] = {}

    def get(self, version: int, role: str = "a") -> LocalServer:
        _require(version)
        key = (version, role)
        if key not in self.started:
            self.started[key] = LocalServer(version, name=f"test-{role}-").start()
        return self.started[key]

    def stop_all(self) -> None:
        for s in self.started.values():
            s.cleanup()


@pytest.fixture(scope="session")
def pg_servers() -> Iterator[_Servers]:
    servers = _Servers()
    yield servers
    servers.stop_all()


@dataclass
class Db:
    """A fresh database on a test server."""

    server: LocalServer
    name: str
    user: str | None = None  # None: the server's superuser

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name, self.user)

    @property
    def version(self) -> int:
        return self.server.version

    def execute(self, sql: str, params: tuple | None = None) -> list[tuple]:
        """Run one statement in autocommit; return its rows (or [])."""
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def psql(self, sql: str) -> str:
        return self.server.psql(sql, self.name, self.user)

    @property
    def as_superuser(self) -> Db:
        return Db(self.server, self.name)

    def drop(self) -> None:
        for (slot,) in self.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s",
                                    (self.name,)):
            self.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
            wait_for(lambda s=slot: not self.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (s,)), 10, "slot release")
            self.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        admin = Db(self.server, "postgres")
        admin.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def new_db(server: LocalServer, prefix: str = "t") -> Db:
    name = f"{prefix}_{next(_counter)}_{int(time.time() * 1000) % 100000}"
    Db(server, "postgres").execute(f"CREATE DATABASE {name}")
    return Db(server, name)


@pytest.fixture
def source(request: pytest.FixtureRequest, pg_servers: _Servers) -> Iterator[Db]:
    db = new_db(pg_servers.get(request.param, "src"), "src")
    yield db
    db.drop()


@pytest.fixture
def pair(request: pytest.FixtureRequest, pg_servers: _Servers) -> Iterator[tuple[Db, Db]]:
    s_ver, t_ver = request.param
    src = new_db(pg_servers.get(s_ver, "src"), "src")
    dst = new_db(pg_servers.get(t_ver, "dst"), "dst")
    yield src, dst
    src.drop()
    dst.drop()


def _as_owner(dst: Db) -> Iterator[Db]:
    """`dst` as a role that only owns its database, as on a managed service: no superuser, no SET
    privilege on session_replication_role. (It owns the schema public too: pg_database_owner.)"""
    role = f"owner_{dst.name}"
    admin = Db(dst.server, "postgres")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"ALTER DATABASE {dst.name} OWNER TO {role}")
    yield Db(dst.server, dst.name, user=role)
    superuser = dst.server.user
    dst.execute(f"REASSIGN OWNED BY {role} TO {superuser}; DROP OWNED BY {role}")  # the database's own objects
    admin.execute(f"ALTER DATABASE {dst.name} OWNER TO {superuser}")
    admin.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def owner_pair(pair: tuple[Db, Db]) -> Iterator[tuple[Db, Db]]:
    """(source, target) where pgferry's target role only owns the target database (the main case)."""
    for dst in _as_owner(pair[1]):
        yield pair[0], dst


@pytest.fixture(params=["owner", "superuser"])
def role_pair(request: pytest.FixtureRequest, pair: tuple[Db, Db]) -> Iterator[tuple[Db, Db]]:
    """`pair` twice: with a target role that only owns its database, and as a superuser."""
    if request.param == "superuser":
        yield pair
        return
    for dst in _as_owner(pair[1]):
        yield pair[0], dst


def hold_flags(dst: Db) -> tuple[str, ...]:
    """`start` flags for a target made by hand: an owner-only role holds back its foreign keys and
    triggers (a superuser target applies with the replica role)."""
    return ("--hold-back-constraints",) if dst.user else ()


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `cond` until it returns something truthy; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- the daemon under test -------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def main_pair_only(src: Db, dst: Db, why: str = "fault scenarios run on 15 -> 18, the main case") -> None:
    """Skip unless the pair is PostgreSQL 15 -> 18 (scenarios too slow to run on every pair)."""
    if (src.version, dst.version) != (15, 18):
        pytest.skip(why)


def publish_same_table(src: Db, dst: Db, ddl: str) -> None:
    """The same table on both sides, and a publication of all tables on the source."""
    src.execute(ddl + "; CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute(ddl)


def slow_inserts_under_a_timeout(db: Db, table: str, always: bool = False) -> None:
    """Every INSERT or COPY into `table` takes 0.5 s (a statement-level trigger), and the database
    has a 200 ms statement_timeout (and on PostgreSQL 17+ a 300 ms transaction_timeout, which
    terminates the session): limits meant for applications, met by pgferry's longer statements.
    `always`: the trigger fires under session_replication_role = replica too."""
    db.psql(f"""CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$;
        CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION slow();
        {f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER slow;" if always else ""}
        ALTER DATABASE {db.name} SET statement_timeout = '200ms';
        {f"ALTER DATABASE {db.name} SET transaction_timeout = '300ms';" if db.server.version >= 17 else ""}""")


def pgferry(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Any:
    """Run this checkout's `pgferry` CLI once and capture its output (a CompletedProcess). The
    caller's PGFERRY_* variables are left out: only `env` sets them."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGFERRY_")}
    return subprocess.run([sys.executable, "-m", "replicator.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**clean, **(env or {})}, timeout=timeout, check=False)


class Daemon:
    """`pgferry start` as a subprocess; its log goes to a file the test can show on failure."""

    def __init__(self, src: Db, dst: Db, *args: str, source_dsn: str | None = None, target_dsn: str | None = None,
                 env: dict[str, str] | None = None, copy: bool = False, ready: bool = True,
                 session: bool = False) -> None:
        import os
        import subprocess
        import sys
        import tempfile

        self.src, self.dst = src, dst
        self.log = tempfile.NamedTemporaryFile(prefix="pgferry-daemon-", suffix=".log", delete=False)
        self.cmd = [sys.executable, "-m", "replicator.cli", "start", *([] if copy else ["--no-copy"]),
                    "--source", source_dsn or src.dsn, "--target", target_dsn or dst.dsn, *args]
        self.env = {**os.environ, **(env or {})}
        self.session = session  # its own session, as a service runs (else the test's)
        self.proc: subprocess.Popen | None = None
        self._popen = subprocess.Popen
        self.start()
        if ready:
            self.wait_ready()

    def start(self) -> Daemon:
        self.proc = self._popen(self.cmd, stdout=self.log, stderr=self.log, cwd=ROOT, env=self.env,
                                start_new_session=self.session)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return __import__("pathlib").Path(self.log.name).read_text(errors="replace")

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.stop(9)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def wait_ready(self, timeout: float = 60, slot: str = "pgferry") -> Daemon:
        """Until the slot exists and the target holds its progress row (changes from now on are streamed)."""
        def ready() -> bool:
            return not self.running() or (self.progress(slot) > 0 and bool(self.src.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (slot,))))
        wait_for(ready, timeout, "pgferry to start streaming")
        assert self.running(), f"pgferry exited with {self.proc.returncode if self.proc else None}:\n{self.output()}"
        return self

    def progress(self, slot: str = "pgferry", schema: str = "pgferry") -> int:
        try:
            rows = self.dst.execute(f"SELECT applied_lsn - '0/0'::pg_lsn FROM {schema}.progress WHERE slot_name = %s",
                                    (slot,))
        except psycopg2.errors.UndefinedTable:
            return 0
        except psycopg2.errors.InvalidSchemaName:
            return 0
        return int(rows[0][0]) if rows else 0

    def wait_caught_up(self, timeout: float = 60, slot: str = "pgferry") -> None:
        """Until the target's stored progress passes the source's current WAL position."""
        (lsn,) = self.src.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0]
        wait_for(lambda: self.progress(slot) >= int(lsn) or not self.running(), timeout,
                 f"pgferry to apply up to {lsn}")
        assert self.running(), f"pgferry exited with {self.proc.returncode if self.proc else None}:\n{self.output()}"

    def close(self) -> None:
        if self.running():
            self.stop(9)


def require_installed(found: object, why: str) -> None:
    """Skip a test whose tool is missing (`found` None), saying `why`; under CI=true fail instead
    (.ci/run installs every tool the tests use)."""
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(why)
        pytest.skip(f"{why}; bash .ci/run installs it")


def require_pgbouncer() -> None:
    """Skip a test that needs Debian's pgbouncer where it is not installed (fail under CI=true)."""
    require_installed(find_pgbouncer(), "pgbouncer is not installed (Debian: apt-get install pgbouncer)")


@pytest.fixture
def pgbouncer() -> Iterator[Callable[..., LocalPgBouncer]]:
    """`make(db, pool_mode="transaction")`: a PgBouncer (Debian's package) with one database entry,
    named like `db`, in front of it; stopped after the test. Without pgbouncer installed the test
    skips, and fails under CI=true (.ci/run installs it)."""
    started: list[LocalPgBouncer] = []

    def make(db: Db, pool_mode: str = "transaction", pool_size: int = 10) -> LocalPgBouncer:
        require_pgbouncer()
        b = LocalPgBouncer({db.name: f"host={db.server.host} port={db.server.port} dbname={db.name} "
                                     f"user={db.user or db.server.user}"}, pool_mode=pool_mode, pool_size=pool_size)
        started.append(b.start())
        return b

    yield make
    for b in started:
        b.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keeps each phase's outcome on the test item, for fixtures that clean up after a pass only."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[list[Daemon]]:
    """Collects daemons a test starts and kills any still running at the end. Their log files
    are removed when the test passed and kept (the path is printed) when it failed."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()
    rep = getattr(request.node, "rep_call", None)
    for d in started:
        d.log.close()
        if rep is not None and rep.passed:
            __import__("os").unlink(d.log.name)
        else:
            print(f"pgferry's log: {d.log.name}")


def table_digest(db: Db, table: str, columns: list[str]) -> tuple[int, str]:
    """Row count and an order-independent content hash over `columns` (duplicates count)."""
    cols = ", ".join(columns)
    rows = db.execute(f"SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') "
                      f"FROM (SELECT md5(ROW({cols})::text) AS h FROM {table}) s")
    return int(rows[0][0]), rows[0][1]


def assert_same_tables(src: Db, dst: Db, tables: dict[str, list[str]]) -> None:
    diffs = []
    for table, cols in tables.items():
        a, b = table_digest(src, table, cols), table_digest(dst, table, cols)
        if a != b:
            diffs.append(f"{table}: source {a[0]} rows, target {b[0]} rows, hashes {a[1][:8]} vs {b[1][:8]}")
    assert not diffs, "tables differ:\n" + "\n".join(diffs)


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[Db], TcpProxy]]:
    """Factory: ``tcp_proxy(db)`` returns a proxy to db's server (closed at test end)."""
    made: list[TcpProxy] = []

    def make(db: Db) -> TcpProxy:
        p = TcpProxy(db.server.host, db.server.port)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()
