"""The apply path: decoded source transactions -> batched target transactions.

The sink interface (what the stream loop relies on):

* Ordering: source transactions are given in source commit order and applied in that order; the
  changes of one transaction in the order given.
* Batching: several source transactions share one target transaction, bounded by rows, bytes and
  time (`BatchLimits`). The progress row is written last in the SAME target transaction.
* Idempotency: `begin()` returns False for a transaction that is already on the target (its commit
  LSN is below the stored progress); the caller then skips its changes.
* Durability: `durable_lsn` only ever covers batches whose commit is flushed to the target's WAL
  (checked with `pg_current_wal_flush_lsn()`, so an asynchronous-commit target is covered too).
  This is the only position that may be sent to the source as `flush_lsn`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from decoder import INVALID_LSN, UNCHANGED, Delete, Insert, Lsn, Relation, Truncate, Update, accel
from decoder.values import pg_epoch_to_datetime

from . import failpoints, state
from .conflicts import Policies
from .ddl import DdlCommand, SchemaChanges
from .direct import DirectPath, first_line_of
from .durability import Durability
from .errors import RETRYABLE, ApplyError
from .evolve import Follower
from .netbatch import NetBatch
from .relations import TargetTable, firing, map_relation
from .resolve import ConflictResolver
from .stats import SinkStats
from .writer import BackgroundWriter

log = logging.getLogger("pgferry.sink")


def _load_fold() -> Callable[..., int] | None:
    """The optional C fold (sink/_cfold.c) unless PGFERRY_PURE_PYTHON=1 or it was not built."""
    _cfold = accel.load("sink._cfold")
    if _cfold is None:
        return None
    _cfold.init(Insert, Update, Delete, UNCHANGED)
    return _cfold.fold


FOLD = _load_fold()
"""sink/_cfold.c's fold(buf, tables, net, appended, lsn, xid), or None: see `Sink.apply_raw`."""


@dataclass(frozen=True)
class BatchLimits:
    # Measured with bench/catchup.py: 50k-change batches fold hot rows 2-3x better than 5k ones
    # and keep the peak RSS near 100 MB (a batch being written plus the next one being read).
    rows: int = 50_000
    bytes: int = 16 << 20
    seconds: float = 0.5


@dataclass(slots=True)
class OpenBatch:
    """The batch being built: complete source transactions (and the open one) not yet committed
    on the target. It commits at the limits (BatchLimits), at its deadline, or when the stream
    is idle."""

    rows: int = 0  # row changes in it
    bytes: int = 0  # their size
    started: float | None = None  # monotonic time of its first transaction (None: no batch)
    end: Lsn | None = None  # end LSN of its last complete transaction: the progress it commits
    commit_time: int | None = None  # that transaction's commit time


class Sink:
    def __init__(self, conn: psycopg2.extensions.connection, slot: str, schema: str = state.DEFAULT_SCHEMA,
                 limits: BatchLimits | None = None, policies: Policies | None = None,
                 target_dsn: str | None = None, stats: SinkStats | None = None,
                 isolate_until: Lsn = INVALID_LSN) -> None:
        self.conn = conn
        self.cur = conn.cursor()
        self.policies = policies or Policies()
        self.target_dsn = target_dsn  # for dead-letter rows that must outlive a rolled-back batch
        self.stats = stats or SinkStats()
        self.resolver = ConflictResolver(self.cur, schema, slot, self.policies, target_dsn, self.stats)
        self.skip_lsns: set[Lsn] = set()  # source transactions the operator skips (pgferry skip)
        self._skip_marked = False  # a skip mark is written in the open batch, its transaction not ended
        self.slot = slot
        self.schema = schema
        self.limits = limits or BatchLimits()  # (a property: the per-row checks read copies)
        self.relations: dict[int, Relation] = {}
        self.snapshots: dict[tuple[str, str], Lsn] = {}  # table -> LSN its initial copy was taken at
        self.tables: dict[int, TargetTable] = {}  # mapped on first use
        self.stored = Lsn(0)  # progress as committed on the target
        self.durability = Durability(self.cur, self._end_read)  # what of it is flushed there
        self._progress_sql = state.progress_sql(schema)
        # After a failure, transactions up to this commit LSN are applied one per batch, so the
        # ones before the failing transaction commit and the failure stops exactly at it.
        self.isolate_until = isolate_until
        # captured schema changes, applied where they happened (sink/ddl.py)
        self.schema_changes = SchemaChanges(self.cur, schema, slot, self.policies, self.resolver, self.stats)
        self._ddl_in_txn = False  # the open source transaction changed the target's schema
        self.resync_due = False  # a table waits to be re-copied (pgferry resync): the stream loop does it
        # the pause asked for (sink/state.py pause_sql): None, '' (at the next boundary) or an LSN's text;
        # seen with each batch's progress row, and polled by the stream loop while idle or paused
        self.pause_request: str | None = None
        # without capture: what the stream's table descriptions show changed (sink/evolve.py)
        self.follower: Follower | None = None
        # what cannot be set-based: inserts as multi-row INSERTs, updates and deletes buffered
        self.direct = DirectPath(self, self.cur, self.policies, self.resolver)
        self.replica_role = False
        self._session_ready = False  # the session settings are set and the state schema exists
        # net changes of the batch, applied set-based (on tables where nothing fires: no foreign-key
        # or user triggers, by the replica role or held back until cutover)
        self.net = NetBatch()
        self._net_lsn: Lsn | None = None
        self._net_xid: int | None = None
        self._net_rows = self._net_bytes = 0  # folded since the net changes were last written
        self._exact = False  # the open source transaction is applied change by change, in order
        # A full batch is written and committed by a background thread while the stream loop
        # reads and folds the next one; anything else that needs the connection waits for it.
        self.writer = BackgroundWriter()
        # the open batch
        self.batch = OpenBatch()
        # the open source transaction
        self._xid: int | None = None
        self._commit_lsn: Lsn | None = None
        self._current: str | None = None

    @property
    def limits(self) -> BatchLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: BatchLimits) -> None:
        self._limits = limits
        self._max_rows, self._max_bytes = limits.rows, limits.bytes
        self._net_max_rows, self._net_max_bytes = 2 * limits.rows, 2 * limits.bytes

    # -- session -----------------------------------------------------------------------------
    def open(self, initial: Lsn | None = None, created_slot: bool = False) -> Lsn | None:
        """Prepare the session and state; return the stored progress (None: never streamed).
        With `initial`, a missing progress row is created at that position."""
        cur = self.cur
        if not self._session_ready:  # once per connection (a first start calls open twice)
            try:
                cur.execute("SET session_replication_role = replica")
                self.replica_role = True
            except psycopg2.errors.InsufficientPrivilege:
                self.conn.rollback()
            state.pgferry_session(cur)  # committed with the state below
            state.ensure_schema(cur, self.schema)
            if state.ensure_apply_function(cur, self.schema):
                self.direct.each.sql = f"SELECT {state.quote_ident(self.schema)}.{state.APPLY_EACH}(%s::text[])"
        if initial is not None:
            state.init_progress(cur, self.schema, self.slot, initial, created_slot)
        stored = state.read_progress(cur, self.schema, self.slot)
        self.snapshots = state.snapshot_lsns(cur, self.schema, self.slot)
        cur.execute(f"SELECT lsn::text FROM {state.quote_ident(self.schema)}.skip WHERE slot_name = %s "
                    "AND done_at IS NULL", (self.slot,))
        self.skip_lsns = {Lsn.parse(r[0]) for r in cur.fetchall()}
        self.resync_due = bool(state.pending_resyncs(cur, self.schema, self.slot))
        self.conn.commit()
        self._session_ready = True
        if stored is not None:
            self.stored = self.durability.durable_lsn = stored
        return stored

    @property
    def durable_lsn(self) -> Lsn:
        """Progress whose commit is flushed on the target (what the source may be told)."""
        return self.durability.durable_lsn

    def firing(self, tables: list[str]) -> list[str]:
        """What fires during apply without the replica role on `tables` (names as SQL), as
        "table: kind name"; the tables with any are applied change by change (relations.FIRING)."""
        rows = [f"{t}: {kind} {name}" for t, kind, name in firing(self.cur, tables)]
        self.conn.rollback()
        return rows

    # -- catalog -----------------------------------------------------------------------------
    def relation(self, rel: Relation) -> None:
        """Remember a Relation message. It is mapped onto the target at its first change: with
        publish_via_partition_root the server also describes leaf partitions that no change
        will name, and the target need not have them."""
        if self.relations.get(rel.oid) == rel:
            return
        log.debug("relation %s.%s (oid %d, replica identity %s, %d columns)", rel.namespace, rel.name, rel.oid,
                  rel.replica_identity, len(rel.columns))
        self.relations[rel.oid] = rel
        self.tables.pop(rel.oid, None)

    def schema_change(self, cmd: DdlCommand) -> None:
        """A schema change captured on the source, at its place in the open source transaction:
        the changes before it are written first; its transaction's batch commits right after it
        (nothing folds across it), and the target's tables are mapped again."""
        self._flush_net()
        self._join()
        isolated = self._commit_lsn is not None and self._commit_lsn <= self.isolate_until
        if self.schema_changes.apply(cmd, self._commit_lsn, self._xid, isolated or self.batch.end is None):
            self.tables.clear()
            self._ddl_in_txn = True

    def _follow(self, rel: Relation) -> None:
        """Without capture: bring the target's table in line with the source's description of it
        (sink/evolve.py), in this batch, after the changes before."""
        f = self.follower
        assert f is not None
        before = f.known(self.schema, self.slot, rel)
        cols = {c.name for c in rel.columns}
        self.cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
                         "AND NOT attisdropped", (f"{state.quote_ident(rel.namespace)}.{state.quote_ident(rel.name)}",))
        target = {r[0] for r in self.cur.fetchall()}
        missing = [c for c in cols if c not in target]
        if before is not None or missing:
            if self.net or self.direct.inserts.rows or self.direct.each.statements:
                self._flush_net()
                self._join()
            f.changed(before, rel)
            if missing:
                f.add_missing(rel, missing, exists=bool(target))
        f.remember(self.schema, self.slot, rel)

    def pending_resyncs(self) -> list[str]:
        """The tables waiting to be re-copied (with no batch open: commits nothing)."""
        self._join()
        tables = state.pending_resyncs(self.cur, self.schema, self.slot)
        self.conn.rollback()
        self.resync_due = bool(tables)
        return tables

    def resynced(self, table: tuple[str, str], lsn: Lsn) -> None:
        """`table` (schema, name) was re-copied in a snapshot at `lsn`: its changes committed
        before that are in the copy."""
        self.snapshots[table] = lsn
        for oid, t in list(self.tables.items()):
            if (t.rel.namespace, t.rel.name) == table:
                del self.tables[oid]

    def type(self, oid: int, namespace: str, name: str) -> None:
        """A Type message: the name of a user type the next Relation's columns may have."""
        if self.follower is not None:
            self.follower.types[oid] = (namespace, name)

    def _table(self, oid: int) -> TargetTable:
        table = self.tables.get(oid)
        if table is None:
            rel = self.relations.get(oid)
            if rel is None:
                raise ApplyError(f"change for relation oid {oid} before its Relation message",
                                 lsn=self._commit_lsn, xid=self._xid)
            self._join()
            if self.follower is not None:
                self._follow(rel)
            table = self.tables[oid] = map_relation(self.cur, rel, check_fires=not self.replica_role)
            if table.fires:
                log.warning("%s: %s fire(s) on the target during apply (no replica role): its changes are applied "
                            "one by one, in source order", table.display, ", ".join(table.fires))
            table.snapshot_lsn = self.snapshots.get((rel.namespace, rel.name), Lsn(0))
            table.counts = self.stats.op_counts.setdefault(table.name, {})
        return table

    # -- source transactions -----------------------------------------------------------------
    def begin(self, xid: int, commit_lsn: Lsn) -> bool:
        """Start a source transaction committed at `commit_lsn`. False: already applied, skip it."""
        if commit_lsn < self.stored:
            return False
        if self.skip_lsns and commit_lsn in self.skip_lsns:
            self._join()
            log.warning("skipping source transaction xid %s committed at %s (pgferry skip)", xid, commit_lsn)
            self.cur.execute(f"UPDATE {state.quote_ident(self.schema)}.skip SET done_at = now() WHERE slot_name = %s "
                             "AND lsn = %s::pg_lsn", (self.slot, str(commit_lsn)))
            if self.batch.started is None:
                self.batch.started = time.monotonic()
            self._skip_marked = True  # the mark commits with this batch: end_skipped ends it here
            self.skip_lsns.discard(commit_lsn)
            return False
        self._xid, self._commit_lsn = xid, commit_lsn
        # Without the replica role, set-based apply is still exact where nothing fires: the tables
        # where something does are applied one by one (TargetTable.fires).
        self._exact = commit_lsn <= self.isolate_until
        if self.batch.started is None:
            self.batch.started = time.monotonic()
        return True

    def end_skipped(self, end_lsn: Lsn, commit_time: int) -> None:
        """The commit of a transaction `begin` declined. One skipped by `pgferry skip` ends the
        batch like an applied one, so its mark commits with the progress past it even when nothing
        else follows (a batch with no rows was rolled back, and the mark with it)."""
        if self._skip_marked:
            self._skip_marked = False
            self.batch.end = end_lsn
            self.batch.commit_time = commit_time
            if self._batch_full():
                self.flush(wait=False)

    def _batch_full(self) -> bool:
        """The open batch reached its row or byte limit (commit it, in the background)."""
        return self.batch.rows >= self._max_rows or self.batch.bytes >= self._max_bytes

    def apply(self, msg: Insert | Update | Delete | Truncate, size: int = 0) -> None:
        """Apply one change of the open source transaction. `size`: its message's length in
        bytes, for the batch's byte budget (0: estimated from the values)."""
        t = type(msg)
        if t is Truncate:
            self._truncate(msg)  # type: ignore[arg-type]
            return
        table = self.tables.get(msg.relation_oid)  # type: ignore[union-attr]
        if table is None:
            table = self._table(msg.relation_oid)  # type: ignore[union-attr]
        lsn = self._commit_lsn
        if lsn is not None and lsn < table.snapshot_lsn:
            return  # committed before this table's copy was taken: the copy has it
        counts = table.counts
        counts[t] = counts.get(t, 0) + 1
        if not self._exact:
            if self.net.add(table, msg, lsn, self._xid):  # type: ignore[arg-type]
                if not size:
                    row = msg.old if t is Delete else msg.new  # type: ignore[union-attr]
                    size = sum(len(v) for v in row if type(v) is str)  # type: ignore[misc, union-attr]
                self._folded(size)
                return
            if self.net:
                self._flush_net()  # what is pending comes first: source order
        if t is Insert:
            if self.direct.each.statements:
                self.direct.flush_each()  # the updates and deletes before it come first
            head, template, params = table.insert(msg.new)  # type: ignore[union-attr]
            if not self.direct.inserts.fits(head):
                self.direct.flush_inserts()
                self.direct.inserts.start(head, template, table.display)
            self.direct.inserts.add(params, table, msg.new, self._commit_lsn, self._xid)  # type: ignore[union-attr]
            self.stats.rows_applied += 1
            self.batch.rows += 1
            self.batch.bytes += sum(len(p) for p in params if type(p) is str)
            return
        self.direct.flush_inserts()
        if t is Update:
            sql, params = table.update(msg.old, msg.new)  # type: ignore[union-attr]
            row = msg.new  # type: ignore[union-attr]
            ident = msg.old if msg.old is not None else msg.new  # type: ignore[union-attr]
        else:
            sql, params = table.delete(msg.old)  # type: ignore[union-attr, arg-type]
            row = ident = msg.old  # type: ignore[union-attr]
        self._current = table.display
        kind = "update_missing" if t is Update else "delete_missing"
        key = tuple(ident[i] for i in table.key)
        if self.direct.can_buffer(table, kind):  # sent with the next ones, one round trip for many
            self.direct.buffer(table, kind, sql, params, key, [t, row, self._commit_lsn, self._xid], row)
        else:
            self.direct.flush_each()
            if self.direct.execute_change(table, sql, params, row) == 0:
                self.resolver.precise = True
                self.resolver.missing(table, kind, [(key, [t, row, self._commit_lsn, self._xid])])
        self.stats.rows_applied += 1
        self.batch.rows += 1
        self.batch.bytes += sum(len(p) for p in params if type(p) is str)

    def apply_raw(self, payload: bytes) -> bool:
        """The hot path for an Insert/Update/Delete message of the open transaction (outside a
        streamed block): parsed and folded into the batch in C. False: not handled, nothing
        changed; decode the message and call `apply`."""
        if self._exact or FOLD is None:
            return False
        net = self.net
        done = FOLD(payload, self.tables, net.tables, net._appended, self._commit_lsn, self._xid)
        if done == 1:
            self._folded(len(payload))
        return done != 0

    def _folded(self, size: int) -> None:
        """Count a change folded into the batch (`size`: its message's bytes)."""
        self._net_lsn = self._commit_lsn
        self._net_xid = self._xid
        self.stats.rows_applied += 1
        self.batch.rows += 1
        self.batch.bytes += size
        self._net_rows += 1
        self._net_bytes += size
        if self._net_rows >= self._net_max_rows or self._net_bytes >= self._net_max_bytes:
            # A transaction larger than a batch: write what it has so far, in the background (no
            # commit: it is not complete), so memory stays bounded whatever its size. Twice the
            # limits: a batch of smaller transactions reaches the limits at a commit and is then
            # written while the next one is read (a write here would make the commit wait for it).
            self._flush_net(wait=False)

    def _flush_net(self, wait: bool = True) -> None:
        """Write the pending net changes (after any buffered direct inserts, which came first);
        `wait=False`: in the background (the next use of the connection waits for it)."""
        self._join()
        self.direct.flush()
        net, self.net = self.net, NetBatch()
        self._net_rows = self._net_bytes = 0
        if wait:
            self._write_net(net, self._net_lsn, self._net_xid)
        else:
            self._background(self._write_net, net, self._net_lsn, self._net_xid)

    def _write_net(self, net: NetBatch, lsn: Lsn | None, xid: int | None) -> None:
        if not net:
            return
        try:
            self.resolver.precise = False
            net.write(self.cur, self.resolver)
        except RETRYABLE:
            raise
        except ApplyError:
            raise
        except psycopg2.Error as exc:
            self._current = net.current
            err = self._apply_error(exc, lsn, xid)
            # Set-based and reordered: re-run these transactions one by one, in order, to pin it.
            err.batch_has_earlier = True
            raise err from None

    def _truncate(self, msg: Truncate) -> None:
        self._flush_net()
        names = []
        for oid in msg.relation_oids:
            table = self._table(oid)
            if self._commit_lsn is None or self._commit_lsn >= table.snapshot_lsn:
                names.append(table.qualified)
        if not names:
            return
        sql = "TRUNCATE " + ", ".join(names)
        if msg.restart_identity:
            sql += " RESTART IDENTITY"
        if msg.cascade:
            sql += " CASCADE"
        self._current = ", ".join(names)
        self.direct.execute(sql, [])
        self.batch.rows += 1

    def _apply_error(self, exc: psycopg2.Error, lsn: Lsn | None = None, xid: int | None = None) -> ApplyError:
        err = ApplyError(f"the target rejected a change: {first_line_of(exc)}", lsn=lsn or self._commit_lsn,
                         xid=xid if lsn else self._xid, table=self._current)
        # With earlier transactions in the batch (or buffered inserts from them), the failure is
        # re-run one transaction per batch to pin it on exactly one transaction.
        err.batch_has_earlier = self.batch.end is not None
        return err

    def commit(self, end_lsn: Lsn, commit_time: int, hold: bool = False) -> None:
        """The source transaction is complete. The batch commits when a limit is reached, unless
        `hold` (the caller commits it itself, e.g. with a cutover claim: `handoff`)."""
        single = (self._commit_lsn is not None and self._commit_lsn <= self.isolate_until) or self._ddl_in_txn
        self._ddl_in_txn = False
        self.batch.end = end_lsn
        self.batch.commit_time = commit_time
        self._xid = self._commit_lsn = None
        if hold:
            return
        if single:
            self.flush()
        elif self._batch_full():
            self.flush(wait=False)

    def handoff(self, cutover_id: str) -> bool:
        """The handoff marker's transaction is complete: claim the cutover in this batch and commit.
        True when this daemon now owns the handoff (it must stop); False if the cutover gave up."""
        assert self.batch.end is not None
        self._flush_net()
        self.cur.execute(state.handoff_sql(self.schema), (str(self.batch.end), self.slot, cutover_id))
        claimed = self.cur.rowcount == 1
        self.flush()
        return claimed

    def read_pause(self) -> str | None:
        """Look for a pause request now (between batches: nothing else is in flight)."""
        self._join()
        self.cur.execute(state.pause_sql(self.schema), (self.slot,))
        row = self.cur.fetchone()
        self.conn.commit()
        self.pause_request = row[0] if row else None
        return self.pause_request

    def mark_paused(self, at: str | None) -> None:
        """Tell whoever asked that the daemon holds at its stored position; `at`: the request it
        reached (its at_lsn, None: the next boundary), so a request that replaced it meanwhile is
        not answered for it."""
        self._join()
        self.cur.execute(f"UPDATE {state.quote_ident(self.schema)}.pause SET paused_lsn = %s::pg_lsn, paused_since = "
                         "now() WHERE slot_name = %s AND paused_lsn IS NULL AND at_lsn IS NOT DISTINCT FROM "
                         "%s::pg_lsn", (str(self.stored), self.slot, at))
        self.conn.commit()

    def in_transaction(self) -> bool:
        """A source transaction is open (or one skipped by `pgferry skip`: its mark must commit
        with the progress past it, not before its end)."""
        return self._xid is not None or self._skip_marked

    def writing(self) -> bool:
        """A batch is being written in the background."""
        return self.writer.active

    def batch_open(self) -> bool:
        return self.batch.started is not None

    def deadline(self) -> float | None:
        """When the open batch must commit (monotonic time), or None."""
        if self.batch.started is None:
            return None
        return self.batch.started + self.limits.seconds

    def flush(self, wait: bool = True) -> None:
        """Commit the open batch (complete source transactions only) with its progress row.
        `wait=False`: write and commit it in the background; the next use of the connection
        waits for it (and raises its error, if any)."""
        self._join()
        if self.batch.end is None:
            if self.batch.started is not None and self._xid is None:
                self.conn.rollback()
                self.batch.started = None
            return
        assert self._xid is None, "flush inside a source transaction"
        self.direct.flush()  # statements already sent in this batch stay on this thread
        args = (self.net, self._net_lsn, self._net_xid, self.batch.end, self.batch.commit_time, self.batch.rows)
        self.net = NetBatch()
        self.batch.rows = self.batch.bytes = self._net_rows = self._net_bytes = 0
        self.batch.started = self.batch.end = self.batch.commit_time = None
        if wait:
            self._write_batch(*args)
        else:
            self._background(self._write_batch, *args)

    def _background(self, write: Callable[..., None], *args: Any) -> None:
        """Run `write(*args)` on the batch-writer thread (the connection is its own until `_join`)."""
        self.writer.start(write, *args)

    def _write_batch(self, net: NetBatch, net_lsn: Lsn | None, net_xid: int | None, end: Lsn,
                     commit_time: int | None, rows: int) -> None:
        started = time.monotonic()
        self._write_net(net, net_lsn, net_xid)
        when = pg_epoch_to_datetime(commit_time) if commit_time is not None else None
        self.cur.execute(self._progress_sql, (str(end), when, rows, self.slot))
        if self.cur.rowcount != 1:
            raise ApplyError(f"progress row for slot {self.slot} is missing in {self.schema}.progress "
                             "(was the state schema dropped while pgferry ran?)")
        resync, self.pause_request = self.cur.fetchone()
        if resync:
            self.resync_due = True
        failpoints.hit("after_apply_before_commit")
        self.conn.commit()
        failpoints.hit("after_commit_before_feedback")
        self.stored = end
        if when is not None:
            self.stats.applied_commit_time = when.timestamp()
        self.durability.committed(end)
        if self.stats.on_batch is not None:
            self.stats.on_batch(rows, time.monotonic() - started)

    def _join(self) -> None:
        """Wait for the background batch; raise its error here, in the caller's thread."""
        self.writer.join()

    def rollback(self) -> None:
        """Drop the open batch (e.g. on shutdown mid-transaction): the source resends it."""
        try:
            self._join()
        except Exception:  # the batch is dropped either way: the caller already failed or stops
            pass
        self.direct.inserts.take()
        self._skip_marked = False
        self.direct.each.take()
        self._ddl_in_txn = False
        self.schema_changes.volatile.clear()
        self.net = NetBatch()
        self._net_rows = self._net_bytes = 0
        try:
            self.conn.rollback()
        except psycopg2.Error:
            pass
        self.batch.rows = self.batch.bytes = 0
        self.batch.started = self.batch.end = self.batch.commit_time = None
        self._xid = self._commit_lsn = None

    def advance_idle(self, lsn: Lsn) -> None:
        """Record that the source has nothing pending up to `lsn` (no open transaction or batch)."""
        if lsn <= self.stored or self.batch.started is not None or self._xid is not None:
            return
        self._join()
        self.cur.execute(self._progress_sql, (str(lsn), None, 0, self.slot))
        row = self.cur.fetchone()
        self.conn.commit()
        if row and row[0]:
            self.resync_due = True
        if row:
            self.pause_request = row[1]
        self.stored = lsn
        self.durability.committed(lsn)

    # -- durability --------------------------------------------------------------------------
    def poll_durable(self) -> Lsn:
        """Re-check the target's WAL flush position for asynchronously committed batches."""
        if self.writer.active:
            if self.writer.running():
                return self.durable_lsn
            self._join()
        return self.durability.poll()

    def _end_read(self) -> None:
        if self.batch.started is None and self._xid is None:
            # End the read's implicit transaction, but NEVER inside an open batch: that would
            # roll back applied changes whose progress the batch's commit then records.
            self.conn.rollback()
