"""The stream loop: source replication connection -> decoder -> sink, with feedback.

One `Session` is one pair of connections (replication connection to the source, plain connection
to the target). `run_stream` runs sessions in a retry loop: a connection failure, a restarted
server or a terminated walsender ends the session, and the next one resumes from the progress
stored in the target. Fatal problems (slot gone or invalidated, schema mismatch, a change the
target rejects) end the daemon with exit 1 and a message that says what to do.

The loop is an explicit state machine; each turn does the first thing that applies, in this
priority (docs/design.md, the stream loop):

  1. shutdown requested    -> finish (commit a batch between transactions) or roll back, feedback, exit 0
  2. connection health     -> errors surface as exceptions from the calls below and end the session
  3. finished flushes      -> a durable batch moves `flush_lsn`: send feedback
  4. batch deadline        -> commit the open batch (only between source transactions)
  5. incoming messages     -> read a burst, decode, apply or spool
  6. keepalive replies     -> psycopg2 answers keepalives inside read_message(); idle: advance progress

Exactly-once: the sink writes the applied position in the same target transaction as the rows,
START_REPLICATION starts from it, and transactions that end at or before it are skipped.
"""

from __future__ import annotations

import gc
import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from decoder import (
    INVALID_LSN,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Lsn,
    Message,
    Origin,
    PgOutputDecoder,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    decode_message,
)
from decoder.pgoutput import decode_hot
from sink.apply import BatchLimits, Sink
from sink.conflicts import Policies
from sink.ddl import PREFIX as DDL_PREFIX
from sink.ddl import parse as parse_ddl
from sink.errors import SLOT_LOST, ApplyError, SinkError, retryable
from sink.evolve import Follower
from sink.state import HANDOFF_PREFIX, readable_name
from sink.stats import SinkStats

from ..cutover import fence
from ..ddl import capture
from ..errors import ConnectError, FatalError, PgferryError, SessionRetry, UsageError, first_line
from ..source import (
    check_logical_source,
    connect,
    describe_dsn,
    max_protocol_version,
    published_tables,
    query_one,
    replication_connection,
)
from ..sync import resync
from . import metrics
from .spool import Spool
from .stopflag import StopFlag
from .throttle import Throttle, wal_guard
from .watchdog import TargetWatchdog, WatchedConnection

log = logging.getLogger("pgferry.stream")

# libpq settings for both connections: a dead peer or a black-holed network is noticed in
# seconds (TCP keepalives while idle, tcp_user_timeout while data is unacknowledged).
NET_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
               "tcp_user_timeout": 30000, "connect_timeout": 10}

BURST = 2000  # messages read before the loop looks at its deadlines again
CHANGE_TAGS = frozenset((b"I", b"U", b"D"))
PACE_ROWS = 200  # with a throttle: rows applied between two waits
IDLE_PROGRESS_EVERY = 1.0  # seconds between idle progress writes
DURABLE_WAIT = 30.0  # seconds to wait for the target's WAL flush before a confirmation that needs it


@dataclass
class StreamConfig:
    source: str
    target: str
    publication: str = "pgferry"
    slot: str = "pgferry"
    schema: str = "pgferry"
    limits: BatchLimits = field(default_factory=BatchLimits)
    spool_dir: str | None = None
    status_interval: float = 1.0
    max_backoff: float = 10.0
    network_timeout: float = 30.0  # silence from the source after which the connection is presumed dead
    message_hook: Callable[[LogicalMessage], object] | None = None
    policies: Policies | None = None  # conflict policies (sink/conflicts.py)
    throttle: Throttle | None = None
    reload: Callable[[], tuple[Any, BatchLimits]] | None = None  # SIGHUP: fresh budgets and batch limits
    ddl: str = "apply"  # captured schema changes: apply | stop | skip (sink/ddl.py)
    keep_constraints: bool = False  # what a schema change makes fire stays (else it is held back)
    dropped_columns: str = "keep"  # without capture, a column dropped on the source: keep | drop
    ddl_tables: dict[str, str] = field(default_factory=dict)  # table (readable name) -> its ddl policy


def prepare_slot(conn: psycopg2.extensions.connection, cfg: StreamConfig, stored: Lsn | None) -> tuple[Lsn, bool]:
    """Check (or on first start create) the slot. Returns (its confirmed position, created)."""
    where = describe_dsn(cfg.source)
    with conn.cursor() as cur:
        cur.execute("SELECT plugin, confirmed_flush_lsn::text, wal_status, database = current_database() "
                    "FROM pg_replication_slots WHERE slot_name = %s", (cfg.slot,))
        row = cur.fetchone()
        if row is None:
            if stored is not None:
                raise FatalError(
                    f"replication slot {cfg.slot!r} no longer exists on source {where}, but the target holds "
                    f"progress up to {stored}: the changes since then are gone with the slot. Re-sync: drop the "
                    f"target's copy (and its {cfg.schema!r} state schema) and start again")
            cur.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (cfg.slot,))
            (lsn,) = cur.fetchone()
            conn.commit()
            log.info("created replication slot %s on %s at %s", cfg.slot, where, lsn)
            return Lsn.parse(lsn), True
        plugin, confirmed, wal_status, same_db = row
        if not same_db:
            raise FatalError(f"replication slot {cfg.slot!r} on {where} belongs to another database: "
                             "pass --slot with another name")
        if plugin != "pgoutput":
            raise FatalError(f"replication slot {cfg.slot!r} on {where} uses plugin {plugin}, not pgoutput: "
                             "pass --slot with another name")
        if wal_status == "lost" or confirmed is None:
            raise FatalError(
                f"replication slot {cfg.slot!r} on {where} is invalidated (wal_status = {wal_status}): the source "
                "removed WAL that pgferry had not applied yet, so the target is missing changes. Re-sync: drop "
                "the slot, the target's copy and its state schema, and start again (raise max_slot_wal_keep_size "
                "to keep this from happening again)")
        return Lsn.parse(confirmed), False


class Session:
    """One connection pair and the loop over it."""

    def __init__(self, cfg: StreamConfig, stop: StopFlag, spool: Spool, stats: SinkStats | None = None,
                 isolate_until: Lsn = INVALID_LSN) -> None:
        self.cfg = cfg
        self.stop = stop
        self.spool = spool
        self.stats = stats or SinkStats()  # the daemon's: counts go on across reconnects
        self.isolate_until = isolate_until  # a failed batch: its transactions one per batch up to here
        self.sink: Sink | None = None
        self.repl: Any = None
        self.target: Any = None
        self.cur: Any = None
        self.decoder = PgOutputDecoder()
        self.skip = False  # the current (non-streamed) source transaction is already applied
        self.stream_xid: int | None = None
        self.sent_flush = Lsn(0)
        self.last_idle = 0.0
        self.next_gc = time.monotonic() + GC_EVERY
        self.last_status = 0.0
        self.last_heard = time.monotonic()
        self.last_ping = 0.0
        self.handoff: str | None = None  # cutover id of the marker in the current source transaction
        self.handed_off: Lsn | None = None
        self.received_data = False
        self.watchdog: TargetWatchdog | None = None
        self.bytes_read = 0  # payload bytes handled (the throttle's byte budget)
        self._paced_rows = self._paced_bytes = 0
        self.next_resync_check = 0.0  # monotonic time of the next look for tables to re-copy, when idle
        # pause (pgferry pause, verify --online): hold before the first transaction that commits at
        # or after `pause_at` (0: the next one); `held` is its first message, handled on resume
        self.pause_at: Lsn | None = None
        self.held: Any = None
        self.held_lsn = Lsn(0)  # the commit LSN of the held transaction
        self.paused = False
        self.next_pause_poll = 0.0

    # -- set-up ------------------------------------------------------------------------------
    def open(self) -> None:
        cfg = self.cfg
        self.target = connect(cfg.target, "target", connection_factory=WatchedConnection, **NET_OPTIONS)
        self.watchdog = TargetWatchdog(self.target, cfg.target, cfg.network_timeout).start()
        self.sink = Sink(self.target, cfg.slot, cfg.schema, cfg.limits, policies=cfg.policies, target_dsn=cfg.target,
                         stats=self.stats, isolate_until=self.isolate_until)
        try:
            stored = self.sink.open()
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise FatalError(f"target {describe_dsn(cfg.target)}: {first_line(exc)}: pgferry needs CREATE on the "
                             f"database (or an existing {cfg.schema!r} schema it owns) for its state") from None
        # a fenced target (the old source, streamed back into after a cutover with --fallback)
        fence.pass_through(self.target, cfg.schema)
        src = connect(cfg.source, "source", **NET_OPTIONS)
        try:
            check_logical_source(src, cfg.source, cfg.publication)
            proto = min(max_protocol_version(src.server_version), 4)
            confirmed, created = prepare_slot(src, cfg, stored)
            published = [readable_name(n, t) for n, t in published_tables(src, cfg.publication)]
            all_tables = query_one(src, "SELECT puballtables FROM pg_publication WHERE pubname = %s",
                                   (cfg.publication,))
            with src.cursor() as cur:
                captured = capture.installed(cur)
            src.rollback()
        finally:
            src.close()
        self.sink.schema_changes.policy = cfg.ddl
        self.sink.schema_changes.table_policies = cfg.ddl_tables
        if not captured and cfg.ddl == "apply":  # follow what the stream shows (sink/evolve.py)
            self.sink.follower = Follower(self.sink.cur, cfg.dropped_columns)
            log.info("schema changes on the source are not captured: added and dropped columns and new tables are "
                     "followed from the stream; other changes stop pgferry or must be made on the target by hand")
        if not self.sink.replica_role and not cfg.keep_constraints:
            from ..sync import holdback

            self.sink.schema_changes.hold = holdback.StreamHold(cfg.schema, cfg.slot)
        if not (all_tables and all_tables[0]):  # schema changes to other tables are not applied
            self.sink.schema_changes.tables = {n.replace('"', "") for n in published}
        if stored is None:
            stored = self.sink.open(initial=confirmed, created_slot=created)
            log.info("first start: streaming slot %s from %s", cfg.slot, stored)
        assert stored is not None
        if not self.sink.replica_role:
            fires = self.sink.firing(published)
            if fires:
                log.warning("the target role may not set session_replication_role = replica, and %d foreign key(s), "
                            "trigger(s) or rule(s) fire during apply (%s): their tables are applied change by "
                            "change, in source order (slower; triggers write what the stream also brings)",
                            len(fires), ", ".join(fires))
            else:
                log.info("the target role may not set session_replication_role = replica; nothing fires on the "
                         "published tables (foreign keys, triggers and rules are held back until cutover or there "
                         "are none): set-based apply")
        self.repl = replication_connection(cfg.source, **NET_OPTIONS)
        self.cur = self.repl.cursor()
        options = {"proto_version": str(proto), "publication_names": cfg.publication, "messages": "true"}
        if proto >= 2:
            options["streaming"] = "on"
        self.cur.start_replication(slot_name=cfg.slot, decode=False, start_lsn=int(stored), options=options,
                                   status_interval=cfg.status_interval)
        self.sent_flush = stored
        log.info("streaming from %s slot %s at %s (protocol %d, streaming %s) into %s",
                 describe_dsn(cfg.source), cfg.slot, stored, proto, "on" if proto >= 2 else "off",
                 describe_dsn(cfg.target))

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        for c in (self.repl, self.target):
            if c is not None:
                try:
                    c.close()
                except psycopg2.Error:
                    pass

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        sink, cur = self.sink, self.cur
        assert sink is not None
        read = cur.read_message
        handle = self.handle
        fds = [self.repl, self.stop]
        while True:
            if self.stop.set:
                self.shutdown()
                return
            if self.stop.reload:
                self.reload()
            self.feedback()
            now = time.monotonic()
            if self.pausing(now):
                continue
            deadline = sink.deadline()
            if now >= self.next_gc:  # the automatic collector is off (tune_gc)
                self.next_gc = now + GC_EVERY
                gc.collect()
            if deadline is not None and now >= deadline and not sink.in_transaction():
                sink.flush(wait=False)
                continue
            if sink.resync_due and not sink.in_transaction():  # (seen with the last batch's progress)
                self.resync_pending()
            n = 0
            throttled = self.cfg.throttle is not None and self.cfg.throttle.active
            while n < BURST:
                msg = read()
                if msg is None:
                    if n:
                        # Catching up and the socket is drained: hand the lock to the batch writer,
                        # without pausing. A pause let the walsender fill the socket at nice 0, but at
                        # the default nice 10 (replicator/cli/priority.py) the scheduler runs the
                        # walsender first anyway, and no pause was 2-8% faster (bench/HISTORY.md).
                        time.sleep(0)
                    break
                handle(msg)
                n += 1
                if self.held is not None:
                    break  # the pause point: nothing after it is read until resumed
                if self.handed_off is not None:
                    metrics.STATE.phase = "done"
                    self.feedback(force=True)
                    log.info("cutover: handed off at %s; every transaction committed on the source up to there "
                             "is on the target. Stopping.", self.handed_off)
                    return
                if throttled and not sink.in_transaction() and sink.stats.rows_applied - self._paced_rows >= PACE_ROWS:
                    break  # pace between transactions, so the batch can commit while we wait
            if n:
                self.last_heard = time.monotonic()  # not `now`: handling the burst may have taken long
                if self.cfg.throttle is not None and self.cfg.throttle.active:
                    self.pace()
                continue
            if sink.batch_open() and not sink.in_transaction():
                sink.flush(wait=False)  # nothing more to read right now: no reason to wait for the deadline
                continue
            self.check_alive(now)
            if now >= self.next_resync_check and not sink.batch_open() and not sink.in_transaction():
                self.next_resync_check = now + RESYNC_POLL  # idle: no batch tells of a request
                if sink.pending_resyncs():
                    continue
            if (not sink.batch_open() and not sink.in_transaction() and now - self.last_idle >= IDLE_PROGRESS_EVERY):
                self.last_idle = now
                wal_end = Lsn(cur.wal_end)
                if wal_end > sink.stored:
                    sink.advance_idle(wal_end)
                    continue
            timeout = self.cfg.status_interval
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - now))
            if sink.writing():
                timeout = min(timeout, 0.002)  # confirm the batch as soon as it is durable
            select.select(fds, [], [], timeout)

    def pausing(self, now: float) -> bool:
        """The pause, between source transactions: look for a request (a busy stream sees it with
        each batch's progress row), reach its point (everything committed before it applied, nothing
        after), hold there answering the walsender, and resume when the request is gone. True while
        it holds (the loop reads nothing)."""
        sink = self.sink
        assert sink is not None
        if now >= self.next_pause_poll and not sink.in_transaction() and not sink.writing() and (
                self.paused or not sink.batch_open()):
            self.next_pause_poll = now + PAUSE_POLL
            sink.read_pause()
        req = sink.pause_request
        if req is None:
            self.pause_at = None
            if self.paused or self.held is not None:
                held, self.held, self.paused = self.held, None, False
                self.last_heard = time.monotonic()  # nothing was read while holding: not the source's silence
                metrics.STATE.phase = "streaming"
                log.info("resumed at %s", sink.stored)
                if held is not None:
                    self.handle(held)
            return False
        target = Lsn(0) if req == "" else Lsn.parse(req)
        if self.pause_at is not None and target != self.pause_at and (self.paused or self.held is not None):
            # moved on (verify --online holds first, then names its LSN): release what lies before it
            self.paused = False
            self.last_heard = time.monotonic()  # nothing was read while holding: not the source's silence
            if self.held is not None and self.held_lsn < target:
                held, self.held = self.held, None
                self.pause_at = target
                self.handle(held)
                return False
        self.pause_at = target
        if self.paused:
            self.keep_alive()  # the walsender times out a silent client (wal_sender_timeout)
            select.select([self.stop], [], [], min(PAUSE_POLL, self.cfg.status_interval))
            return True
        if sink.in_transaction():
            return False
        if self.held is None and self.pause_at and Lsn(self.cur.wal_end) < self.pause_at:
            return False  # not there yet: transactions before the point may still come
        if sink.batch_open():
            sink.flush()
        sink.mark_paused(str(self.pause_at) if self.pause_at else None)
        self.feedback(force=True)
        self.paused = True
        metrics.STATE.phase = "paused"
        log.info("paused at %s%s: applying nothing, keeping the slot and answering the source until resumed",
                 sink.stored, f" (asked to hold before {self.pause_at})" if self.pause_at else "")
        return True

    def resync_pending(self) -> None:
        """Re-copy the tables whose re-copy is asked (replicator/sync/resync.py), between two
        source transactions: the batch commits first."""
        sink = self.sink
        assert sink is not None
        sink.flush()
        tables = sink.pending_resyncs()
        for table in tables:
            log.info("re-copying %s while streaming (the stream waits)", table)
            started = time.monotonic()
            done = resync.resync_table(self.cfg.source, sink.conn, self.cfg.schema, self.cfg.slot, table,
                                       self.keep_alive)
            if done is None:
                continue
            lsn, rows, name = done
            sink.resynced(name, lsn)
            log.info("re-copied %s: %d rows in %.1f s, in a snapshot at %s (its changes before that are skipped)",
                     table, rows, time.monotonic() - started, lsn)
        sink.resync_due = False

    def pace(self) -> None:
        """Wait as long as the throttle says for what was applied since the last call, answering
        the walsender and committing due batches meanwhile."""
        assert self.sink is not None and self.cfg.throttle is not None
        rows, nbytes = self.sink.stats.rows_applied - self._paced_rows, self.bytes_read - self._paced_bytes
        self._paced_rows, self._paced_bytes = self.sink.stats.rows_applied, self.bytes_read
        until = time.monotonic() + self.cfg.throttle.pace(rows, nbytes)
        while not self.stop.set and not self.stop.reload:
            left = until - time.monotonic()
            if left <= 0:
                return
            deadline = self.sink.deadline()
            if deadline is not None and time.monotonic() >= deadline and not self.sink.in_transaction():
                self.sink.flush(wait=False)
            self.feedback()
            self.keep_alive()
            select.select([self.stop], [], [], min(left, 0.1))

    def reload(self) -> None:
        """SIGHUP: new budgets and batch limits, without losing the stream."""
        self.stop.reload = False
        self.stop.drain()
        if self.cfg.reload is None or self.sink is None:
            return
        try:
            budgets, limits = self.cfg.reload()
        except PgferryError as exc:
            log.error("configuration reload failed, keeping the current settings: %s", exc)
            return
        if self.cfg.throttle is not None:
            self.cfg.throttle.update(budgets)
        self.sink.limits = self.cfg.limits = limits
        log.info("configuration reloaded: batches of %d rows / %d bytes / %.0f ms", limits.rows, limits.bytes,
                 limits.seconds * 1000)

    def check_alive(self, now: float) -> None:
        """Notice a dead or black-holed source connection (no RST, just silence) within
        `network_timeout`: an idle walsender sends nothing, so ask it for a reply now and then.
        psycopg2 hides keepalives, but stamps `io_timestamp` on every read and on every feedback
        it sends: a read newer than the last feedback means the server answered."""
        cur = self.cur
        if cur.io_timestamp > cur.feedback_timestamp:
            self.last_heard = now
        silent = now - self.last_heard
        if silent > self.cfg.network_timeout:
            raise SessionRetry(f"no message from the source for {silent:.0f} s (network_timeout "
                         f"{self.cfg.network_timeout:.0f} s): the connection is presumed dead")
        if silent > self.cfg.network_timeout / 3 and now - self.last_ping > self.cfg.network_timeout / 6:
            self.last_ping = now
            cur.send_feedback(reply=True)

    def feedback(self, force: bool = False) -> None:
        assert self.sink is not None
        durable = self.sink.poll_durable()
        if durable > self.sent_flush or force:
            self.cur.send_feedback(write_lsn=int(durable), flush_lsn=int(durable), apply_lsn=int(durable),
                                   force=True)
            self.sent_flush = durable

    def drain(self) -> None:
        """Commit the open batch and wait until it is durable, then confirm it.

        Needed after a streamed block: its messages carry the LSNs of the in-progress transaction,
        which may be older than what we already confirmed. psycopg2 then treats everything as
        confirmed and, on the next keepalive, moves flush_lsn to the server's current position by
        itself (pqpath.c: explicitly_flushed_lsn >= last_msg_data_start). That is only safe when
        nothing received is still waiting to become durable on the target, which this ensures.
        """
        sink = self.sink
        assert sink is not None
        if sink.in_transaction():
            return
        sink.flush()
        if not self.wait_durable():
            raise SessionRetry(f"the target did not flush its WAL within {DURABLE_WAIT:.0f} s")
        self.feedback(force=True)

    def wait_durable(self) -> bool:
        """Wait (up to DURABLE_WAIT) until every committed batch is durable on the target, so the
        feedback that follows confirms all of it. False on time-out."""
        sink = self.sink
        assert sink is not None
        deadline = time.monotonic() + DURABLE_WAIT
        while sink.poll_durable() < sink.stored:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def shutdown(self) -> None:
        assert self.sink is not None
        metrics.STATE.phase = "stopped"  # stopping: what is applied stays, the rest comes on the next start
        if self.sink.in_transaction():
            self.sink.rollback()  # the rest of that source transaction was not received
        else:
            self.sink.flush()
        # the last batches were committed asynchronously: confirm them before leaving, or the source
        # resends (and the target skips) them on the next start
        if not self.wait_durable():
            log.warning("the target did not flush its WAL within %.0f s: confirming only up to %s", DURABLE_WAIT,
                        self.sink.durable_lsn)
        self.feedback(force=True)
        log.info("stopped at %s (everything committed on the source up to there is on the target)",
                 self.sink.durable_lsn)

    # -- messages ----------------------------------------------------------------------------
    def handle(self, raw: Any) -> None:
        payload = raw.payload
        self.bytes_read += len(payload)
        if (payload[:1] in CHANGE_TAGS and self.stream_xid is None and not self.skip
                and self.sink.apply_raw(payload)):  # type: ignore[union-attr]
            return  # the common case, parsed and folded in C (sink/_cfold.c)
        m: Message | None = decode_hot(payload, self.decoder.in_stream) if decode_hot is not None else None
        if m is None:  # not a hot message, or one the C parser declined: once more, in Python
            m = self.decoder.decode_py(payload)
        t = type(m)
        if self.stream_xid is not None:
            if t is StreamStop:
                self.stream_xid = None
                self.drain()
            else:
                self.spool.append(self.stream_xid, m.xid, payload)  # type: ignore[union-attr]
            return
        sink = self.sink
        assert sink is not None
        if t is Insert or t is Update or t is Delete:
            if not self.skip:
                sink.apply(m, len(payload))  # type: ignore[arg-type]
        elif t is Begin:
            if self.pause_at is not None and m.final_lsn >= self.pause_at:  # type: ignore[union-attr]
                self.held, self.held_lsn = raw, m.final_lsn  # type: ignore[union-attr]
                return
            self.skip = not sink.begin(m.xid, m.final_lsn)  # type: ignore[union-attr, arg-type]
        elif t is Commit:
            if not self.skip:
                self.commit(m.end_lsn, m.commit_time)  # type: ignore[union-attr]
            else:
                sink.end_skipped(m.end_lsn, m.commit_time)  # type: ignore[union-attr]
            self.skip = False
            self.received_data = True
        elif t is Relation:
            sink.relation(m)  # type: ignore[arg-type]
        elif t is Truncate:
            if not self.skip:
                sink.apply(m)  # type: ignore[arg-type]
        elif t is StreamStart:
            self.stream_xid = m.xid  # type: ignore[union-attr]
        elif t is StreamCommit:
            if self.pause_at is not None and m.commit_lsn >= self.pause_at:  # type: ignore[union-attr]
                self.held, self.held_lsn = raw, m.commit_lsn  # type: ignore[union-attr]
                return
            self.apply_streamed(m)  # type: ignore[arg-type]
        elif t is StreamAbort:
            self.spool.abort(m.xid, m.subxid)  # type: ignore[union-attr, arg-type]
        elif t is LogicalMessage:
            if m.prefix == HANDOFF_PREFIX:  # type: ignore[union-attr]
                if m.transactional and not self.skip:  # type: ignore[union-attr]
                    self.handoff = m.content.decode()  # type: ignore[union-attr]
            elif m.prefix == DDL_PREFIX:  # type: ignore[union-attr]
                if m.transactional and not self.skip:  # type: ignore[union-attr]
                    self.schema_change(m)  # type: ignore[arg-type]
            elif self.cfg.message_hook is not None and not (m.transactional and self.skip):  # type: ignore[union-attr]
                self.cfg.message_hook(m)  # type: ignore[arg-type]
        elif t is Type:
            sink.type(m.oid, m.namespace, m.name)  # type: ignore[union-attr]
        elif t is Origin:
            pass  # origins are not filtered
        else:
            raise FatalError(f"unexpected {type(m).__name__} message at {Lsn(raw.data_start)}: two-phase "
                             "decoding is not enabled by pgferry")

    def apply_streamed(self, m: StreamCommit) -> None:
        sink = self.sink
        assert sink is not None
        if not sink.begin(m.xid, m.commit_lsn):
            self.spool.discard(m.xid)
            sink.end_skipped(m.end_lsn, m.commit_time)
            return
        hook = self.cfg.message_hook
        count, size = self.spool.stats(m.xid)
        log.info("applying streamed transaction xid %d committed at %s: %d messages, %d bytes spooled",
                 m.xid, m.commit_lsn, count, size)
        for payload in self.spool.replay(m.xid):
            c = decode_message(payload, True)
            t = type(c)
            if t is Insert or t is Update or t is Delete or t is Truncate:
                sink.apply(c)  # type: ignore[arg-type]
            elif t is Relation:
                sink.relation(c)  # type: ignore[arg-type]
            elif t is Type:
                sink.type(c.oid, c.namespace, c.name)  # type: ignore[union-attr]
            elif t is LogicalMessage:
                if c.prefix == HANDOFF_PREFIX:  # type: ignore[union-attr]
                    if c.transactional:  # type: ignore[union-attr]
                        self.handoff = c.content.decode()  # type: ignore[union-attr]
                elif c.prefix == DDL_PREFIX:  # type: ignore[union-attr]
                    if c.transactional:  # type: ignore[union-attr]
                        self.schema_change(c)  # type: ignore[arg-type]
                elif hook is not None:
                    hook(c)  # type: ignore[arg-type]
            self.keep_alive()
        self.commit(m.end_lsn, m.commit_time)
        self.received_data = True

    def schema_change(self, m: LogicalMessage) -> None:
        """A schema change captured on the source (replicator/ddl/capture.py)."""
        try:
            cmd = parse_ddl(m.content)
        except msgspec.DecodeError as exc:
            raise FatalError(f"a schema-change message at {m.lsn} is not pgferry's ({exc}): is another tool "
                             f"emitting messages with the prefix {DDL_PREFIX!r}?") from None
        assert self.sink is not None
        self.sink.schema_change(cmd)

    def commit(self, end_lsn: Lsn, commit_time: int) -> None:
        """A source transaction (streamed or not) ends. One that carried a handoff marker is
        committed together with the cutover claim."""
        sink = self.sink
        assert sink is not None
        sink.commit(end_lsn, commit_time, hold=self.handoff is not None)
        if sink.schema_changes.volatile:  # a table to re-copy: once this batch is committed
            sink.schema_changes.volatile.clear()
            sink.resync_due = True
        if self.handoff is not None:
            cutover_id, self.handoff = self.handoff, None
            if sink.handoff(cutover_id):
                self.handed_off = end_lsn
                return
            log.warning("a handoff marker arrived for cutover %s, which gave up: streaming on", cutover_id)

    def keep_alive(self) -> None:
        """During a long replay nothing is read (psycopg2 sends its periodic status update only
        inside read_message), so send one every status interval: the walsender would otherwise
        time the connection out (wal_sender_timeout)."""
        now = time.monotonic()
        if now - self.last_status >= self.cfg.status_interval:
            self.last_status = now
            self.cur.send_feedback(force=True)


RESYNC_POLL = 2.0  # seconds between looks for tables to re-copy (pgferry resync)
PAUSE_POLL = 0.5  # seconds between looks for a pause request while idle or paused
GC_EVERY = 10.0  # seconds between the stream loop's own runs of the cycle collector


def tune_gc() -> None:
    """Turn Python's automatic cycle collector off while streaming; the loop runs it itself every
    GC_EVERY seconds (Session.run), so cycles (an exception's traceback, say) are still freed.

    A batch holds ~50,000 folded rows (a list and tuples each). With the default thresholds
    (700, 10, 10) the collector ran every 700 new objects and walked those live rows again and
    again, never finding garbage: the apply path makes no reference cycles. Off, the apply used
    2-2.6x less CPU than with the defaults (bench/apply.py, in process). Objects alive at start-up
    (modules, config) are frozen out of the periodic collections' walks."""
    gc.freeze()
    gc.disable()


def run_stream(cfg: StreamConfig, stop: StopFlag | None = None) -> int:
    """Stream until stopped (exit 0) or a fatal problem (PgferryError). Retries what can be retried."""
    if stop is None:
        stop = StopFlag()
        stop.install()
    tune_gc()
    spool = Spool(cfg.spool_dir)
    guard_done = threading.Event()
    if cfg.throttle is not None:
        threading.Thread(target=wal_guard, args=(cfg.source, cfg.slot, cfg.throttle, guard_done),
                         name="wal-guard", daemon=True).start()
    backoff = 0.2
    isolate_until = Lsn(0)
    stats = SinkStats(on_batch=metrics.observe_batch)  # one for the daemon, across reconnects
    ever_connected = False
    last_reason = None  # the failure being retried (logged once, until the stream moves again)
    announced = False  # "reconnected after" was logged for it
    try:
        while not stop.set:
            session = Session(cfg, stop, spool, stats, isolate_until)
            start: Lsn | None = None
            try:
                session.open()
                assert session.sink is not None
                metrics.STATE.session = session
                ever_connected = True
                start = session.sink.stored
                if last_reason is not None and not announced:
                    log.info("reconnected after: %s", last_reason)
                    announced = True
                session.run()
                return 0
            except ApplyError as exc:
                if exc.batch_has_earlier and exc.lsn is not None and exc.lsn > isolate_until:
                    # Commit the transactions before the failing one, then fail on it alone.
                    isolate_until = exc.lsn
                    log.info("a change failed in a batch; applying one transaction per batch up to %s", exc.lsn)
                    continue
                raise FatalError(str(exc)) from None
            except SinkError as exc:
                raise FatalError(str(exc)) from None
            except (ConnectError, UsageError) as exc:  # a server gone while reconnecting: retried
                if not ever_connected:
                    raise
                reason = str(exc)
            except PgferryError:
                raise
            except (psycopg2.Error, SessionRetry, OSError) as exc:
                if not (isinstance(exc, SessionRetry) or retryable(exc)):
                    if isinstance(exc, SLOT_LOST):
                        raise FatalError(f"cannot stream slot {cfg.slot!r}: {first_line(exc)}. If the slot is gone "
                                         "or invalidated, the target must be re-synced") from None
                    raise FatalError(first_line(exc)) from None
                reason = first_line(exc)
                if session.watchdog is not None and session.watchdog.presumed_dead:
                    reason = session.watchdog.presumed_dead
                if getattr(exc, "pgcode", None) and str(exc.pgcode)[:2] in ("53", "54"):  # type: ignore[union-attr]
                    # disk full, out of memory, too many connections: the target says "not now"
                    reason = f"the target cannot apply now: {reason}"
            finally:
                if session.sink is not None:
                    session.sink.rollback()
                session.close()
                spool.reset()
            if session.sink is not None and start is not None and session.sink.stored > start:
                backoff = 0.2  # the stream moved: a new incident, not the same one again
                last_reason = None
            if reason != last_reason:
                lost = "" if reason.startswith("the target cannot apply now") else "connection lost: "
                log.warning("%s%s; retrying in %.1fs (and again with backoff up to %.0fs, logged once)", lost, reason,
                            backoff, cfg.max_backoff)
                announced = False
            last_reason = reason
            _sleep(stop, backoff)
            backoff = min(backoff * 2, cfg.max_backoff)
        return 0
    finally:
        guard_done.set()
        spool.close()
        gc.enable()


def _sleep(stop: StopFlag, seconds: float) -> None:
    select.select([stop], [], [], seconds)

