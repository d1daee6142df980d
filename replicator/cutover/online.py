"""`pgferry verify --online`: compare source and target as of one LSN while both keep working.

1. A temporary logical slot on the source exports a snapshot at its consistent point X: a
   REPEATABLE READ transaction imports it and sees exactly what committed before X. The slot and
   its replication connection go right after the import (the transaction keeps the snapshot).
2. The daemon is asked to hold before the first transaction that commits at or after X
   (replicator/stream/pause.py). Once it holds, the target holds exactly what the source committed
   before X: a REPEATABLE READ transaction on the target takes its snapshot, and the daemon goes
   on. So that it cannot have gone past X before it hears of it, it is first held where it is
   (before the slot is made, so X is after that point), then moved on to X. It holds while the
   slot is made (the source finishing the transactions running then) and for a round trip or two
   after; the source never stops.
3. Both snapshots are compared table by table with the same digests as `pgferry verify`
   (cutover/verify.py), key ranges, then rows, for the tables that differ. `max_rate` paces the
   reading (rows per second, over both sides) so production is not hurt.

The source snapshot holds back vacuum on the source (its xmin) for as long as the comparison
runs: its age is printed. A daemon that restarts meanwhile does not change the target snapshot,
which was already taken; a daemon that is not running cannot hold, and the verify says so (exit 1)
instead of comparing a target that is not at X.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec
import psycopg2
import psycopg2.errors
import psycopg2.extras

from decoder import Lsn
from sink.state import pgferry_session, quote_ident, readable_name

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn, published_tables
from ..stream import pause
from ..sync.copy import table_sizes
from ..sync.plan import TableCopy
from .changed import ChangeReader, Changes, compare_sides
from .verify import _SETTINGS, Side, TableResult, verify_table

log = logging.getLogger("pgferry.verify")

BY = "verify --online"


@dataclass
class OnlineResult:
    lsn: str
    held_s: float  # how long the daemon held at the LSN
    snapshot_age_s: float = 0.0  # how long the source's snapshot was held
    tables: list[TableResult] = field(default_factory=list)
    took_s: float = 0.0
    changes: ChangeReader | None = None  # `follow`: the source's changes since `lsn`, being read


def _pinned(conn: Any, snapshot: str | None = None) -> Side:
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    cur = conn.cursor()
    if snapshot is not None:  # first in the transaction: before any query takes a snapshot of its own
        cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
    pgferry_session(cur)
    cur.execute(_SETTINGS)
    return Side(conn, pinned=True)


class SnapshotUnavailable(PgferryError):
    """No snapshot could be exported (no free slot or WAL sender, transactions running too long):
    nothing was compared, the daemon goes on."""


@dataclass
class Snapshots:
    """The source and the target as of one LSN, each pinned in a REPEATABLE READ transaction."""

    at: Lsn
    source: Side
    target: Side
    held_s: float  # how long the daemon held
    taken: float  # monotonic time the source snapshot was taken


def take_snapshots(source: str, target: str, slot: str, schema: str, repl: Any, src: Any, dst: Any, name: str,
                   timeout: float, release: bool = True) -> Snapshots:
    """Steps 1 and 2 of the module doc: a temporary slot `name` made on the replication
    connection `repl` exports the source's snapshot at its consistent point X (imported into
    `src`), the daemon holds before X while `dst` takes the target's. The slot lives as long as
    `repl`; nothing else may run on `repl` before the import (the export would end). `release`
    False: the daemon still holds at X on return (if no error), for the caller to let go
    (`pause.release(..., BY)`)."""
    rcur = repl.cursor()
    earlier = pause.read(target, schema, slot)
    if earlier is not None:
        raise PgferryError(f"the daemon is paused ({earlier.requested_by}, since {earlier.requested_at}): "
                           "`pgferry resume` first; an online verify holds and resumes it itself")
    pause.request(target, schema, slot, BY)  # hold first: it cannot pass X before hearing of it
    try:  # from here on the daemon holds for us: whatever happens, it is let go
        pause.wait_paused(target, schema, slot, timeout, lambda: pause.daemon_streaming(source, slot), by=BY)
        held = time.monotonic()
        # the slot waits for the transactions running on the source to finish, the daemon held all
        # along: cancelled after `timeout`
        timer = threading.Timer(timeout, repl.cancel)
        timer.start()
        try:
            rcur.execute(f"CREATE_REPLICATION_SLOT {quote_ident(name)} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT")
            _, consistent, snapshot, _ = rcur.fetchone()
        except psycopg2.errors.QueryCanceled:
            raise SnapshotUnavailable(f"source {describe_dsn(source)}: transactions running there did not finish "
                               f"within {timeout:.0f} s, so no snapshot could be taken (see pg_stat_activity "
                               "for long ones); the daemon goes on") from None
        except psycopg2.Error as exc:
            raise SnapshotUnavailable(f"could not take a snapshot of source {describe_dsn(source)} (a temporary "
                               f"slot): {first_line(exc)}") from None
        finally:
            timer.cancel()
        taken = time.monotonic()
        src_side = _pinned(src, snapshot)
        at = Lsn.parse(consistent)
        pause.request(target, schema, slot, BY, at)
        pause.wait_paused(target, schema, slot, timeout, lambda: pause.daemon_streaming(source, slot), by=BY, at=at)
        dst_side = _pinned(dst)
        dst_side.one("SELECT pg_current_snapshot()")  # taken now, while the daemon holds before `at`
    except BaseException:
        pause.release(target, schema, slot, BY)
        raise
    if release:
        pause.release(target, schema, slot, BY)
    return Snapshots(at, src_side, dst_side, round(time.monotonic() - held, 3), taken)


def _replication(source: str) -> Any:
    return connect(source, "source", connection_factory=psycopg2.extras.LogicalReplicationConnection)


def verify_online(source: str, target: str, publication: str, slot: str, schema: str, tables: list[str] | None,
                  mode: str = "checksum", timeout: float = 60.0, max_rate: float | None = None,
                  progress: IO[str] | None = None, follow: bool = False) -> OnlineResult:
    """Compare both sides as of one LSN while the daemon streams on. `follow` (`cutover --verify
    online`): the temporary slot stays, and the result's `changes` reads what the source commits
    after the LSN (cutover/changed.py); the caller closes it."""
    started = time.monotonic()
    repl = _replication(source)
    src = connect(source, "source")
    dst = connect(target, "target")
    result: OnlineResult | None = None
    try:
        name = f"pgferry_verify_{os.getpid()}"
        if follow:  # the stream's key values print as the comparing sessions will read them
            repl.cursor().execute(_SETTINGS)
        snaps = take_snapshots(source, target, slot, schema, repl, src, dst, name, timeout)
        if not follow:
            repl.close()  # the temporary slot goes; the transaction keeps the snapshot
        src_side, dst_side, at, taken = snaps.source, snaps.target, snaps.at, snaps.taken
        result = OnlineResult(lsn=str(at), held_s=snaps.held_s)
        if follow:  # from X on, while the comparison runs: the slot then holds little WAL
            result.changes = ChangeReader(repl, name, publication, at, source)
        log.info("snapshots at %s: the daemon held %.3f s; comparing while it streams on", at, result.held_s)
        listing = connect(source, "source")  # (not the pinned session: listing rolls back)
        try:
            names = published_tables(listing, publication, tables)
            # the progress's share and ETA: the source's statistics (0 for a table never analyzed)
            sizes = table_sizes(listing, [TableCopy(n, t) for n, t in names])
            estimates = [(sizes.get(readable_name(n, t)) or (0, 0, None))[2] or 0 for n, t in names]
        finally:
            listing.close()
        pace = Pacer(max_rate)
        compared = 0
        for i, (n, t) in enumerate(names, 1):
            began = time.monotonic()
            res = verify_table(src_side, dst_side, n, t, mode)
            result.tables.append(res)
            compared += res.source_rows
            if progress is not None:
                now = time.monotonic()
                left = sum(estimates[i:])  # the tables not compared yet, by the source's statistics
                rate = compared / max(now - taken, 1e-3)
                eta = f"ETA {left / rate:.0f} s" if rate > 0 and left else "ETA ?" if left else "done"
                progress.write(f"  [{i}/{len(names)}] {res.name}: {res.source_rows:,} rows, "
                               f"{'equal' if res.match else 'DIFFERENT'} in {now - began:.1f} s; "
                               f"{100 * compared / max(compared + left, 1):.0f}% of ~{compared + left:,} rows, "
                               f"{rate:,.0f} rows/s, {eta} (source snapshot held {now - taken:.0f} s)\n")
                progress.flush()
            pace.rows(res.source_rows + res.target_rows)
        result.snapshot_age_s = round(time.monotonic() - taken, 3)
        result.took_s = round(time.monotonic() - started, 3)
        return result
    except BaseException:
        if result is not None and result.changes is not None:
            result.changes.close()
        raise
    finally:
        for c in (src, dst) if result is not None and result.changes is not None else (repl, src, dst):
            if not c.closed:
                c.close()


@dataclass
class Round:
    """One catch-up round of `cutover --verify online`: the rows changed in a window, compared."""

    lsn: str
    window: Changes
    tables: list[TableResult]
    held_s: float
    took_s: float


def catch_up_round(source: str, target: str, slot: str, schema: str, changes: ChangeReader, n: int,
                   timeout: float) -> Round:
    """Snapshots at a new LSN Y (a second temporary slot, dropped at once; the daemon held an
    instant), then only the rows the source changed since the last comparison (the reader's window
    up to Y) compared in them, while the daemon streams on. What is left for the fence is then what
    was written during this round, not during the whole first comparison."""
    started = time.monotonic()
    try:
        repl = _replication(source)
    except PgferryError as exc:  # e.g. no WAL sender free (the reader holds one)
        raise SnapshotUnavailable(str(exc)) from None
    src, dst = connect(source, "source"), connect(target, "target")
    try:
        snaps = take_snapshots(source, target, slot, schema, repl, src, dst, f"pgferry_verify_{os.getpid()}_{n}",
                               timeout)
        repl.close()  # this slot only gave the snapshot
        window = changes.split(snaps.at, timeout)
        tables = compare_sides(snaps.source, snaps.target, window)
        return Round(str(snaps.at), window, tables, snaps.held_s, round(time.monotonic() - started, 3))
    finally:
        for c in (repl, src, dst):
            if not c.closed:
                c.close()


class Pacer:
    """At most `rate` rows per second, on average since the start (None: as fast as it goes)."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self.started, self.done = rate, time.monotonic(), 0

    def rows(self, n: int) -> None:
        self.done += n
        if self.rate:
            ahead = self.done / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


def print_online(res: OnlineResult, as_json: bool, out: IO[str] = sys.stdout) -> int:
    ok = all(t.match for t in res.tables)
    if as_json:
        out.write(msgspec.json.encode({"ok": ok, "online": True, "lsn": res.lsn, "held_s": res.held_s,
                                       "snapshot_age_s": res.snapshot_age_s, "tables": [
            {"name": r.name, "source_rows": r.source_rows, "target_rows": r.target_rows, "match": r.match,
             "differences": r.differences} for r in res.tables]}).decode() + "\n")
        return 0 if ok else 1
    for r in res.tables:
        out.write(f"{r.name:<40} {r.source_rows:>10} {r.target_rows:>10}  {'ok' if r.match else 'DIFFERENT'}\n")
        for d in r.differences:
            out.write(f"    {d}\n")
    bad = sum(not r.match for r in res.tables)
    out.write(f"{len(res.tables)} tables compared as of {res.lsn} (the daemon held {res.held_s} s; the source "
              f"snapshot was held {res.snapshot_age_s} s), {bad} different\n")
    return 0 if ok else 1
