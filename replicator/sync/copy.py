"""Copying table data: source `COPY TO` into target `COPY FROM`, by a C pump between the two
libpq connections (`_cpump.c`), or by two psql processes joined by a pipe where it is missing.

No byte of the data passes through Python: psycopg2's COPY calls back into Python once per row,
which on a 2-core machine cost as much as the copy itself. Big tables are split into `ctid` block
ranges (`block_ranges`). Progress comes from the target's `pg_stat_progress_copy`.
"""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg2
import psycopg2.errors

from decoder import Lsn
from sink import failpoints
from sink.state import SESSION, pgferry_session, quote_ident, readable_name

from ..errors import CopyError, PgferryError
from ..source import ThreadConnections, connect
from . import libpq
from .pgtools import find_client, libpq_env
from .progress import CopyModel, Estimate, Progress
from .progress_view import LogView, ProgressView

if TYPE_CHECKING:
    from .plan import SyncConfig, TableCopy

log = logging.getLogger("pgferry.sync")


FIRST_USER_OID = 16384  # built-in types below: their binary format and OID are the same on every server


class Column(NamedTuple):
    """A copied column, as the snapshot sees it."""

    name: str
    builtin: bool  # a built-in type: its binary format and OID are the same on every server
    relkind: str  # its table's ('p': a partitioned root)
    padded: bool  # char(n): see padded_columns


class CopyConnections(ThreadConnections):
    """The copy threads' connections, reused from table to table: per thread, source connections
    inside the exported snapshot (one per block range, each holding one open REPEATABLE READ
    transaction) and one target connection. Opening them per table (three target connections and one
    source connection each) cost more than copying a small table: 1,000 tables of 100 rows took
    14-16 s, now 4.4-4.6 s, about what `pg_dump | psql` takes (`python -m bench.copy --tables 1000`)."""

    def __init__(self, cfg: SyncConfig, snapshot: str, tables: list[str] | None = None, empty: bool = False) -> None:
        super().__init__()
        self.cfg, self.snapshot = cfg, snapshot
        self.tables = tables or []  # every table to copy (qualified): their columns are read at once
        self.empty = empty  # the target's tables are known to be empty (pre-data has just created them)
        self._columns: dict[str, list[Column]] = {}
        self.replica_role = False  # the target sessions run with session_replication_role = replica

    def columns(self, t: TableCopy, src: Any) -> list[Column]:
        """`t`'s copied columns, as the snapshot sees them. Read for every table in one query by the
        first thread that asks (one query per table was a round trip per table: 1,000 small tables)."""
        with self.lock:
            if t.qualified not in self._columns:
                names = self.tables if t.qualified in self.tables else [t.qualified]
                with src.cursor() as cur:
                    cur.execute("""SELECT n.name, a.attname, a.atttypid < %s, c.relkind,
                            a.atttypid = 'bpchar'::regtype AND a.atttypmod > 4
                        FROM unnest(%s::text[]) WITH ORDINALITY n(name, i)
                        JOIN pg_attribute a ON a.attrelid = n.name::regclass JOIN pg_class c ON c.oid = a.attrelid
                        WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                        ORDER BY n.i, a.attnum""", (FIRST_USER_OID, names))
                    rows = cur.fetchall()
                self._columns.update((name, []) for name in names)  # only once the query succeeded
                for name, *col in rows:
                    self._columns[name].append(Column(*col))
            return self._columns[t.qualified]

    def sources(self, n: int) -> list[Any]:
        """This thread's first `n` source connections (opened and put into the snapshot as needed)."""
        have: list[Any] = self.mine.__dict__.setdefault("sources", [])
        while len(have) < n:
            src = self.keep(connect(self.cfg.source, "source"))
            _set_up_session(src)
            src.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with src.cursor() as cur:
                cur.execute("SET TRANSACTION SNAPSHOT %s", (self.snapshot,))
            have.append(src)
        return have[:n]

    def renew(self, sources: list[Any]) -> None:
        """End the source transactions of a copied table and enter the snapshot again in new ones.
        A transaction holds its table locks to its end: kept open across tables, a copied table's
        lock blocks the application's `TRUNCATE a, b` (or `ALTER TABLE`) on it while that statement
        already holds a table this thread copies next, and the two wait for each other forever
        (client-side, so the server sees no deadlock)."""
        for src in sources:
            src.rollback()
            with src.cursor() as cur:
                cur.execute("SET TRANSACTION SNAPSHOT %s", (self.snapshot,))

    def target(self) -> Any:
        """This thread's target connection (named for the progress reporter)."""
        dst = self.mine.__dict__.get("target")
        if dst is None:
            dst = self.mine.target = self.keep(connect(self.cfg.target, "target"))
            _set_up_session(dst)
            self.replica_role = replica_role(dst)
            dst.cursor().execute("SET application_name = 'pgferry-copy'")
            dst.commit()
        return dst

    def reset_thread(self) -> None:
        """Close this thread's connections (after a failure: their state is unknown)."""
        mine = [*self.mine.__dict__.pop("sources", []), self.mine.__dict__.pop("target", None)]
        with self.lock:
            for conn in mine:
                if conn is not None:
                    conn.close()
                    self.opened.remove(conn)


def replica_role(conn: Any) -> bool:
    """Run this target session with session_replication_role = replica where the role may: a COPY
    fires the target's triggers and checks its foreign keys otherwise, as native table sync does
    not. (Where it may not, pgferry holds them back: replicator/sync/holdback.py.)"""
    conn.autocommit = True
    try:
        conn.cursor().execute("SET session_replication_role = replica")
        return True
    except psycopg2.errors.InsufficientPrivilege:
        return False
    finally:
        conn.autocommit = False


def _set_up_session(conn: Any) -> None:
    """A copy session runs one long COPY, and a spare source connection (kept for a later table's
    block ranges, or for a range not started yet) waits idle in its snapshot's transaction: the
    server's timeouts are off. A text COPY prints and reads dates, intervals and floats in the same
    portable formats on both sides; a table whose row-level security applies to the role fails its
    COPY instead of copying a part. (`state.SESSION`; preflight names such tables before anything
    starts.)"""
    conn.autocommit = True
    pgferry_session(conn.cursor())
    conn.autocommit = False


class CopyProgress:
    """Samples the copy for progress.py's model: finished tables, plus the target's
    pg_stat_progress_copy for the COPYs still running (the data never passes through Python, so
    this is where to look), twice a second; `view` (progress_view.py) shows what it finds."""

    def __init__(self, cfg: SyncConfig, estimates: dict[str, Estimate], view: ProgressView | None = None,
                 on_look: Callable[[Progress], None] | None = None) -> None:
        self.cfg = cfg
        self.model = CopyModel(estimates, time.monotonic())
        self.view: ProgressView = view or LogView(5.0)
        self.on_look = on_look or (lambda _: None)
        self.rows = 0
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def table_done(self, t: TableCopy) -> None:
        with self.lock:
            self.model.finish(t.display, t.rows)

    def part_done(self, rows: int) -> None:
        with self.lock:
            self.rows += rows

    def running(self, conn: Any) -> dict[str, tuple[int, int]]:
        """table -> (rows, bytes) of the COPYs in progress on the target."""
        return running_copies(conn)

    def start(self) -> CopyProgress:
        self._thread = threading.Thread(target=self._report, name="copy-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The copy has ended: a last look (100% when every table has finished), the view closed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def look(self, running: dict[str, tuple[int, int]]) -> Progress:
        with self.lock:
            p = self.model.observe(time.monotonic(), running)
        self.on_look(p)
        return p

    def _report(self) -> None:
        conn = None
        last: Progress | None = None
        try:
            conn = connect(self.cfg.target, "target")
            while not self._stop.wait(0.5):
                running = self.running(conn)
                if sum(r for r, _ in running.values()) > MID_COPY_ROWS:
                    failpoints.hit("mid_copy")
                last = self.look(running)
                self.view.show(last, time.monotonic())
        except (PgferryError, psycopg2.Error):
            pass  # no progress shown: the copy goes on (and says what failed, if it fails)
        finally:
            if conn is not None:
                conn.close()
            final = self.look({})
            self.view.close(final if final.finished else last)


def running_copies(conn: Any) -> dict[str, tuple[int, int]]:
    """schema.table -> (rows, bytes) of pgferry's COPYs running on the target (`conn`)."""
    with conn.cursor() as cur:
        found = read_running_copies(cur)
    conn.rollback()
    return found


def read_running_copies(cur: Any) -> dict[str, tuple[int, int]]:
    """The same on a cursor (in the caller's transaction)."""
    cur.execute("SELECT n.nspname, c.relname, sum(p.tuples_processed), sum(p.bytes_processed) "
                "FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
                "JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE a.application_name = 'pgferry-copy' GROUP BY 1, 2")
    return {readable_name(n, t): (int(r), int(b)) for n, t, r, b in cur.fetchall()}


MID_COPY_ROWS = 100_000  # the mid_copy failpoint fires once the running COPYs have passed this many rows


SPLIT_BYTES = 64 << 20  # tables above this are copied in block ranges (at least this big each)...
# ...but with the C pump only those above this. Its ranges all go into the one target COPY of the
# table, read one after the other unless the source is the slower side (_cpump.c, merge), so they
# only help a source that cannot keep up with one target backend (a slow disk, a long network
# path); and a range costs the source more than reading the whole table (a TID range scan of half
# a table took longer than the seq scan of all of it): one range made the whole initial sync about
# 7% faster on pgbench scale 10 and 20 (bench/HISTORY.md).
PUMP_SPLIT_BYTES = 1 << 30
FREEZE_MIN_BYTES = 8 << 20  # whole tables above this are truncated and written frozen (COPY FREEZE)
# Rows go to the target in CopyData messages of up to this size, not one message per row: less CPU
# on both the target backend and the pump (7% and 18% on pgbench_accounts); 8 kB to 256 kB alike.
PUMP_CHUNK = 1 << 16


BLOCK = 8192


def block_ranges(size: int, jobs: int, pump: bool) -> list[str]:
    """WHERE clauses that split a table of `size` bytes into up to `jobs` block ranges; [""] for
    one part (`pump`: for the C pump, see PUMP_SPLIT_BYTES; it merges at most PUMP_MAX_SOURCES).
    The last range is open-ended: the snapshot may see rows in blocks added since."""
    if pump and size < PUMP_SPLIT_BYTES:
        return [""]
    parts = min(jobs, libpq.PUMP_MAX_SOURCES if pump else jobs, size // SPLIT_BYTES)
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
        mark_copying(cfg, t, dst)
    finally:
        dst.close()


def mark_copying(cfg: SyncConfig, t: TableCopy, dst: Any) -> None:
    """For `status`: this table's copy has started (it stays 'copying' if the daemon dies mid-way;
    only 'copied' tables are kept on resume). Commits on `dst`."""
    dst.cursor().execute(f"UPDATE {quote_ident(cfg.schema)}.tables SET state = 'copying' WHERE slot_name = %s "
                         "AND schema_name = %s AND table_name = %s AND state <> 'copied'",
                         (cfg.slot, t.schema, t.name))
    dst.commit()


def mark_copied(cfg: SyncConfig, t: TableCopy, snapshot_lsn: Lsn) -> None:
    """A split table: all its parts are in (a whole table is marked in its own copy transaction)."""
    sql = (f"UPDATE {quote_ident(cfg.schema)}.tables SET state = 'copied', snapshot_lsn = %s::pg_lsn, rows = %s, "
           "bytes = %s, copied_at = now() WHERE slot_name = %s AND schema_name = %s AND table_name = %s")
    args = (str(snapshot_lsn), t.rows, t.bytes, cfg.slot, t.schema, t.name)
    dst = connect(cfg.target, "target")
    try:
        dst.cursor().execute(sql, args)
        dst.commit()
    finally:
        dst.close()
    log.info("copied %s: %d rows in parts", t.display, t.rows)


def padded_columns(cols: list[Column]) -> bytes:
    """The pump's `trim` flags for `cols` (from `CopyConnections.columns`): 1 for a `char(n)` column,
    whose values the pump sends without their trailing spaces; b"" when there is none.

    The target's `char(n)` input pads a value back to n, so it stores the same bytes (its column
    has the same type: pg_dump made it, or the --no-schema check compared `format_type`, typmod
    included). Sending the padding was the costliest part of the target's COPY: bpchar input counts
    the value's characters one by one, 22% of the target backend's CPU on pgbench_accounts, whose
    `filler char(84)` is all spaces and three quarters of the bytes (bench/README.md). Trimming in
    the source's query instead (`filler::text`) doubled the source's COPY time. `char` without a
    length keeps its spaces: nothing would put them back."""
    return bytes(c.padded for c in cols) if any(c.padded for c in cols) else b""


def copy_table(cfg: SyncConfig, t: TableCopy, conns: CopyConnections, snapshot_lsn: Lsn, progress: CopyProgress,
               wheres: list[str] | None = None, whole: bool = True) -> None:
    """Copy one table (or some block ranges of it, `wheres`) in the exported snapshot.

    `COPY (SELECT ...) TO STDOUT` on the source, in the snapshot, into `COPY ... FROM STDIN` on the
    target (binary when every column has a built-in type, text otherwise). No byte of the data
    passes through Python: psycopg2's COPY calls back into Python once per row, which on a 2-core
    machine cost as much as the copy itself. The C pump (`_cpump.c`) moves it without the GIL and
    reads several block ranges side by side (a source connection each) into ONE target COPY;
    without it, two psql processes joined by a pipe copy one range. A whole table is emptied, copied
    and marked copied in ONE target transaction (so its rows can be written frozen); a part only adds
    its rows (the caller empties the table first and marks it when all parts are in). The thread's
    connections (`conns`) are reused; after a failure they are closed and opened afresh.
    """
    started = time.monotonic()
    wheres = wheres or [""]
    pump = libpq.pump()
    if pump is None and len(wheres) > 1:
        raise ValueError("several block ranges in one copy need the C pump")
    try:
        dst = conns.target()
        if whole and (pump is None or t.bytes >= FREEZE_MIN_BYTES):  # a small one is copied in milliseconds
            mark_copying(cfg, t, dst)
        sources = conns.sources(len(wheres))
        cols = conns.columns(t, sources[0])
        names = ", ".join(quote_ident(c.name) for c in cols)
        binary = all(c.builtin for c in cols)
        plain = bool(cols) and cols[0].relkind == "r"  # not a partitioned root
        fmt = "(FORMAT binary)" if binary else ""
        only = "ONLY " if plain else ""
        # A whole plain table is truncated in the same transaction, so its rows can be written frozen:
        # the target then needs no anti-wraparound vacuum or hint-bit writes over the fresh data. Not
        # worth it for a small table (the C pump path): TRUNCATE makes new files, ~1 ms per table.
        freeze = whole and plain and (pump is None or t.bytes >= FREEZE_MIN_BYTES)
        into_fmt = f"({'FORMAT binary, ' if binary else ''}FREEZE)" if freeze else fmt
        copy_outs = []
        for where in wheres:
            query = f"SELECT {names} FROM {only}{t.qualified}" + (f" WHERE {where}" if where else "")
            # a whole plain table: the table form, which skips the executor's projection (~10% less source CPU)
            copy_outs.append(f"COPY {t.qualified} ({names}) TO STDOUT {fmt}" if plain and not where else
                             f"COPY ({query}) TO STDOUT {fmt}")
        copy_in = f"COPY {t.qualified} ({names}) FROM STDIN {into_fmt}"
        mark = (lambda rows: _copied_sql(cfg, t, snapshot_lsn, rows)) if whole else None
        if pump is not None:
            rows = _copy_in_process(pump, t, sources, dst, copy_outs, copy_in, mark, freeze, binary, conns.empty,
                                    padded_columns(cols))
        else:
            rows = _copy_with_psql(cfg, t, conns.snapshot, copy_outs[0], copy_in, mark(None) if mark else None,
                                   conns.replica_role)
            if mark is not None:  # psql committed the mark; the row count is known only now
                _record_rows(cfg, t, rows, dst)
        conns.renew(sources)
    except BaseException:
        conns.reset_thread()
        raise
    how = ("binary" if binary else "text") + (", psql" if pump is None else "")
    if len(wheres) > 1:
        how += f", {len(wheres)} block ranges"
    with progress.lock:
        t.rows += rows
    progress.part_done(rows)
    if whole:
        progress.table_done(t)
        log.info("copied %s: %d rows in %.1f s (%s)", t.display, t.rows, time.monotonic() - started, how)


def _copy_in_process(pump: Callable[..., tuple[int, Any]], t: TableCopy, sources: list[Any], dst: Any,
                     copy_outs: list[str], copy_in: str, mark: Callable[[int], str] | None, freeze: bool,
                     binary: bool, empty: bool, trim: bytes) -> int:
    """The C pump from `sources` (in the snapshot) into `dst`; for a whole table ONE target
    transaction empties it (TRUNCATE when `freeze` or when it has rows, unless it is known to be
    `empty`), copies, and marks it copied with its row count."""
    cur = dst.cursor()
    if mark is not None:
        truncate = freeze
        if not freeze and not empty:  # a table made by hand (--no-schema), or on resume
            cur.execute(f"SELECT EXISTS (SELECT FROM {t.qualified})")
            truncate = cur.fetchone()[0]
        if truncate:
            cur.execute(f"TRUNCATE {t.qualified}")
    rows, err = pump(tuple(s.pgconn_ptr for s in sources), dst.pgconn_ptr,
                     tuple(q.encode() for q in copy_outs), copy_in.encode(), binary, PUMP_CHUNK, trim)
    if err is not None:
        side, msg = err
        text = msg.decode(errors="replace").strip().splitlines()
        first = re.sub(r"^(ERROR|FATAL):\s+", "", text[0]) if text else "no message"
        raise CopyError(f"copying {t.display} failed on the {side}: {first}")
    if mark is not None:
        cur.execute(mark(int(rows)))
    dst.commit()
    return int(rows)


def _copy_with_psql(cfg: SyncConfig, t: TableCopy, snapshot: str, copy_out: str, copy_in: str,
                    mark: str | None, replica: bool = False) -> int:
    """The same through two psql processes joined by a pipe (no C pump). `replica`: the target
    session may set session_replication_role = replica (see `replica_role`)."""
    psql = find_client("psql")
    # the session settings' one result row must not join the COPY data on stdout
    settings = ["-c", r"\o /dev/null", "-c", SESSION, "-c", r"\o"]
    out_cmd = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", *settings,
               "-c", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
               "-c", f"SET TRANSACTION SNAPSHOT '{snapshot}'",
               "-c", copy_out]
    in_cmd = [psql, "-X", "-v", "ON_ERROR_STOP=1", "-1", *settings]
    if replica:
        in_cmd += ["-c", "SET session_replication_role = replica"]
    if mark is not None:
        in_cmd += ["-c", f"TRUNCATE {t.qualified}"]
    in_cmd += ["-c", copy_in]
    if mark is not None:
        in_cmd += ["-c", mark]
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
        raise CopyError(f"copying {t.display} failed: {err or 'psql exited with an error'}")
    m = re.search(rb"^COPY (\d+)", in_out, re.M)
    return int(m.group(1)) if m else 0


def _record_rows(cfg: SyncConfig, t: TableCopy, rows: int, dst: Any) -> None:
    """The row count psql reported (informational: the copied mark was committed with the rows)."""
    dst.cursor().execute(f"UPDATE {quote_ident(cfg.schema)}.tables SET rows = %s WHERE slot_name = %s AND "
                         "schema_name = %s AND table_name = %s", (rows, cfg.slot, t.schema, t.name))
    dst.commit()


def _copied_sql(cfg: SyncConfig, t: TableCopy, snapshot_lsn: Lsn, rows: int | None) -> str:
    """The statement that marks a whole table copied, in its copy's transaction (SQL text: the psql
    path runs it too). `rows`: the row count, when known before the commit."""
    counts = f", bytes = {int(t.bytes)}" + (f", rows = {int(rows)}" if rows is not None else "")
    return (f"UPDATE {quote_ident(cfg.schema)}.tables SET state = 'copied', snapshot_lsn = '{snapshot_lsn}', "
            f"copied_at = now(){counts} WHERE slot_name = {_literal(cfg.slot)} AND schema_name = "
            f"{_literal(t.schema)} AND table_name = {_literal(t.name)}")


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


def table_sizes(src: Any, tables: list[TableCopy]) -> dict[str, tuple[int, int, int | None]]:
    """schema.table -> (its heap size, heap and TOAST, its estimated rows) on the source
    (partitioned roots: the sums over their partitions). The heap sizes the block ranges; the data a
    table holds is both (a table of large values is mostly TOAST). The rows are `reltuples` scaled
    to the table's current size, as the planner estimates them (None: a table never analyzed):
    what the copy's progress counts against (progress.py). A table the source no longer has is left out."""
    with src.cursor() as cur:
        # pg_partition_tree() is empty for a plain table: the table itself, and its partitions.
        # A partitioned table holds no rows itself (its reltuples: -1 or the sum of its leaves').
        cur.execute("""SELECT s, t, sum(size), sum(size + toast),
                CASE WHEN bool_and(est IS NOT NULL) THEN sum(est) END
            FROM unnest(%s::text[], %s::text[]) AS x(s, t)
            CROSS JOIN LATERAL (SELECT to_regclass(format('%%I.%%I', s, t))) AS r(rel)
            CROSS JOIN LATERAL (SELECT r.rel UNION SELECT relid FROM pg_partition_tree(r.rel)) AS p(relid)
            JOIN pg_class c ON c.oid = p.relid
            CROSS JOIN LATERAL (SELECT pg_relation_size(c.oid) AS size,
                coalesce(pg_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast) AS z
            CROSS JOIN LATERAL (SELECT CASE WHEN c.relkind = 'p' THEN 0
                WHEN c.reltuples >= 0 AND c.relpages > 0
                    THEN c.reltuples / c.relpages * (size / current_setting('block_size')::int)
                WHEN c.reltuples >= 0 AND size = 0 THEN 0 END AS est) AS e
            GROUP BY 1, 2""",
                    ([t.schema for t in tables], [t.name for t in tables]))
        sizes = {readable_name(s, t): (int(heap), int(data), None if est is None else int(est))
                 for s, t, heap, data, est in cur.fetchall()}
    src.rollback()
    return sizes
