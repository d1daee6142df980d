"""Moving the application at cutover through the PgBouncer in front of the source.

PgBouncer's admin console has what a switchover needs, and nothing to repoint a database with: so
`PAUSE db` (transactions in flight finish, new ones queue in PgBouncer, its server connections
close), then once the target holds everything, the `[databases]` entry in its config file is
rewritten to the target and `RELOAD`ed, and `RESUME db` lets the queued clients through to the
target. Clients see a pause, not an error, as long as PgBouncer pools in transaction (or
statement) mode: in session mode PAUSE waits for every client to disconnect, so that is refused
before anything changes.

The entry's new settings: host, port and dbname of the target DSN, over the entry's others
(`user=`, `password=`, pool settings stay), or what `--pgbouncer-target` gives. The config file is
rewritten by rename (a reader never sees half of it), with its mode and owner kept.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions

from ..errors import PgferryError, UsageError, first_line

log = logging.getLogger("pgferry.cutover")

_PAIR = re.compile(r"(\w+)\s*=\s*('(?:[^']|'')*'|\S+)")


def parse_entry(value: str) -> dict[str, str]:
    """`host=a port=5432 dbname='my db'` -> {host: a, port: 5432, dbname: my db}."""
    out = {}
    for key, val in _PAIR.findall(value):
        if val.startswith("'") and val.endswith("'") and len(val) >= 2:
            val = val[1:-1].replace("''", "'")
        out[key] = val
    return out


def render_entry(settings: dict[str, str]) -> str:
    def q(v: str) -> str:
        return v if v and re.fullmatch(r"[^\s']+", v) else "'" + v.replace("'", "''") + "'"
    return " ".join(f"{k}={q(v)}" for k, v in settings.items())


def describe(admin_dsn: str) -> str:
    try:
        p = psycopg2.extensions.parse_dsn(admin_dsn)
    except psycopg2.ProgrammingError:
        return "(unparsable DSN)"
    return f"{p.get('host', 'localhost')}:{p.get('port', '6432')}"


@dataclass
class Entry:
    database: str
    conffile: str
    line_no: int
    line: str  # as it is in the file, without the newline
    settings: dict[str, str]
    pool_mode: str
    paused: bool


class Bouncer:
    """One PgBouncer database entry the application reaches the source through."""

    def __init__(self, admin_dsn: str, database: str, conffile: str | None = None) -> None:
        try:
            params = psycopg2.extensions.parse_dsn(admin_dsn)
        except psycopg2.ProgrammingError as exc:
            raise UsageError(f"invalid --pgbouncer DSN: {first_line(exc)} (expected e.g. "
                             "'host=127.0.0.1 port=6432 dbname=pgbouncer user=pgbouncer')") from None
        if params.get("dbname", "pgbouncer") != "pgbouncer":
            raise UsageError("--pgbouncer is PgBouncer's admin console: its dbname is pgbouncer")
        self.admin_dsn = admin_dsn if "dbname" in params else admin_dsn + " dbname=pgbouncer"
        self.database = database
        self.conffile = conffile
        self.where = describe(admin_dsn)

    # -- the admin console ----------------------------------------------------------------------
    def _connect(self) -> Any:
        try:
            conn = psycopg2.connect(self.admin_dsn)
        except psycopg2.Error as exc:
            raise PgferryError(f"cannot connect to PgBouncer's admin console at {self.where}: {first_line(exc)} "
                               "(the user must be in its admin_users)") from None
        conn.autocommit = True  # the console knows no transactions
        return conn

    def command(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        except psycopg2.Error as exc:
            raise PgferryError(f"PgBouncer at {self.where}: {sql}: {first_line(exc)}") from None
        finally:
            conn.close()

    def _show(self, what: str) -> list[dict[str, Any]]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [d[0] for d in cur.description]
                return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        finally:
            conn.close()

    def inspect(self) -> Entry:
        """The entry as PgBouncer runs it and as its config file has it; refuses what a pause
        without errors cannot be done with (before anything changes)."""
        dbs = {r["name"]: r for r in self._show("DATABASES")}
        if self.database not in dbs:
            raise UsageError(f"PgBouncer at {self.where} has no database {self.database!r} (SHOW DATABASES lists "
                             f"{', '.join(sorted(n for n in dbs if n != 'pgbouncer')) or 'none'}); "
                             "--pgbouncer-database names the entry the application connects to")
        row = dbs[self.database]
        config = {r["key"]: r["value"] for r in self._show("CONFIG")}
        pool_mode = row.get("pool_mode") or config.get("pool_mode", "session")
        if pool_mode == "session":
            raise UsageError(f"PgBouncer at {self.where} pools {self.database!r} in session mode: PAUSE would wait "
                             "for every client to disconnect. Use pool_mode = transaction for a switchover "
                             "without errors, or move the application with --switch-command")
        conffile = self.conffile or config.get("conffile") or ""
        if not conffile:
            raise UsageError(f"PgBouncer at {self.where} does not say where its config file is: pass "
                             "--pgbouncer-config FILE")
        try:
            lines = open(conffile).read().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read PgBouncer's config file {conffile}: {exc.strerror} (pgferry rewrites "
                             "the database entry there: run the cutover where the file is, or pass "
                             "--pgbouncer-config)") from None
        if not os.access(conffile, os.W_OK) or not os.access(os.path.dirname(os.path.abspath(conffile)), os.W_OK):
            raise UsageError(f"cannot write PgBouncer's config file {conffile} (or its directory): pgferry rewrites "
                             "the database entry there to repoint it")
        found = _find_entry(lines, self.database)
        if found is None:
            raise UsageError(f"PgBouncer's config file {conffile} has no line for {self.database!r} in its "
                             "[databases] section (an %include'd file?): pass that file with --pgbouncer-config, "
                             "or move the application with --switch-command")
        no, value = found
        return Entry(self.database, conffile, no, lines[no], parse_entry(value), pool_mode, bool(row.get("paused")))

    def pause(self, timeout: float) -> None:
        """PAUSE the database: returns once no transaction of it runs on a server."""
        done: list[BaseException | None] = []

        def run() -> None:
            try:
                self.command(f"PAUSE {_ident(self.database)}")
                done.append(None)
            except BaseException as exc:  # handed to the waiting thread
                done.append(exc)

        t = threading.Thread(target=run, name="pgbouncer-pause", daemon=True)
        t.start()
        t.join(timeout)
        if not done:
            busy = [p for p in self._show("POOLS") if p["database"] == self.database and p["sv_active"]]
            self.resume()
            raise PgferryError(f"PgBouncer at {self.where} could not pause {self.database!r} within {timeout:.0f} s: "
                               f"{sum(p['sv_active'] for p in busy)} server connection(s) stayed in a transaction. "
                               "It is resumed; nothing was changed")
        if done[0] is not None:
            if isinstance(done[0], PgferryError) and "already paused" in str(done[0]):
                return  # an interrupted cutover left it paused
            raise done[0]

    def resume(self) -> bool:
        """RESUME the database; False when it was not paused."""
        try:
            self.command(f"RESUME {_ident(self.database)}")
            return True
        except PgferryError as exc:
            if "not paused" in str(exc):
                return False
            raise

    def waiting(self) -> tuple[int, float]:
        """(clients waiting, the longest wait in seconds) on this database's pools."""
        pools = [p for p in self._show("POOLS") if p["database"] == self.database]
        return (sum(int(p["cl_waiting"]) for p in pools),
                max((int(p["maxwait"]) + int(p.get("maxwait_us") or 0) / 1e6 for p in pools), default=0.0))

    def running_entry(self) -> dict[str, Any]:
        for r in self._show("DATABASES"):
            if r["name"] == self.database:
                return r
        raise PgferryError(f"PgBouncer at {self.where} lost its database {self.database!r}")

    # -- the config file ------------------------------------------------------------------------
    def write_line(self, entry: Entry, line: str) -> None:
        """Put `line` in place of the entry's line and RELOAD."""
        path = entry.conffile
        with open(path) as f:
            lines = f.read().splitlines()
        found = _find_entry(lines, entry.database)
        if found is None:
            raise PgferryError(f"PgBouncer's config file {path} no longer has a line for {entry.database!r}")
        lines[found[0]] = line
        st = os.stat(path)
        fd, tmp = tempfile.mkstemp(prefix=".pgferry-", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.command("RELOAD")

    def repoint(self, entry: Entry, settings: dict[str, str]) -> str:
        """Rewrite the entry to `settings` (over its others), RELOAD, and check PgBouncer took it.
        Returns the new line."""
        new = {**entry.settings, **settings}
        line = f"{_key(entry.line)} = {render_entry(new)}"
        self.write_line(entry, line)
        row = self.running_entry()
        want = (new.get("host"), str(new.get("port", "5432")), new.get("dbname", entry.database))
        have = (row.get("host"), str(row.get("port")), row.get("database"))
        if want[0] and have != want:
            raise PgferryError(f"PgBouncer at {self.where} reloaded, but runs {entry.database!r} on "
                               f"{have[0]}:{have[1]}/{have[2]}, not {want[0]}:{want[1]}/{want[2]} (see its log)")
        return line

    def points_at(self, settings: dict[str, str]) -> bool:
        row = self.running_entry()
        return (row.get("host"), str(row.get("port"))) == (settings.get("host"), str(settings.get("port", "5432")))


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def _key(line: str) -> str:
    return line.split("=", 1)[0].strip()


def _find_entry(lines: list[str], database: str) -> tuple[int, str] | None:
    section = ""
    for i, raw in enumerate(lines):
        text = raw.strip()
        if not text or text[0] in "#;":
            continue
        if text.startswith("[") and text.endswith("]"):
            section = text[1:-1].strip().lower()
            continue
        if section == "databases" and "=" in text:
            key = _key(text)
            if key.startswith('"') and key.endswith('"'):
                key = key[1:-1].replace('""', '"')
            if key == database:
                return i, text.split("=", 1)[1]
    return None


def target_settings(target_dsn: str, given: str | None) -> dict[str, str]:
    """The entry's new connection settings: `given` (--pgbouncer-target), else the target DSN's
    host, port and dbname."""
    try:
        if given:
            return dict(psycopg2.extensions.parse_dsn(given))
        p = psycopg2.extensions.parse_dsn(target_dsn)
    except psycopg2.ProgrammingError as exc:
        raise UsageError(f"invalid --pgbouncer-target: {first_line(exc)}") from None
    return {k: p[k] for k in ("host", "port", "dbname") if k in p}

