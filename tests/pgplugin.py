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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg2
import pytest

from replicator.servers import LocalServer

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


class _Servers:
    def __init__(self) -> None:
        self.started: dict[tuple[int, str], LocalServer] = {}

    def get(self, version: int, role: str = "a") -> LocalServer:
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

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.name)

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
        return self.server.psql(sql, self.name)

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
