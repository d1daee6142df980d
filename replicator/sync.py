"""Initial sync: publication, slot with an exported snapshot, schema, parallel copy, handoff.

The copy and the stream meet at exactly one LSN per table:

* First run: the slot is created with `EXPORT_SNAPSHOT`; its consistent point C is recorded as the
  stream's start, and every table is copied in that snapshot, so the copy holds exactly the
  transactions that committed before C and the stream delivers exactly the ones after.
* Resume after a crash or stop during the copy: tables already marked `copied` keep their data
  (snapshot C). Each remaining table is emptied and copied again in a NEW snapshot, exported by a
  temporary slot at LSN S > C, and recorded with `snapshot_lsn = S`. The stream still starts at C;
  the sink skips changes to that table from transactions committing before S (the copy has them)
  and applies the rest. This is how PostgreSQL's own table sync works.

Each table is copied in ONE target transaction that also marks it `copied`, so a crash leaves it
either complete and marked, or untouched and re-copied.

Schema: `pg_dump --schema-only` (the newest pg_dump available: it dumps older servers correctly),
pre-data (tables, types, sequences...) before the copy and post-data (indexes, constraints,
triggers) after it, so the copy runs without index maintenance.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from decoder import Lsn
from sink import failpoints, state
from sink.state import quote_ident

from .errors import PgferryError, UsageError
from .source import check_logical_source, connect, describe_dsn

log = logging.getLogger("pgferry.sync")

FIRST_USER_OID = 16384  # built-in types below: their binary format and OID are the same on every server
COPY_CHUNK = 1 << 20


class SyncError(PgferryError):
    """The initial sync cannot go on (exit 1)."""


@dataclass
class SyncConfig:
    source: str
    target: str
    publication: str
    slot: str
    schema: str
    tables: list[str] | None = None  # --tables: publish only these (schema.table or table)
    jobs: int = max(1, min(4, os.cpu_count() or 1))
    schema_copy: bool = True  # False: --no-schema, the target's tables are made by hand


@dataclass
class TableCopy:
    schema: str
    name: str
    rows: int = 0
    bytes: int = 0

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


# -- tools ------------------------------------------------------------------------------------
@functools.cache
def find_pg_dump() -> str:
    """The newest pg_dump on this machine (PGFERRY_PG_DUMP overrides)."""
    override = os.environ.get("PGFERRY_PG_DUMP")
    if override:
        return override
    candidates = [shutil.which("pg_dump")]
    try:
        from .servers import embedded_bindir

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


def dump_schema(dsn: str, section: str, snapshot: str | None) -> str:
    """One pg_dump section as SQL that a plain connection can run (psql meta-commands removed)."""
    cmd = [find_pg_dump(), "--schema-only", f"--section={section}", "--no-owner", "--no-privileges",
           "--no-publications", "--no-subscriptions", "--no-comments"]
    if snapshot:
        cmd.insert(1, f"--snapshot={snapshot}")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=libpq_env(dsn))
    if res.returncode != 0:
        raise SyncError(f"pg_dump --section={section} of source {describe_dsn(dsn)} failed: "
                        f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    # pg_dump 17.6+/18 brackets its output with \restrict / \unrestrict (psql-only commands).
    return "\n".join(line for line in res.stdout.splitlines() if not line.startswith("\\"))


_SET_LINE = re.compile(r"^SET\s+([a-z_][a-z0-9_.]*)\s*=", re.I)


def drop_unknown_settings(sql: str, known: set[str]) -> str:
    """A newer pg_dump starts with SETs an older target does not have (pg_dump 18: transaction_timeout);
    drop those lines (they only tune the restoring session)."""
    out = []
    for line in sql.splitlines():
        m = _SET_LINE.match(line)
        if m and m.group(1).lower() not in known:
            continue
        out.append(line)
    return "\n".join(out)


# -- the orchestration -------------------------------------------------------------------------
class InitialSync:
    def __init__(self, cfg: SyncConfig) -> None:
        self.cfg = cfg
        self.target: Any = None
        self.snapshot_conn: Any = None  # a replication connection that keeps an exported snapshot alive

    def run(self) -> None:
        """Bring the target to a copied state. Returns when streaming may start (from the slot's
        consistent point, stored as the progress)."""
        cfg = self.cfg
        self.target = connect(cfg.target, "target")
        try:
            cur = self.target.cursor()
            state.ensure_schema(cur, cfg.schema)
            self.target.commit()
            row = self._sync_row()
            if row is None:
                if state.read_progress(cur, cfg.schema, cfg.slot) is not None:
                    self.target.rollback()
                    return  # streamed before without a copy (--no-copy): nothing to sync
                self._first_run()
            elif row["phase"] == "streaming":
                return
            else:
                log.info("resuming the initial sync of slot %s (phase %s)", cfg.slot, row["phase"])
                self._resume(row)
        finally:
            if self.snapshot_conn is not None:
                self.snapshot_conn.close()
            self.target.close()

    def _sync_row(self) -> dict[str, Any] | None:
        cur = self.target.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
        cur.execute(f"SELECT phase, consistent_lsn::text, pre_data_done, post_data_done "
                    f"FROM {quote_ident(self.cfg.schema)}.sync WHERE slot_name = %s", (self.cfg.slot,))
        row = cur.fetchone()
        self.target.rollback()
        return dict(row) if row else None

    # -- first run ---------------------------------------------------------------------------
    def _first_run(self) -> None:
        cfg = self.cfg
        src = connect(cfg.source, "source")
        try:
            check_logical_source(src, cfg.source, None)
            check_replicability(src, cfg)
            created_pub = ensure_publication(src, cfg)
            check_extensions(src, self.target, cfg)
            if not cfg.schema_copy:
                check_target_schema(src, self.target, cfg)
            exists = _slot_exists(src, cfg.slot)
        finally:
            src.close()
        if exists:
            raise SyncError(f"replication slot {cfg.slot!r} already exists on source {describe_dsn(cfg.source)} but "
                            "the target has no pgferry state for it: its changes since creation cannot be matched to "
                            "a copy. Drop it (SELECT pg_drop_replication_slot(...)) or pass another --slot")
        consistent, snapshot = self._export_snapshot(cfg.slot, temporary=False)
        cur = self.target.cursor()
        s = quote_ident(cfg.schema)
        cur.execute(f"INSERT INTO {s}.sync (slot_name, phase, consistent_lsn, publication_created, publication) "
                    "VALUES (%s, 'schema', %s::pg_lsn, %s, %s)",
                    (cfg.slot, str(consistent), created_pub, cfg.publication))
        state.init_progress(cur, cfg.schema, cfg.slot, consistent, True)
        self.target.commit()
        log.info("slot %s created at %s; copying in snapshot %s", cfg.slot, consistent, snapshot)
        self._schema_pre(snapshot)
        tables = self._register_tables()
        self._copy_all(tables, snapshot, consistent)
        self._finish(snapshot)

    # -- resume ------------------------------------------------------------------------------
    def _resume(self, row: dict[str, Any]) -> None:
        cfg = self.cfg
        src = connect(cfg.source, "source")
        try:
            if not _slot_exists(src, cfg.slot):
                raise SyncError(f"replication slot {cfg.slot!r} is gone from source {describe_dsn(cfg.source)}: the "
                                f"initial sync cannot resume. Drop the target's tables and its {cfg.schema!r} schema "
                                "and start again")
        finally:
            src.close()
        # A new snapshot for what is left, exported by a temporary slot (gone with its connection).
        consistent, snapshot = self._export_snapshot(f"{cfg.slot}_resync_{os.getpid()}", temporary=True)
        if not row["pre_data_done"]:
            self._schema_pre(snapshot)
        tables = self._register_tables()
        cur = self.target.cursor()
        cur.execute(f"SELECT schema_name, table_name FROM {quote_ident(cfg.schema)}.tables "
                    "WHERE slot_name = %s AND state = 'copied'", (cfg.slot,))
        done = set(cur.fetchall())
        self.target.rollback()
        todo = [t for t in tables if (t.schema, t.name) not in done]
        log.info("%d of %d tables already copied; copying %d in a new snapshot at %s", len(done), len(tables),
                 len(todo), consistent)
        self._copy_all(todo, snapshot, consistent)
        self._finish(snapshot)

    # -- steps -------------------------------------------------------------------------------
    def _export_snapshot(self, slot: str, temporary: bool) -> tuple[Lsn, str]:
        """Create a slot with an exported snapshot; the replication connection is kept open (and
        idle) until the copy is done, since the snapshot lives as long as it."""
        conn = connect(self.cfg.source, "source", connection_factory=psycopg2.extras.LogicalReplicationConnection)
        cur = conn.cursor()
        waiter = _report_waiting_transactions(self.cfg.source)
        try:
            cur.execute(f"CREATE_REPLICATION_SLOT {quote_ident(slot)}{' TEMPORARY' if temporary else ''} "
                        "LOGICAL pgoutput EXPORT_SNAPSHOT")
            _, consistent, snapshot, _ = cur.fetchone()
        except psycopg2.Error as exc:
            conn.close()
            raise SyncError(f"could not create replication slot {slot!r} on {describe_dsn(self.cfg.source)}: "
                            f"{str(exc).strip().splitlines()[0]}") from None
        finally:
            waiter.set()
        if self.snapshot_conn is not None:
            self.snapshot_conn.close()
        self.snapshot_conn = conn
        return Lsn.parse(consistent), snapshot

    def _schema_pre(self, snapshot: str) -> None:
        if not self.cfg.schema_copy:
            self._mark("pre_data_done = true, phase = 'copy'")
            return
        sql = dump_schema(self.cfg.source, "pre-data", snapshot)
        self._run_schema_sql(sql, "pre_data_done = true, phase = 'copy'", "tables, types and sequences")

    def _run_schema_sql(self, sql: str, mark: str, what: str) -> None:
        conn = connect(self.cfg.target, "target")
        try:
            cur = conn.cursor()
            # Index builds (post-data) sort whole tables: give them memory instead of temp files.
            cur.execute("SET maintenance_work_mem = '1GB'")
            cur.execute("SELECT name FROM pg_settings")
            sql = drop_unknown_settings(sql, {r[0] for r in cur.fetchall()})
            try:
                cur.execute(sql)
            except psycopg2.Error as exc:
                raise SyncError(f"creating the {what} on target {describe_dsn(self.cfg.target)} failed: "
                                f"{str(exc).strip().splitlines()[0]}. If the target already has them, pass "
                                "--no-schema") from None
            cur.execute(f"UPDATE {quote_ident(self.cfg.schema)}.sync SET {mark} WHERE slot_name = %s",
                        (self.cfg.slot,))
            conn.commit()
        finally:
            conn.close()
        log.info("schema: created the %s on the target", what)

    def _mark(self, assignments: str) -> None:
        cur = self.target.cursor()
        cur.execute(f"UPDATE {quote_ident(self.cfg.schema)}.sync SET {assignments} WHERE slot_name = %s",
                    (self.cfg.slot,))
        self.target.commit()

    def _register_tables(self) -> list[TableCopy]:
        src = connect(self.cfg.source, "source")
        try:
            with src.cursor() as cur:
                cur.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s "
                            "ORDER BY 1, 2", (self.cfg.publication,))
                tables = [TableCopy(n, t) for n, t in cur.fetchall()]
        finally:
            src.close()
        cur = self.target.cursor()
        for t in tables:
            cur.execute(f"INSERT INTO {quote_ident(self.cfg.schema)}.tables (slot_name, schema_name, table_name) "
                        "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (self.cfg.slot, t.schema, t.name))
        self.target.commit()
        return tables

    def _copy_all(self, tables: list[TableCopy], snapshot: str, snapshot_lsn: Lsn) -> None:
        """Copy the tables, `jobs` parts at a time. A big table is split into block ranges
        (`ctid` range scans) copied side by side, so one large table does not serialize the copy;
        it is emptied first and marked copied when its last part has committed."""
        if not tables:
            return
        started = time.monotonic()
        sizes = _table_sizes(self.cfg.source, tables)
        progress = _Progress(self.cfg, sum(sizes.values()), len(tables))
        ticker = threading.Event()
        threading.Thread(target=progress.report_every, args=(ticker, 5.0), daemon=True).start()
        parts: list[tuple[TableCopy, str]] = []
        split: dict[str, int] = {}
        for t in sorted(tables, key=lambda t: -sizes[t.display]):  # biggest first: shortest total time
            ranges = block_ranges(sizes[t.display], self.cfg.jobs)
            if len(ranges) > 1:
                truncate_target(self.cfg, t)
                split[t.display] = len(ranges)
            parts += [(t, where) for where in ranges]
        try:
            with ThreadPoolExecutor(max_workers=self.cfg.jobs, thread_name_prefix="copy") as pool:
                futures = {pool.submit(copy_table, self.cfg, t, snapshot, snapshot_lsn, progress, where,
                                       t.display not in split): t for t, where in parts}
                for f in as_completed(futures):
                    f.result()
                    t = futures[f]
                    if t.display in split:
                        split[t.display] -= 1
                        if split[t.display] == 0:
                            mark_copied(self.cfg, t, snapshot_lsn)
                            progress.table_done(t)
        finally:
            ticker.set()
        took = time.monotonic() - started
        size = sum(sizes.values())
        log.info("copy: %d tables, %d rows, %.1f MB of source tables in %.1f s (%.1f MB/s)", len(tables),
                 progress.rows, size / 1e6, took, size / 1e6 / max(took, 1e-6))

    def _finish(self, snapshot: str) -> None:
        copy_sequences(self.cfg.source, self.cfg.target)
        row = self._sync_row()
        if self.cfg.schema_copy and row is not None and not row["post_data_done"]:
            sql = dump_schema(self.cfg.source, "post-data", snapshot)
            self._run_schema_sql(sql, "post_data_done = true", "indexes, constraints and triggers")
        self._mark("phase = 'streaming', copied_at = now()")


# -- one table ------------------------------------------------------------------------------------
class _Progress:
    """Rows and bytes copied so far: finished parts plus the target's pg_stat_progress_copy for
    the COPYs still running (the data never passes through Python, so this is where to look)."""

    def __init__(self, cfg: SyncConfig, total_bytes: int, tables: int) -> None:
        self.cfg = cfg
        self.total_bytes, self.tables = total_bytes, tables
        self.rows = self.bytes = self.done = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def table_done(self, t: TableCopy) -> None:
        with self.lock:
            self.done += 1

    def part_done(self, rows: int, nbytes: int) -> None:
        with self.lock:
            self.rows += rows
            self.bytes += nbytes

    def running(self, conn: Any) -> tuple[int, int]:
        """(rows, bytes) of the COPYs in progress on the target."""
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(sum(p.tuples_processed), 0), coalesce(sum(p.bytes_processed), 0) "
                        "FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
                        "WHERE a.application_name = 'pgferry-copy'")
            rows, nbytes = cur.fetchone()
        conn.rollback()
        return int(rows), int(nbytes)

    def report_every(self, stop: threading.Event, seconds: float) -> None:
        """Log progress every `seconds`; look at the running COPYs twice a second."""
        try:
            conn = connect(self.cfg.target, "target")
        except PgferryError:
            return
        last = time.monotonic()
        try:
            while not stop.wait(0.5):
                rows, nbytes = self.running(conn)
                if rows > MID_COPY_ROWS:
                    failpoints.hit("mid_copy")
                if time.monotonic() - last < seconds:
                    continue
                last = time.monotonic()
                nbytes += self.bytes
                took = last - self.started
                rate = nbytes / max(took, 1e-6)
                left = max(self.total_bytes - nbytes, 0)
                eta = f"{left / rate:.0f} s" if rate > 0 else "?"
                log.info("copy: %d/%d tables, %d rows, %.1f of ~%.1f MB, %.1f MB/s, ETA %s", self.done,
                         self.tables, self.rows + rows, nbytes / 1e6, self.total_bytes / 1e6, rate / 1e6, eta)
        except psycopg2.Error:
            return
        finally:
            conn.close()


MID_COPY_ROWS = 100_000  # the mid_copy failpoint fires once the running COPYs have passed this many rows


SPLIT_BYTES = 64 << 20  # tables above this are copied in block ranges, side by side
BLOCK = 8192


def block_ranges(size: int, jobs: int) -> list[str]:
    """WHERE clauses that split a table of `size` bytes into up to `jobs` block ranges; [""] for
    one part. The last range is open-ended: the snapshot may see rows in blocks added since."""
    parts = min(jobs, size // SPLIT_BYTES)
    if parts < 2:
        return [""]
    step = max(1, size // BLOCK // parts)
    bounds = [i * step for i in range(1, parts)]
    out = [f"ctid < '({bounds[0]},0)'::tid"]
    out += [f"ctid >= '({a},0)'::tid AND ctid < '({b},0)'::tid" for a, b in itertools.pairwise(bounds)]
    out.append(f"ctid >= '({bounds[-1]},0)'::tid")
    return out


def truncate_target(cfg: SyncConfig, t: TableCopy) -> None:
    dst = connect(cfg.target, "target")
    try:
        dst.cursor().execute(f"TRUNCATE {t.qualified}")
        dst.commit()
    finally:
        dst.close()


def mark_copied(cfg: SyncConfig, t: TableCopy, snapshot_lsn: Lsn, cur: Any = None) -> None:
    sql = (f"UPDATE {quote_ident(cfg.schema)}.tables SET state = 'copied', snapshot_lsn = %s::pg_lsn, rows = %s, "
           "bytes = %s, copied_at = now() WHERE slot_name = %s AND schema_name = %s AND table_name = %s")
    args = (str(snapshot_lsn), t.rows, t.bytes, cfg.slot, t.schema, t.name)
    if cur is not None:
        cur.execute(sql, args)
        return
    dst = connect(cfg.target, "target")
    try:
        dst.cursor().execute(sql, args)
        dst.commit()
    finally:
        dst.close()
    log.info("copied %s: %d rows, %.1f MB in parts", t.display, t.rows, t.bytes / 1e6)


def copy_table(cfg: SyncConfig, t: TableCopy, snapshot: str, snapshot_lsn: Lsn, progress: _Progress,
               where: str = "", whole: bool = True) -> None:
    """Copy one table (or one block range of it, `where`) in the exported snapshot.

    Two psql processes joined by a pipe: `COPY (SELECT ...) TO STDOUT` on the source, in the
    snapshot, into `COPY ... FROM STDIN` on the target (binary when every column has a built-in
    type, text otherwise). No byte of the data passes through Python: psycopg2's COPY calls back
    into Python once per row, which on a 2-core machine cost as much as the copy itself. A whole
    table is emptied, copied and marked copied in ONE target transaction (`psql -1`); a part only
    adds its rows (the caller empties the table first and marks it when all parts are in).
    """
    started = time.monotonic()
    src = connect(cfg.source, "source")
    try:
        with src.cursor() as scur:
            scur.execute("""SELECT a.attname, a.atttypid < %s, c.relkind FROM pg_attribute a JOIN pg_class c
                ON c.oid = a.attrelid WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = '' ORDER BY a.attnum""", (FIRST_USER_OID, t.qualified))
            cols = scur.fetchall()
    finally:
        src.close()
    names = ", ".join(quote_ident(c[0]) for c in cols)
    binary = all(c[1] for c in cols)
    fmt = "(FORMAT binary)" if binary else ""
    only = "ONLY " if cols and cols[0][2] == "r" else ""
    query = f"SELECT {names} FROM {only}{t.qualified}" + (f" WHERE {where}" if where else "")
    psql = find_client("psql")
    out_cmd = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1",
               "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
               "-c", f"SET TRANSACTION SNAPSHOT '{snapshot}'",
               "-c", f"COPY ({query}) TO STDOUT {fmt}"]
    in_cmd = [psql, "-X", "-v", "ON_ERROR_STOP=1", "-1"]
    if whole:
        in_cmd += ["-c", f"TRUNCATE {t.qualified}"]
    in_cmd += ["-c", f"COPY {t.qualified} ({names}) FROM STDIN {fmt}"]
    if whole:
        in_cmd += ["-c", f"UPDATE {quote_ident(cfg.schema)}.tables SET state = 'copied', "
                         f"snapshot_lsn = '{snapshot_lsn}', "
                         f"copied_at = now() WHERE slot_name = {_literal(cfg.slot)} AND "
                         f"schema_name = {_literal(t.schema)} AND table_name = {_literal(t.name)}"]
    out = subprocess.Popen(out_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=libpq_env(cfg.source),
                           preexec_fn=_die_with_parent)
    into = subprocess.Popen(in_cmd, stdin=out.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=libpq_env(cfg.target, "pgferry-copy"), preexec_fn=_die_with_parent)
    assert out.stdout is not None
    out.stdout.close()  # the target psql holds the read end now
    in_out, in_err = into.communicate()
    out_err = out.stderr.read() if out.stderr else b""
    out.wait()
    if out.returncode != 0 or into.returncode != 0:
        err = (out_err if out.returncode != 0 else in_err).decode(errors="replace").strip()
        raise SyncError(f"copying {t.display} failed: {err or 'psql exited with an error'}")
    m = re.search(rb"^COPY (\d+)", in_out, re.M)
    rows = int(m.group(1)) if m else 0
    with progress.lock:
        t.rows += rows
    progress.part_done(rows, 0)
    if whole:
        _record_rows(cfg, t)
        progress.table_done(t)
        log.info("copied %s: %d rows in %.1f s (%s)", t.display, t.rows, time.monotonic() - started,
                 "binary" if binary else "text")


def _record_rows(cfg: SyncConfig, t: TableCopy) -> None:
    """The row count psql reported (informational: the copied mark was committed with the rows)."""
    dst = connect(cfg.target, "target")
    try:
        dst.cursor().execute(f"UPDATE {quote_ident(cfg.schema)}.tables SET rows = %s WHERE slot_name = %s AND "
                             "schema_name = %s AND table_name = %s", (t.rows, cfg.slot, t.schema, t.name))
        dst.commit()
    finally:
        dst.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _die_with_parent() -> None:
    """Children of the daemon die with it (kill -9 included), so no copy commits after it is gone."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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


# -- helpers --------------------------------------------------------------------------------------
def ensure_publication(src: psycopg2.extensions.connection, cfg: SyncConfig) -> bool:
    """Create the publication unless it exists. Returns True when pgferry created it."""
    with src.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (cfg.publication,))
        if cur.fetchone():
            return False
        what = "FOR ALL TABLES"
        if cfg.tables:
            what = "FOR TABLE " + ", ".join(".".join(quote_ident(p) for p in t.split(".", 1)) for t in cfg.tables)
        try:
            cur.execute(f"CREATE PUBLICATION {quote_ident(cfg.publication)} {what}")
        except psycopg2.Error as exc:
            src.rollback()
            raise SyncError(f"could not create publication {cfg.publication!r} on {describe_dsn(cfg.source)}: "
                            f"{str(exc).strip().splitlines()[0]}. Create it as a superuser: CREATE PUBLICATION "
                            f"{cfg.publication} {what}") from None
    src.commit()
    log.info("created publication %s %s", cfg.publication, what)
    return True


_COLUMNS = """SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"""


def check_replicability(src: Any, cfg: SyncConfig) -> None:
    """What logical replication cannot carry, said before anything starts: unlogged tables and large
    objects (warnings with the fix), and tables without a replica identity. Publishing such a table
    makes every UPDATE and DELETE on it FAIL on the source, so that is an error when the source has
    updated or deleted rows in it, and a warning otherwise (insert-only tables are fine)."""
    with src.cursor() as cur:
        cur.execute("""SELECT n.nspname || '.' || c.relname, c.relpersistence = 'u',
                c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (
                    SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)),
                coalesce(s.n_tup_upd + s.n_tup_del, 0) > 0
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
            WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
              AND (%s::text[] IS NULL OR n.nspname || '.' || c.relname = ANY(%s::text[])
                   OR c.relname = ANY(%s::text[]))
            ORDER BY 1""", (cfg.tables, cfg.tables, cfg.tables))
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        (large_objects,) = cur.fetchone()
    src.rollback()
    unlogged = [r[0] for r in rows if r[1]]
    if unlogged:
        log.warning("unlogged tables are not replicated: %s. Copy them by hand at cutover, or make them logged "
                    "first (ALTER TABLE ... SET LOGGED)", ", ".join(unlogged))
    if large_objects:
        log.warning("the source has %d large objects; logical replication does not carry them. Copy them at "
                    "cutover (pg_dump --large-objects --data-only)", large_objects)
    no_identity = [(r[0], r[3]) for r in rows if r[2] and not r[1]]
    quiet = [name for name, changed in no_identity if not changed]
    if quiet:
        log.warning("tables without a primary key or replica identity: %s. They seem insert-only; an UPDATE or "
                    "DELETE on them would fail on the source once published (fix: ALTER TABLE <table> REPLICA "
                    "IDENTITY FULL)", ", ".join(quiet))
    written = [name for name, changed in no_identity if changed]
    if written:
        raise SyncError("tables without a primary key or replica identity that receive UPDATE or DELETE: "
                        f"{', '.join(written)}. Once published, those statements would fail on the source. Add a "
                        "primary key, or run ALTER TABLE <table> REPLICA IDENTITY FULL (or USING INDEX <unique "
                        "index>), then start again")


def check_target_schema(src: Any, target: Any, cfg: SyncConfig) -> None:
    """--no-schema: the target's tables were made by hand. Every published table and column must be
    there; all differences are reported at once, before anything is created or copied."""
    with src.cursor() as cur:
        cur.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2",
                    (cfg.publication,))
        tables = cur.fetchall()
        cur.execute(_COLUMNS, ([t[0] for t in tables], [t[1] for t in tables]))
        source = cur.fetchall()
    src.rollback()
    cur = target.cursor()
    cur.execute(_COLUMNS, ([t[0] for t in tables], [t[1] for t in tables]))
    on_target = {(n, t, a): typ for n, t, a, typ in cur.fetchall()}
    target.rollback()
    present = {(n, t) for n, t, _ in on_target}
    problems = [f"table {n}.{t} is missing" for n, t in tables if (n, t) not in present]
    for n, t, a, typ in source:
        if (n, t) not in present:
            continue
        other = on_target.get((n, t, a))
        if other is None:
            problems.append(f"{n}.{t}: column {a} ({typ}) is missing")
        elif other != typ:
            problems.append(f"{n}.{t}: column {a} is {other} on the target but {typ} on the source")
    if problems:
        raise SyncError(f"--no-schema: the target {describe_dsn(cfg.target)} does not match the source's published "
                        f"tables ({len(problems)} problem(s)): " + "; ".join(problems) +
                        ". Fix the target's tables (or drop --no-schema to let pgferry create them)")


def check_extensions(src: Any, target: Any, cfg: SyncConfig) -> None:
    """Extensions the source uses that the target cannot install: reported before anything starts."""
    if not cfg.schema_copy:
        return
    with src.cursor() as cur:
        cur.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'")
        used = {r[0] for r in cur.fetchall()}
    src.rollback()
    cur = target.cursor()
    cur.execute("SELECT name FROM pg_available_extensions")
    available = {r[0] for r in cur.fetchall()}
    target.rollback()
    missing = sorted(used - available)
    if missing:
        raise SyncError(f"the source uses extension(s) {', '.join(missing)} that the target "
                        f"{describe_dsn(cfg.target)} cannot install: install them on the target server first")


def copy_sequences(source: str, target: str) -> list[tuple[str, int]]:
    """Every sequence's current value onto the target (identity, serial and standalone)."""
    src = connect(source, "source")
    dst = connect(target, "target")
    out = []
    try:
        with src.cursor() as cur:
            cur.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences "
                        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND last_value IS NOT NULL")
            rows = cur.fetchall()
        dcur = dst.cursor()
        for schema, name, value in rows:
            qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
            dcur.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified,))
            if dcur.fetchone()[0]:
                dcur.execute("SELECT setval(%s, %s, true)", (qualified, value))
                out.append((f"{schema}.{name}", int(value)))
        dst.commit()
    finally:
        src.close()
        dst.close()
    log.info("sequences: %d values copied", len(out))
    return out


def _slot_exists(src: Any, slot: str) -> bool:
    with src.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        found = cur.fetchone() is not None
    src.rollback()
    return found


def _table_sizes(dsn: str, tables: list[TableCopy]) -> dict[str, int]:
    """schema.table -> its heap size on the source (partitioned roots: the sum of their partitions)."""
    src = connect(dsn, "source")
    try:
        with src.cursor() as cur:
            # pg_partition_tree() is empty for a plain table
            cur.execute("""SELECT s || '.' || t, greatest(pg_relation_size(format('%%I.%%I', s, t)::regclass),
                    coalesce((SELECT sum(pg_relation_size(p.relid))
                              FROM pg_partition_tree(format('%%I.%%I', s, t)::regclass) p), 0))
                FROM unnest(%s::text[], %s::text[]) AS x(s, t)""",
                        ([t.schema for t in tables], [t.name for t in tables]))
            return {name: int(size) for name, size in cur.fetchall()}
    finally:
        src.close()


def _report_waiting_transactions(dsn: str) -> threading.Event:
    """While a slot is being created the source must finish the transactions already running; say
    which ones after a couple of seconds, then every 10 s."""
    done = threading.Event()

    def watch() -> None:
        if done.wait(2.0):
            return
        try:
            conn = connect(dsn, "source")
        except PgferryError:
            return
        try:
            while not done.is_set():
                with conn.cursor() as cur:
                    cur.execute("""SELECT pid, now() - xact_start, query_start, left(query, 60) FROM pg_stat_activity
                        WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
                        ORDER BY xact_start""")
                    rows = cur.fetchall()
                conn.rollback()
                for pid, age, qstart, query in rows:
                    log.warning("waiting for the slot to become consistent: transaction of pid %s open for %s "
                                "(query started %s: %s)", pid, age, qstart, query)
                if done.wait(10.0):
                    return
        finally:
            conn.close()

    threading.Thread(target=watch, daemon=True).start()
    return done
