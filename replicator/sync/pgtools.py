"""The PostgreSQL client programs pgferry runs (pg_dump, psql) and how they get a DSN."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg2.extensions

from ..errors import UsageError


@functools.cache
def find_pg_dump() -> str:
    """The newest pg_dump on this machine (PGFERRY_PG_DUMP overrides)."""
    override = os.environ.get("PGFERRY_PG_DUMP")
    if override:
        return override
    candidates = [shutil.which("pg_dump")]
    try:
        from ..local.servers import embedded_bindir

        candidates.append(str(embedded_bindir() / "pg_dump"))
    except Exception:  # the wheel may be missing outside the demo/test set-up
        pass
    candidates += [str(p) for p in Path("/usr/lib/postgresql").glob("*/bin/pg_dump")]
    best: tuple[int, str] | None = None
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        out = subprocess.run([c, "--version"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"(\d+)", out.split(")")[-1] if ")" in out else out)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), c)
    if best is None:
        raise UsageError("pg_dump not found: install the PostgreSQL client (e.g. apt-get install postgresql-client) "
                         "or set PGFERRY_PG_DUMP, or pass --no-schema with the target's tables created by hand")
    return best[1]


_LIBPQ_ENV = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
              "user": "PGUSER", "password": "PGPASSWORD", "passfile": "PGPASSFILE", "options": "PGOPTIONS",
              "sslmode": "PGSSLMODE", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslrootcert": "PGSSLROOTCERT",
              "sslcrl": "PGSSLCRL", "connect_timeout": "PGCONNECT_TIMEOUT",
              "target_session_attrs": "PGTARGETSESSIONATTRS", "service": "PGSERVICE",
              "channel_binding": "PGCHANNELBINDING", "gssencmode": "PGGSSENCMODE", "krbsrvname": "PGKRBSRVNAME",
              "sslnegotiation": "PGSSLNEGOTIATION", "application_name": "PGAPPNAME"}


def libpq_env(dsn: str, application_name: str = "pgferry") -> dict[str, str]:
    """The DSN as PG* environment variables for pg_dump/psql: a password on a command line would be
    visible to every user of the machine in `ps`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PG") or k in ("PGPASSFILE", "PGSERVICEFILE", "PGSYSCONFDIR")}
    for key, value in psycopg2.extensions.parse_dsn(dsn).items():
        var = _LIBPQ_ENV.get(key)
        if var is None:
            raise UsageError(f"DSN parameter {key!r} is not supported for pg_dump/psql by pgferry")
        env[var] = value
    env["PGAPPNAME"] = application_name
    return env


def find_client(name: str) -> str:
    """psql (or another client) next to the pg_dump in use."""
    path = Path(find_pg_dump()).with_name(name)
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name} not found next to {find_pg_dump()} or on PATH: install the PostgreSQL client")
    return found


_SET_LINE = re.compile(r"^SET\s+([a-z_][a-z0-9_.]*)\s*=", re.I)


def drop_unknown_settings(cur: Any, sql: str) -> str:
    """A newer pg_dump starts with SETs an older target does not have (pg_dump 18: transaction_timeout);
    drop those lines (they only tune the restoring session). `cur`: on the target."""
    cur.execute("SELECT name FROM pg_settings")
    known = {r[0] for r in cur.fetchall()}
    out = []
    for line in sql.splitlines():
        m = _SET_LINE.match(line)
        if m and m.group(1).lower() not in known:
            continue
        out.append(line)
    return "\n".join(out)
