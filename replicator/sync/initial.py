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
triggers) after it, so the copy runs without index maintenance; post-data runs `jobs` tables at a
time and resumes per table (replicator/sync/postdata.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from decoder import Lsn
from sink import failpoints, state
from sink.state import quote_ident, readable_name

from ..errors import PgferryError, SyncError, first_line
from ..source import (
    check_logical_source,
    completed_or_cancel,
    connect,
    describe_dsn,
    published_tables,
    table_spec_sql,
)
from . import holdback, libpq
from .checks import check_extensions, check_replicability, check_target_schema
from .copy import CopyConnections, CopyProgress, block_ranges, copy_table, mark_copied, table_sizes, truncate_target
from .pgtools import drop_unknown_settings
from .plan import SyncConfig, TableCopy
from .postdata import PostDataRun
from .progress import Estimate, Progress
from .progress_view import BarsView, LogView
from .schema import SchemaDump
from .sequences import copy_sequences

log = logging.getLogger("pgferry.sync")


NO_LSN = Lsn(0)  # sync.consistent_lsn before the slot exists


# -- the orchestration -------------------------------------------------------------------------
class InitialSync:
    def __init__(self, cfg: SyncConfig, on_phase: Callable[[str], None] | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.cfg = cfg
        self.on_phase = on_phase or (lambda _: None)  # "schema", then "copy" (the metrics' pgferry_phase)
        self.on_progress = on_progress  # each look at the copy's progress (the metrics' pgferry_copy_*)
        self.target: Any = None
        self.snapshot_conn: Any = None  # a replication connection that keeps an exported snapshot alive
        self.tables_created = False  # pre-data created the tables in this run (so they are empty)

    def run(self) -> None:
        """Bring the target to a copied state. Returns when streaming may start (from the slot's
        consistent point, stored as the progress)."""
        cfg = self.cfg
        self.target = connect(cfg.target, "target")
        try:
            cur = self.target.cursor()
            try:
                state.ensure_schema(cur, cfg.schema)
            except psycopg2.errors.InsufficientPrivilege as exc:
                raise SyncError(f"target {describe_dsn(cfg.target)}: {first_line(exc)}: pgferry "
                                f"needs CREATE on the target database for its {cfg.schema!r} state schema and the "
                                f"tables (GRANT CREATE ON DATABASE ... TO the target role)") from None
            self.target.commit()
            row = self._sync_row()
            if row is None:
                if state.read_progress(cur, cfg.schema, cfg.slot) is not None:
                    self.target.rollback()
                    return  # streamed before without a copy (--no-copy): nothing to sync
                self._first_run(None)
            elif row["consistent_lsn"] == str(NO_LSN):
                log.info("the last start stopped while creating slot %s: starting the sync over", cfg.slot)
                self._first_run(row)
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
        cur.execute(f"SELECT phase, consistent_lsn::text, pre_data_done, post_data_done, publication_created "
                    f"FROM {quote_ident(self.cfg.schema)}.sync WHERE slot_name = %s", (self.cfg.slot,))
        row = cur.fetchone()
        self.target.rollback()
        return dict(row) if row else None

    # -- first run ---------------------------------------------------------------------------
    def _first_run(self, pending: dict[str, Any] | None) -> None:
        """Publication, slot, schema, copy. `pending`: the sync row of a start that died between
        recording its intent and recording the slot's consistent point (the slot, if it exists,
        was made by that start and is dropped: nothing has been copied from its snapshot)."""
        cfg = self.cfg
        src = connect(cfg.source, "source")
        try:
            check_logical_source(src, cfg.source, None)
            check_replicability(src, cfg)
            created_pub = ensure_publication(src, cfg) or bool(pending and pending["publication_created"])
            check_extensions(src, self.target, cfg)
            if not cfg.schema_copy:
                check_target_schema(src, self.target, cfg)
            if cfg.hold_back:  # tables made by hand: before the copy, which would fire them too
                holdback.hold_existing(cfg.target, cfg.schema, cfg.slot,
                                       holdback.migrated_tables(src, cfg.publication, cfg.tables))
            exists = _slot_exists(src, cfg.slot)
            if exists and pending is not None:
                _drop_stale_slot(src, cfg.slot)
        finally:
            src.close()
        if exists and pending is None:
            raise SyncError(f"replication slot {cfg.slot!r} already exists on source {describe_dsn(cfg.source)} but "
                            "the target has no pgferry state for it: its changes since creation cannot be matched to "
                            "a copy. Drop it (SELECT pg_drop_replication_slot(...)) or pass another --slot")
        cur = self.target.cursor()
        s = quote_ident(cfg.schema)
        # The intent is committed before the slot exists, so a crash in between is recognised on
        # the next start (consistent_lsn still 0/0) instead of leaving an unexplained slot behind.
        cur.execute(f"INSERT INTO {s}.sync (slot_name, phase, consistent_lsn, publication_created, publication) "
                    "VALUES (%s, 'schema', %s::pg_lsn, %s, %s) ON CONFLICT (slot_name) DO UPDATE SET "
                    "publication_created = EXCLUDED.publication_created",
                    (cfg.slot, str(NO_LSN), created_pub, cfg.publication))
        # post-data groups recorded by an earlier sync of this slot name are not this one's
        cur.execute(f"DELETE FROM {s}.post_data WHERE slot_name = %s", (cfg.slot,))
        self.target.commit()
        consistent, snapshot = self._export_snapshot(cfg.slot, temporary=False)
        failpoints.hit("after_slot_created")
        cur.execute(f"UPDATE {s}.sync SET consistent_lsn = %s::pg_lsn WHERE slot_name = %s",
                    (str(consistent), cfg.slot))
        state.init_progress(cur, cfg.schema, cfg.slot, consistent, True)
        self.target.commit()
        log.info("slot %s created at %s; copying in snapshot %s", cfg.slot, consistent, snapshot)
        schema = SchemaDump(cfg.source, snapshot, cfg.schema) if cfg.schema_copy else None
        tables = self._register_tables(snapshot)  # while pg_dump runs
        self._schema_pre(schema)
        with self._post_data(schema, False) as post:
            self._copy_all(tables, snapshot, consistent, post)
            self._finish(post)

    # -- resume ------------------------------------------------------------------------------
    def _resume(self, row: dict[str, Any]) -> None:
        cfg = self.cfg
        src = connect(cfg.source, "source")
        try:
            if not _slot_exists(src, cfg.slot):
                raise SyncError(f"replication slot {cfg.slot!r} is gone from source {describe_dsn(cfg.source)}: the "
                                f"initial sync cannot resume. Drop the target's tables and its {cfg.schema!r} schema "
                                "and start again")
            if cfg.hold_back:
                holdback.hold_existing(cfg.target, cfg.schema, cfg.slot,
                                       holdback.migrated_tables(src, cfg.publication, cfg.tables))
        finally:
            src.close()
        # A new snapshot for what is left, exported by a temporary slot (gone with its connection).
        consistent, snapshot = self._export_snapshot(f"{cfg.slot}_resync_{os.getpid()}", temporary=True)
        schema = None
        if cfg.schema_copy and not (row["pre_data_done"] and row["post_data_done"]):
            schema = SchemaDump(cfg.source, snapshot, cfg.schema)
        tables = self._register_tables(snapshot)
        if not row["pre_data_done"]:
            self._schema_pre(schema)
        cur = self.target.cursor()
        cur.execute(f"SELECT schema_name, table_name FROM {quote_ident(cfg.schema)}.tables "
                    "WHERE slot_name = %s AND state = 'copied'", (cfg.slot,))
        done = set(cur.fetchall())
        self.target.rollback()
        todo = [t for t in tables if (t.schema, t.name) not in done]
        log.info("%d of %d tables already copied; copying %d in a new snapshot at %s", len(done), len(tables),
                 len(todo), consistent)
        with self._post_data(schema, row["post_data_done"]) as post:
            self._copy_all(todo, snapshot, consistent, post)
            self._finish(post)

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
                            f"{first_line(exc)}") from None
        finally:
            waiter.set()
        if self.snapshot_conn is not None:
            self.snapshot_conn.close()
        self.snapshot_conn = conn
        return Lsn.parse(consistent), snapshot

    def _schema_pre(self, schema: SchemaDump | None) -> None:
        if schema is None:  # --no-schema
            self._mark("pre_data_done = true, phase = 'copy'")
            self.on_phase("copy")
            return
        self.on_phase("schema")
        self._run_schema_sql(schema.section("pre-data"), "pre_data_done = true, phase = 'copy'",
                             "tables, types and sequences")
        self.tables_created = True  # by pg_dump's CREATE TABLEs just now: empty
        self.on_phase("copy")

    def _run_schema_sql(self, sql: str, mark: str, what: str) -> None:
        conn = connect(self.cfg.target, "target")
        try:
            cur = conn.cursor()
            sql = drop_unknown_settings(cur, sql)
            try:
                cur.execute(sql)
            except psycopg2.Error as exc:
                raise SyncError(f"creating the {what} on target {describe_dsn(self.cfg.target)} failed: "
                                f"{first_line(exc)}. If the target already has them, pass "
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

    def _register_tables(self, snapshot: str) -> list[TableCopy]:
        """The published tables that exist in the copy's `snapshot`, with their sizes on the
        source, recorded in `<state>.tables`. A table created after the snapshot is not copied:
        its creation and every row of it come through the stream."""
        src = connect(self.cfg.source, "source")
        try:
            src.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with src.cursor() as cur:
                cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
                # (the publication's listing reads the newest catalog; a plain query, the snapshot's)
                cur.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace")
                visible = set(cur.fetchall())
            tables = [TableCopy(n, t) for n, t in published_tables(src, self.cfg.publication) if (n, t) in visible]
            sizes = table_sizes(src, tables)
        finally:
            src.close()
        for t in tables:
            t.bytes, t.data_bytes, t.rows_estimate = sizes.get(t.display, (0, 0, None))
        cur = self.target.cursor()  # one statement: a row per table was a round trip per table
        s = quote_ident(self.cfg.schema)
        names = ([t.schema for t in tables], [t.name for t in tables])
        cur.execute(f"INSERT INTO {s}.tables (slot_name, schema_name, table_name) "
                    "SELECT %s, s, t FROM unnest(%s::text[], %s::text[]) AS x(s, t) ON CONFLICT DO NOTHING",
                    (self.cfg.slot, *names))
        # resuming: a table not copied yet that is no longer published (dropped from the source or
        # the publication since) is not pending any more
        cur.execute(f"DELETE FROM {s}.tables WHERE slot_name = %s AND state <> 'copied' AND (schema_name, table_name) "
                    "NOT IN (SELECT * FROM unnest(%s::text[], %s::text[])) RETURNING schema_name, table_name",
                    (self.cfg.slot, *names))
        gone = [readable_name(n, t) for n, t in cur.fetchall()]
        if gone:
            log.info("no longer published, so not copied: %s", ", ".join(gone))
        self.target.commit()
        return tables

    def _post_data(self, schema: SchemaDump | None, done: bool,
                   ) -> contextlib.AbstractContextManager[PostDataRun | None]:
        """The post-data run, started beside the copy (None: --no-schema, or `done` before)."""
        if schema is None or done:
            return contextlib.nullcontext()
        return PostDataRun(self.cfg.target, self.cfg.schema, self.cfg.slot, lambda: schema.section("post-data"),
                           self.cfg.jobs, hold=self.cfg.hold_back)

    def _copy_all(self, tables: list[TableCopy], snapshot: str, snapshot_lsn: Lsn,
                  post: PostDataRun | None) -> None:
        """Copy the tables, `jobs` at a time. A big table is split into block ranges (`ctid` range
        scans) read side by side, so one large table does not serialize the reading: with the C
        pump into one target COPY (one transaction, rows frozen); with psql each range into its own
        transaction (the table is emptied first and marked copied when its last part has committed)."""
        if not tables:
            return
        self._mark("copy_started_at = now()")
        started = time.monotonic()
        sizes = {t.display: t.data_bytes for t in tables}  # what the COPYs move: TOAST too
        progress = CopyProgress(self.cfg, {t.display: Estimate(t.data_bytes, t.rows_estimate) for t in tables},
                                BarsView() if self.cfg.progress_bars else LogView(self.cfg.progress_seconds),
                                self.on_progress).start()
        parts: list[tuple[TableCopy, list[str]]] = []
        split: dict[str, int] = {}
        merged = libpq.pump() is not None  # the C pump reads all ranges of a table into one target COPY
        for t in sorted(tables, key=lambda t: -t.data_bytes):  # biggest first: shortest total time
            ranges = block_ranges(t.bytes, self.cfg.jobs, merged)
            if merged:
                parts.append((t, ranges))
                continue
            if len(ranges) > 1:  # psql: one range per process pair, each its own target transaction
                truncate_target(self.cfg, t)
                split[t.display] = len(ranges)
            parts += [(t, [where]) for where in ranges]
        conns = CopyConnections(self.cfg, snapshot, [t.qualified for t in tables], self.tables_created)
        try:
            with ThreadPoolExecutor(max_workers=self.cfg.jobs, thread_name_prefix="copy") as pool:
                for level in self._fk_levels(parts):
                    futures = {pool.submit(copy_table, self.cfg, t, conns, snapshot_lsn, progress, wheres,
                                           t.display not in split): t for t, wheres in level}
                    for f in completed_or_cancel(futures):
                        t = futures[f]
                        if t.display in split:
                            split[t.display] -= 1
                            if split[t.display] > 0:
                                continue
                            mark_copied(self.cfg, t, snapshot_lsn)
                            progress.table_done(t)
                        if post is not None:  # its indexes build beside the copy of the others
                            post.table_copied(t.schema, t.name, t.bytes)
        finally:
            progress.stop()
            conns.close()
        took = time.monotonic() - started
        size = sum(sizes.values())
        log.info("copy: %d tables, %d rows, %.1f MB of source tables in %.1f s (%.1f MB/s)", len(tables),
                 progress.rows, size / 1e6, took, size / 1e6 / max(took, 1e-6))

    def _fk_levels(self, parts: list[tuple[TableCopy, list[str]]]) -> list[list[tuple[TableCopy, list[str]]]]:
        """`parts` in the order the target's foreign keys need: a table after the tables it
        references. Only where the copy checks them (a --no-schema target kept with its foreign
        keys, whose role may not set the replica role); else all at once."""
        if holdback.replica_role_allowed(self.target):
            return [parts]
        cur = self.target.cursor()
        cur.execute("""SELECT DISTINCT cn.nspname, c.relname, pn.nspname, p.relname FROM pg_constraint co
            JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
            JOIN pg_class p ON p.oid = co.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
            WHERE co.contype = 'f' AND co.conrelid <> co.confrelid""")
        needs: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for cs, cn, ps, pn in cur.fetchall():
            needs.setdefault((cs, cn), set()).add((ps, pn))
        self.target.rollback()
        todo = {(t.schema, t.name) for t, _ in parts}
        levels = []
        while parts:
            ready = [p for p in parts if not (needs.get((p[0].schema, p[0].name), set()) & todo)]
            if not ready:  # a cycle of foreign keys: the rest together (the copy may then fail, named)
                ready = parts
            levels.append(ready)
            todo -= {(t.schema, t.name) for t, _ in ready}
            taken = {id(p) for p in ready}
            parts = [p for p in parts if id(p) not in taken]
        return levels

    def _finish(self, post: PostDataRun | None) -> None:
        # the sequences' values while the indexes build (they do not depend on each other)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sequences") as pool:
            sequences = pool.submit(copy_sequences, self.cfg.source, self.cfg.target)
            if post is not None:
                post.finish()
            sequences.result()
        self._mark("phase = 'streaming', copied_at = now()")


# -- helpers --------------------------------------------------------------------------------------
def ensure_publication(src: psycopg2.extensions.connection, cfg: SyncConfig) -> bool:
    """Create the publication unless it exists. Returns True when pgferry created it."""
    with src.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (cfg.publication,))
        if cur.fetchone():
            return False
        what = "FOR ALL TABLES"
        if cfg.tables:
            what = "FOR TABLE " + ", ".join(table_spec_sql(t) for t in cfg.tables)
        try:
            cur.execute(f"CREATE PUBLICATION {quote_ident(cfg.publication)} {what}")
        except psycopg2.Error as exc:
            src.rollback()
            raise SyncError(f"could not create publication {cfg.publication!r} on {describe_dsn(cfg.source)}: "
                            f"{first_line(exc)}. Create it as a superuser: CREATE PUBLICATION "
                            f"{cfg.publication} {what}") from None
    src.commit()
    log.info("created publication %s %s", cfg.publication, what)
    return True


def _drop_stale_slot(src: Any, slot: str, timeout: float = 30.0) -> None:
    """Drop the slot an interrupted start created; its walsender may take a moment to exit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with src.cursor() as cur:
                cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            src.commit()
            log.info("dropped slot %s, left by the interrupted start", slot)
            return
        except psycopg2.errors.ObjectInUse as exc:
            src.rollback()
            if time.monotonic() > deadline:
                raise SyncError(f"slot {slot!r} on source is still in use: {first_line(exc)}") from None
            time.sleep(0.2)


def _slot_exists(src: Any, slot: str) -> bool:
    with src.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        found = cur.fetchone() is not None
    src.rollback()
    return found


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
