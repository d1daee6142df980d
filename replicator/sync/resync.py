"""Re-copying one table while streaming (`pgferry resync TABLE`, and after a schema change whose
values only the source computed: sink/ddl.py).

The stream loop stops between two source transactions, commits what it holds, and then:
1. a temporary slot on a replication connection exports a snapshot of the source as of its
   consistent point L (the snapshot lives as long as that connection);
2. in one target transaction: the table is emptied, filled by a COPY in that snapshot, its
   snapshot LSN set to L in `<state>.tables`, and the request marked done;
3. the stream goes on: its changes to that table committed before L are in the copy and are
   skipped, as after the initial copy (Sink.snapshots), the later ones apply on top.
A crash before step 2 commits leaves the request pending (it is recorded in the state, in the same
transaction as the schema change that needed it): the next start does it again.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extras

from decoder import Lsn
from sink.state import pgferry_session, quote_ident
from sink.state import request_resync as request  # noqa: F401  (re-exported for the CLI)

from ..errors import FatalError, first_line
from ..source import connect, describe_dsn

log = logging.getLogger("pgferry.resync")

SPILL = 64 << 20  # the copy is held in memory up to this, then in a temporary file


def pending(cur: Any, schema: str, slot: str) -> list[str]:
    cur.execute(f"SELECT table_name FROM {quote_ident(schema)}.resync WHERE slot_name = %s AND done_at IS NULL "
                "ORDER BY requested_at", (slot,))
    return [r[0] for r in cur.fetchall()]


def resync_table(source: str, target_conn: Any, schema: str, slot: str, table: str,
                 keep_alive: Callable[[], None]) -> tuple[Lsn, int, tuple[str, str]] | None:
    """Re-copy `table` into the target on `target_conn` (committed there). Returns (the snapshot
    LSN, rows, (schema, name)); None when the table is gone (the request is closed, said so).
    `keep_alive` is called while the copy runs (the stream's feedback)."""
    cur = target_conn.cursor()
    cur.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)", (table,))
    found = cur.fetchone()
    if found is None:
        _gone(target_conn, schema, slot, table, "no such table on the target")
        return None
    nsp, name = found
    qualified = f"{quote_ident(nsp)}.{quote_ident(name)}"
    repl = connect(source, "source", connection_factory=psycopg2.extras.LogicalReplicationConnection)
    src = None
    try:
        rcur = repl.cursor()
        rcur.execute(f"CREATE_REPLICATION_SLOT {quote_ident(f'{slot}_resync_{int(time.time() * 1000) % 10**9}')} "
                     "TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT")
        _, consistent, snapshot, _ = rcur.fetchone()
        lsn = Lsn.parse(consistent)
        src = connect(source, "source")
        src.set_session(isolation_level="REPEATABLE READ", readonly=True)
        scur = src.cursor()
        scur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
        pgferry_session(scur)
        # the columns both sides have, the target's generated ones left out
        scur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
                     "AND NOT attisdropped AND attgenerated = ''", (qualified,))
        source_cols = [r[0] for r in scur.fetchall()]
        if not source_cols:
            _gone(target_conn, schema, slot, table, f"no such table on source {describe_dsn(source)}")
            return None
        cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
                    "AND NOT attisdropped AND attgenerated = ''", (qualified,))
        target_cols = {r[0] for r in cur.fetchall()}
        cols = ", ".join(quote_ident(c) for c in source_cols if c in target_cols)
        with tempfile.SpooledTemporaryFile(max_size=SPILL) as buf:
            _in_thread(lambda: scur.copy_expert(f"COPY (SELECT {cols} FROM ONLY {qualified}) TO STDOUT", buf),
                       keep_alive)
            buf.seek(0)
            cur.execute("SAVEPOINT pgferry_resync")
            try:
                cur.execute(f"TRUNCATE ONLY {qualified}")
                cur.execute("RELEASE SAVEPOINT pgferry_resync")
            except psycopg2.errors.FeatureNotSupported:  # referenced by a foreign key: row by row
                cur.execute("ROLLBACK TO SAVEPOINT pgferry_resync")
                cur.execute(f"DELETE FROM ONLY {qualified}")
            _in_thread(lambda: cur.copy_expert(f"COPY {qualified} ({cols}) FROM STDIN", buf), keep_alive)
            rows = cur.rowcount
        s = quote_ident(schema)
        cur.execute(f"INSERT INTO {s}.tables (slot_name, schema_name, table_name, state, snapshot_lsn, rows, "
                    "copied_at) VALUES (%s, %s, %s, 'copied', %s::pg_lsn, %s, now()) "
                    "ON CONFLICT (slot_name, schema_name, table_name) DO UPDATE SET "
                    "state = 'copied', snapshot_lsn = EXCLUDED.snapshot_lsn, "
                    "rows = EXCLUDED.rows, copied_at = now()", (slot, nsp, name, str(lsn), rows))
        cur.execute(f"UPDATE {s}.resync SET done_at = now(), snapshot_lsn = %s::pg_lsn, rows = %s "
                    "WHERE slot_name = %s AND table_name = %s AND done_at IS NULL", (str(lsn), rows, slot, table))
        target_conn.commit()
        return lsn, rows, (nsp, name)
    except psycopg2.Error as exc:
        target_conn.rollback()
        raise FatalError(f"re-copying {table} failed: {first_line(exc)}") from None
    finally:
        if src is not None:
            src.close()
        repl.close()  # the temporary slot goes with it


def _gone(target_conn: Any, schema: str, slot: str, table: str, why: str) -> None:
    target_conn.rollback()
    log.warning("not re-copying %s: %s (dropped since it was asked?)", table, why)
    target_conn.cursor().execute(f"UPDATE {quote_ident(schema)}.resync SET done_at = now(), reason = "
                                 "coalesce(reason, '') || %s WHERE slot_name = %s AND table_name = %s "
                                 "AND done_at IS NULL", (f" (not done: {why})", slot, table))
    target_conn.commit()


def _in_thread(work: Callable[[], object], keep_alive: Callable[[], None]) -> None:
    """Run `work` in a thread; meanwhile call `keep_alive` every second."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # raised below, in the caller's thread
            errors.append(exc)

    th = threading.Thread(target=run, name="pgferry-resync", daemon=True)
    th.start()
    while th.is_alive():
        th.join(1.0)
        keep_alive()
    if errors:
        raise errors[0]


def run_resync(target: str, slot: str, schema: str, table: str, timeout: float | None) -> int:
    """`pgferry resync TABLE`: ask the daemon to re-copy it; wait until it has (unless `timeout`
    is None). Exit 0 when done, 1 when it did not finish in time (the request stays)."""
    from sink import state

    from ..errors import PgferryError

    dst = connect(target, "target")
    dst.autocommit = True
    try:
        cur = dst.cursor()
        cur.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p')", (table,))
        found = cur.fetchone()
        if found is None:
            raise PgferryError(f"no table {table} on target {describe_dsn(target)}", exit_code=2)
        name = state.readable_name(*found)
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{quote_ident(schema)}.resync",))
        if not cur.fetchone()[0]:
            raise PgferryError(f"no pgferry state in schema {schema!r} on target {describe_dsn(target)}: start "
                               "pgferry first")
        state.request_resync(cur, schema, slot, name, "pgferry resync")
        print(f"asked the daemon streaming slot {slot} to re-copy {name}", file=sys.stderr)
        if timeout is None:
            return 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur.execute(f"SELECT rows, snapshot_lsn::text FROM {quote_ident(schema)}.resync WHERE slot_name = %s "
                        "AND table_name = %s ORDER BY id DESC LIMIT 1", (slot, name))
            row = cur.fetchone()
            if row and row[1] is not None:
                print(f"re-copied {name}: {row[0]} rows in a snapshot at {row[1]}")
                return 0
            time.sleep(0.2)
        print(f"pgferry: error: {name} was not re-copied within {timeout:.0f} s: is `pgferry start` running? The "
              "request stays; the daemon does it when it runs", file=sys.stderr)
        return 1
    finally:
        dst.close()
