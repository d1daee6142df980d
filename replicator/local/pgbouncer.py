"""A throwaway local PgBouncer for `pgferry demo` and the test suite (Debian's `pgbouncer`).

It listens on 127.0.0.1 on a free port, pools in transaction mode, trusts local clients, and lets
its admin console (database `pgbouncer`) be driven by the user that runs the servers. Like the
servers it refuses to run as root, so as root it runs as the same unprivileged OS user. Its config
file lives in a temporary directory, where `pgferry cutover --pgbouncer` rewrites the database
entry it repoints.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .servers import ServerError, _unprivileged_user, free_port

ADMIN_USER = "postgres"


def find_pgbouncer() -> str | None:
    """The pgbouncer binary, or None when it is not installed (apt-get install pgbouncer)."""
    return shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
                                              if os.access(p, os.X_OK)), None)


class LocalPgBouncer:
    """`databases`: name -> its connection settings (`host=... port=... dbname=... user=...`)."""

    def __init__(self, databases: Mapping[str, str], *, pool_mode: str = "transaction", pool_size: int = 10,
                 settings: Mapping[str, str] | None = None) -> None:
        binary = find_pgbouncer()
        if binary is None:
            raise ServerError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        self.binary = binary
        self.databases = dict(databases)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.settings = dict(settings or {})
        self.host = "127.0.0.1"
        self.port = 0
        self.os_user = _unprivileged_user()
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        assert self._root is not None
        return self._root / "pgbouncer.ini"

    @property
    def logfile(self) -> Path:
        assert self._root is not None
        return self._root / "pgbouncer.log"

    def dsn(self, dbname: str, user: str = ADMIN_USER) -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user}"

    @property
    def admin_dsn(self) -> str:
        return self.dsn("pgbouncer")

    def _write_conf(self) -> None:
        assert self._root is not None
        dbs = "\n".join(f"{name} = {conninfo}" for name, conninfo in self.databases.items())
        conf = {"listen_addr": self.host, "listen_port": str(self.port), "unix_socket_dir": "",
                "auth_type": "trust", "auth_file": str(self._root / "userlist.txt"), "admin_users": ADMIN_USER,
                "pool_mode": self.pool_mode, "default_pool_size": str(self.pool_size), "max_client_conn": "200",
                "logfile": str(self.logfile), "pidfile": str(self._root / "pgbouncer.pid"),
                "server_reset_query": "DISCARD ALL", "ignore_startup_parameters": "extra_float_digits,options",
                **self.settings}
        text = "[databases]\n" + dbs + "\n\n[pgbouncer]\n" + "\n".join(f"{k} = {v}" for k, v in conf.items()) + "\n"
        self.config.write_text(text)
        (self._root / "userlist.txt").write_text(f'"{ADMIN_USER}" ""\n')

    def start(self) -> LocalPgBouncer:
        self._root = Path(tempfile.mkdtemp(prefix="pgferry-pgbouncer-"))
        os.chmod(self._root, 0o755)
        for _attempt in range(5):  # a free port can be taken between probing and binding
            self.port = free_port(self.host)
            self._write_conf()
            if self.os_user is not None:
                pw = pwd.getpwnam(self.os_user)
                for p in (self._root, self.config, self._root / "userlist.txt"):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
            cmd = [self.binary, "-q", str(self.config)]
            if self.os_user is not None:
                cmd = ["runuser", "-u", self.os_user, "--", *cmd]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    socket.create_connection((self.host, self.port), timeout=0.5).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise ServerError(f"pgbouncer did not start: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no pgbouncer log)"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # immediate shutdown; SIGINT would wait for clients
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalPgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
