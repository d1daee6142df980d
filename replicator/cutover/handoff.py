"""`pgferry cutover`: fence the source, hand off at one LSN, copy sequences, verify, move the
application, receipt.

Before anything changes:

0. ANALYZE the published tables (and the partitioned tables above them, the partitions below)
   never analyzed on the target (planner statistics for the application's first queries; before
   the fence: no downtime). With `--pgbouncer`, look at its entry first (SHOW DATABASES, SHOW
   CONFIG, the config file's line): a missing entry, session pooling, a config file pgferry cannot
   read or write, or an entry paused already is refused here (pgbouncer.py), when there is
   nothing to put back.
1. Register the cutover on the target (`control`: state 'requested', a fresh id, the fence mode,
   and for PgBouncer the admin DSN without its password, the config file and the entry's line as
   it is). Each step below is recorded in `control.step` before it starts, and what it is about to
   change (paused, repointed, resumed) before it changes it: a cutover killed anywhere leaves what
   `pgferry cutover --undo`, the next `pgferry cutover` and `status` need (control.py).

The write downtime:

2. `--pgbouncer`: `PAUSE` its database. Transactions in flight finish, new ones queue inside
   PgBouncer, its server connections close (within min(--timeout, 30) s, else it is resumed and
   nothing was changed). From here on clients wait; they are not refused.
3. Fence (`--fence read-only`, default; fence.py): in one source transaction, LOCK the published
   tables (with the partitions and partitioned tables around them) IN SHARE ROW EXCLUSIVE MODE,
   which waits for the writers in flight (a client session still holding a write open after
   --fence-wait seconds is ended: its transaction never commits), then create the statement-level
   trigger `pgferry_fence` on each, ENABLE ALWAYS. Every later INSERT, UPDATE, DELETE, TRUNCATE
   or COPY on them fails with SQLSTATE 25006, whatever the role or session settings; reads go on.
   `--fence none` leaves stopping the writers to the operator.
4. Write the handoff marker through the source's WAL: a transactional logical message carrying
   the cutover id, committed on its own. Everything committed on the published tables before the
   fence is before the marker in commit order, and nothing can commit on them after it.
5. The daemon applies every transaction up to and including the marker's, claims the cutover in
   that same target transaction (state 'handed_off', handoff LSN = the marker's commit end LSN,
   which is also the stored progress) and stops. So the handoff LSN equals the applied LSN by
   construction.
6. Copy sequence values, then verify every table (`--verify`: checksum, or count for a shorter
   write downtime). The source is fenced, so neither side moves while they are compared.
7. If every table matched: create what was held back (replicator/sync/holdback.py): triggers,
   rules and foreign keys NOT VALID, in one transaction, before the application moves.
8. Move the application: run `--switch-command` (through the shell, with PGFERRY_HANDOFF_LSN,
   PGFERRY_CUTOVER_ID and PGFERRY_TARGET_DSN set, within --switch-timeout); then, with
   `--pgbouncer`, rewrite its entry to the target in the config file, RELOAD, check SHOW DATABASES
   runs it there, and RESUME: the queued clients go on on the target. From the RESUME on the
   application may write on the target, so nothing is undone after it.
9. Mark the cutover 'done' (with the receipt, in `control`), validate the foreign keys (the
   application's writes go on) and write the receipt: a key the data breaks is named with its
   rows, and the exit code is 1, but the handoff stands. The fence stays up: the old server keeps
   refusing writes until `pgferry cleanup`.

Undo. Any failure before the application moved puts back what this run changed, in this order:
PgBouncer's entry (if it was rewritten), the fence (dropped, so writers on the source go on),
PgBouncer's pause (resumed after the fence is gone, so the clients it lets through may write),
and the request (an UPDATE that races the daemon's claim through the same row: 'cancelled' when
the daemon had not claimed it, and it will ignore the marker; 'undone' after the handoff, when
the daemon has stopped: `pgferry start` streams again). That covers a timeout waiting for the
daemon, a failed verify (the receipt is printed with ok false), a failing or slow switch command
and a PgBouncer that does not take the new entry; exit 1. What the switch command itself changed
is not undone.

Killed part-way (SIGKILL, a lost machine): the next `pgferry cutover` reads `control`. Before
the handoff ('requested', or a fence left up) it undoes the earlier run, then cuts over afresh;
after it ('handed_off') it finishes that cutover: the PgBouncer on record paused again if need
be, sequences, verify, the switch (the --switch-command given to this run: it may run a second
time), receipt with resumed_after_interruption. `pgferry cutover --undo` undoes instead; it is
refused once the application moved.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import psycopg2
import psycopg2.extensions

from sink import failpoints
from sink.state import HANDOFF_PREFIX, ensure_schema, pgferry_session, quote_ident, readable_name

from ..errors import PgferryError, UsageError
from ..source import connect, describe_dsn, published_tables
from ..stream import pause
from ..sync import holdback
from ..sync.sequences import copy_sequences
from . import changed, control, fallback, fence
from .changed import ChangeReader
from .fence import Fence
from .online import SnapshotUnavailable, catch_up_round, print_online, verify_online
from .pgbouncer import Bouncer, Entry, target_settings
from .verify import TableResult, verify

log = logging.getLogger("pgferry.cutover")

# --verify online: catch-up rounds while the last comparison took longer than this (seconds)
ROUND_WHILE_S = 1.0


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class CutoverOptions:
    fence: str = "read-only"
    timeout: float = 60.0
    receipt_path: str | None = None
    verify_mode: str = "checksum"
    fence_wait: float = 5.0
    pgbouncer: str | None = None  # the admin console's DSN
    pgbouncer_database: str | None = None  # default: the source DSN's dbname
    pgbouncer_config: str | None = None
    pgbouncer_target: str | None = None
    switch_command: str | None = None
    switch_timeout: float = 60.0
    fallback: bool = False  # keep a way back (cutover/fallback.py)
    online_max_rate: float | None = None  # --verify online: rows per second before the fence
    online_rounds: int = 4  # --verify online: catch-up rounds at most (--catch-up-rounds)


class Cutover:
    """One `pgferry cutover` run: a fresh one, or the end of one killed after its handoff."""

    def __init__(self, source: str, target: str, publication: str, slot: str, schema: str,
                 opts: CutoverOptions, out: IO[str]) -> None:
        self.source, self.target, self.publication = source, target, publication
        self.slot, self.schema, self.opts, self.out = slot, schema, opts, out
        self.cutover_id = uuid.uuid4().hex
        self.receipt: dict[str, Any] = {}
        self.bouncer: Bouncer | None = None
        self.entry: Entry | None = None
        self.pb: dict[str, Any] = {}  # the record of what was done to PgBouncer (control.pgbouncer)
        self.fenced = 0.0  # monotonic time the write downtime started (the pause, or the fence)
        self.paused_at: float | None = None
        self.switched = False  # the application may now write on the target: no undo past this
        self._step: tuple[str, float] | None = None
        self.fallback: dict[str, Any] | None = None  # the reverse slot once made (--fallback)
        # a rollback (the cutover in reverse): the old source's fence comes down before the
        # application moves back, and goes up again if the rollback fails after that
        self.old_source: tuple[str, str] | None = None  # (its DSN, the forward publication)
        self.old_fence_lifted = False
        self.forward: tuple[str, str] | None = None  # (the new server's DSN, the forward slot)
        self.changes: ChangeReader | None = None  # --verify online: the source's changes since the comparison
        self.online: dict[str, Any] | None = None  # --verify online: what the comparison before the fence found

    def record(self, **cols: Any) -> None:
        """Store the run's progress (a step begins: the time the last one took goes in the receipt)."""
        if "step" in cols:
            now = time.monotonic()
            if self._step is not None:
                steps = self.receipt.setdefault("steps_s", {})
                steps[self._step[0]] = round(steps.get(self._step[0], 0) + now - self._step[1], 3)
            self._step = (cols["step"], now)
        control.update(self.target, self.schema, self.slot, self.cutover_id, **cols)

    # -- 1. before anything changes -------------------------------------------------------------
    def verify_online_first(self) -> None:
        """--verify online: every row compared while the daemon streams (cutover/online.py); the
        temporary slot stays, read by `self.changes`, so that under the fence only the rows changed
        since are compared (cutover/changed.py). A difference stops the cutover here: nothing changed."""
        log.info("verify online: comparing every table while the daemon streams, before the fence")
        res = verify_online(self.source, self.target, self.publication, self.slot, self.schema, None, "checksum",
                            self.opts.timeout, self.opts.online_max_rate, progress=sys.stderr, follow=True)
        self.changes = res.changes
        bad = [t for t in res.tables if not t.match]
        self.online = {"lsn": res.lsn, "tables": len(res.tables), "rows": sum(t.source_rows for t in res.tables),
                       "daemon_held_s": res.held_s, "snapshot_age_s": res.snapshot_age_s, "took_s": res.took_s,
                       "different": [{"name": t.name, "differences": t.differences} for t in bad],
                       "table_rows": {t.name: t.source_rows for t in res.tables}}
        if bad:
            print_online(res, False, sys.stderr)
            names = ", ".join(t.name for t in bad)
            raise PgferryError(f"the online verify found differences as of {res.lsn} in {names} (listed above)"
                               ": nothing was changed, the source takes writes. Fix the target (or "
                               "`pgferry resync` those tables), then cut over again")
        log.info("verify online: %d tables equal as of %s (%.1f s)", len(res.tables), res.lsn, res.took_s)
        # Catch-up rounds: what changed during the comparison, compared while streaming, until a
        # round is short; the fence then only waits for what was written during the last one.
        last, rounds = res.took_s, self.online.setdefault("rounds", [])
        assert self.changes is not None
        while last > ROUND_WHILE_S and len(rounds) < self.opts.online_rounds:
            try:
                rnd = catch_up_round(self.source, self.target, self.slot, self.schema, self.changes, len(rounds) + 1,
                                     self.opts.timeout)
            except SnapshotUnavailable as exc:
                log.warning("verify online: no catch-up round (%s); the fence compares all changed since %s", exc,
                            self.changes.changes.since)
                break
            bad = [t for t in rnd.tables if not t.match]
            rounds.append({"lsn": rnd.lsn, "keys": rnd.window.key_count(), "tables": len(rnd.tables),
                           "daemon_held_s": rnd.held_s, "took_s": rnd.took_s,
                           "different": [{"name": t.name, "differences": t.differences} for t in bad]})
            if bad:
                for t in bad:
                    print(f"{t.name}: DIFFERENT\n" + "".join(f"    {d}\n" for d in t.differences), file=sys.stderr,
                          end="")
                raise PgferryError(f"the online verify's catch-up round found differences as of {rnd.lsn} in "
                                   f"{', '.join(t.name for t in bad)} (listed above): nothing was changed, the "
                                   "source takes writes. Fix the target (or `pgferry resync` those tables), then "
                                   "cut over again")
            log.info("verify online: round %d: %d changed rows equal as of %s (%.1f s)", len(rounds),
                     rnd.window.key_count(), rnd.lsn, rnd.took_s)
            last = rnd.took_s
        log.info("verify online: every row equal; the cutover goes on")

    def _not_paused(self) -> None:
        paused = pause.read(self.target, self.schema, self.slot)
        if paused is not None:
            raise PgferryError(f"the daemon is paused ({paused.requested_by}, since {paused.requested_at}): it would "
                               "never apply up to the handoff. `pgferry resume` first")

    def precheck(self) -> None:
        """What refuses the cutover before anything changes (and before a long online verify)."""
        o = self.opts
        if o.verify_mode == "online" and o.fence != "read-only":
            raise UsageError("--verify online needs the fence (--fence read-only): the rows changed since the online "
                             "comparison are read from the source's stream up to the handoff, and a write after it "
                             "would be in no comparison")
        self._not_paused()
        if o.fallback:
            fallback.check_ready(self.source, self.target, self.schema, self.slot)
        if o.pgbouncer:
            database = o.pgbouncer_database or psycopg2.extensions.parse_dsn(self.source).get("dbname") or ""
            self.bouncer = Bouncer(o.pgbouncer, database, o.pgbouncer_config)
            self.entry = self.bouncer.inspect()
            if self.entry.paused:
                raise PgferryError(f"PgBouncer at {self.bouncer.where} has {database!r} paused already: RESUME it "
                                   "(or run `pgferry cutover --undo` if an earlier cutover paused it)")
            self.pb = {"admin": _without_password(o.pgbouncer), "database": database, "conffile": self.entry.conffile,
                       "line": self.entry.line, "paused": False, "repointed": False, "resumed": False,
                       "new": target_settings(self.target, o.pgbouncer_target)}

    def prepare(self) -> None:
        o = self.opts
        self._not_paused()
        self.receipt = {"cutover_id": self.cutover_id, "direction": "reverse" if self.old_source else "forward",
                        "fence": o.fence, "fenced_at": None,
                        "analyzed": analyze_tables_without_statistics(self.source, self.target, self.publication)}
        if self.online is not None:
            self.receipt["online_verify"] = self.online
        fb_slot, fb_pub = fallback.names(self.slot, self.publication)
        requested = {"state": "requested", "slot": fb_slot, "publication": fb_pub} if o.fallback else None
        dst = connect(self.target, "target")
        try:
            cur = dst.cursor()
            ensure_schema(cur, self.schema)
            cur.execute(f"SELECT 1 FROM {quote_ident(self.schema)}.progress WHERE slot_name = %s", (self.slot,))
            if cur.fetchone() is None:
                raise PgferryError(f"target {describe_dsn(self.target)} has no pgferry progress for slot "
                                   f"{self.slot!r}: run `pgferry start` first")
            cur.execute(f"INSERT INTO {quote_ident(self.schema)}.control (slot_name, cutover_id, state, requested_at, "
                        "step, fence, pgbouncer, receipt, updated_at, fallback) VALUES (%s, %s, 'requested', now(), "
                        "'requested', %s, %s, NULL, now(), %s) ON CONFLICT (slot_name) DO UPDATE SET cutover_id = "
                        "excluded.cutover_id, state = 'requested', requested_at = now(), handoff_lsn = NULL, done_at = "
                        "NULL, step = excluded.step, fence = excluded.fence, pgbouncer = excluded.pgbouncer, receipt = "
                        "NULL, updated_at = now(), fallback = excluded.fallback",
                        (self.slot, self.cutover_id, o.fence, json.dumps(self.pb) if self.pb else None,
                         json.dumps(requested) if requested else None))
            dst.commit()
        finally:
            dst.close()

    # -- 2. pause, fence, hand off ---------------------------------------------------------------
    def hand_off(self) -> dict[str, Any]:
        o = self.opts
        if self.changes is not None:  # a reader that died would be found only under the fence
            self.changes.check()
        if self.bouncer is not None:
            self.pb["paused"] = True
            self.record(step="pausing PgBouncer", pgbouncer=self.pb)  # before: a kill leaves it to undo
            self.paused_at = time.monotonic()
            self.bouncer.pause(min(o.timeout, 30.0))
            log.info("PgBouncer paused %s: new transactions wait there", self.pb["database"])
        if o.fence == "read-only":
            self.record(step="fencing")
            f = Fence(self.source, self.publication, self.schema, self.cutover_id, o.fence_wait, o.timeout)
            tables = f.raise_()
            self.receipt["fenced_tables"] = len(tables)
            self.receipt["sessions_ended"] = len(f.ended)
            failpoints.hit("cutover_after_fence")
        self.fenced = self.paused_at if self.paused_at is not None else time.monotonic()
        self.receipt["fenced_at"] = _now()
        src = connect(self.source, "source")
        try:
            with src.cursor() as c:
                c.execute("SET default_transaction_read_only = off")  # (a source read-only by default)
                c.execute("SELECT pg_logical_emit_message(true, %s, %s)::text", (HANDOFF_PREFIX, self.cutover_id))
                (marker,) = c.fetchone()
            src.commit()
        finally:
            src.close()
        self.record(step="waiting for the daemon")
        log.info("handoff marker written at %s; waiting for the daemon (timeout %.0f s)", marker, o.timeout)
        deadline = time.monotonic() + o.timeout
        while True:
            rec = control.read(self.target, self.schema, self.slot)
            if rec is not None and rec.cutover_id == self.cutover_id and rec.state == "handed_off":
                break
            if time.monotonic() > deadline:
                if control.cancel_or_undo(self.target, self.schema, self.slot, self.cutover_id) == "cancelled":
                    raise PgferryError(f"cutover timed out after {o.timeout:.0f} s: the daemon did not apply up to "
                                       f"the handoff marker at {marker} (is `pgferry start` running and caught up?). "
                                       "Nothing was handed off" + self._undo_said())
                continue  # the daemon claimed it just now
            time.sleep(0.05)
        self.receipt["handed_off_after_s"] = round(time.monotonic() - self.fenced, 3)
        failpoints.hit("cutover_after_handoff")
        return {"handoff_lsn": rec.handoff_lsn, "applied_lsn": rec.applied_lsn}

    def _undo_said(self) -> str:
        parts = []
        if self.opts.fence == "read-only":
            parts.append("the fence is lifted")
        if self.bouncer is not None:
            parts.append("PgBouncer resumed on the source")
        return "; " + " and ".join(parts) if parts else " (no fence was raised: --fence none)"

    # -- 3. with the source fenced: sequences, verify, held-back objects ----------------------------
    def check(self, handoff: dict[str, Any]) -> bool:
        r = self.receipt
        r["handoff_lsn"], r["applied_lsn"] = handoff["handoff_lsn"], handoff["applied_lsn"]
        self.record(step="copying sequences")
        r["sequences"] = [{"name": n, "value": v} for n, v in copy_sequences(self.source, self.target)]
        results = self._verify()
        r["tables"] = [{"name": t.name, "source_rows": t.source_rows, "target_rows": t.target_rows,
                        "match": t.match, "differences": t.differences} for t in results]
        r["ok"] = all(t.match for t in results) and handoff["handoff_lsn"] == handoff["applied_lsn"]
        if r["ok"]:  # the foreign keys, triggers and rules held back: before the application moves
            self.record(step="creating what was held back")
            r["held_back_created_s"] = round(holdback.create(self.target, self.schema, self.slot), 3)
        return bool(r["ok"])

    def _verify(self) -> list[TableResult]:
        r, mode = self.receipt, self.opts.verify_mode
        if self.changes is None:
            if mode == "online":  # a cutover killed after its handoff: the stream of changes went with it
                r["verify_note"] = "online: the changes since the online verify were lost with the run killed; " \
                                   "compared whole (checksum)"
                mode = "checksum"
            self.record(step="verifying")
            r["verify"] = mode
            return verify(self.source, self.target, self.publication, None, mode)
        self.record(step="reading the changes since the online verify")
        r["verify"] = "online"
        ch = self.changes.wait_for_marker(self.cutover_id, self.opts.timeout)
        self.record(step="verifying the changed rows")
        results = changed.compare(self.source, self.target, ch)
        r["changes_verified"] = {
            "since_lsn": ch.since, "transactions": ch.transactions, "changes": ch.changes,
            "keys": ch.key_count(), "tables_by_key": sorted(readable_name(*t) for t in ch.keys),
            "tables_whole": {readable_name(*t): why for t, why in sorted(ch.whole.items())}, "compare_s": ch.compare_s,
            "not_covered": "a write on the target behind pgferry's back after since_lsn, to a row the source did "
                           "not change since"}
        return results

    # -- 4. a way back, then move the application ------------------------------------------------
    def make_fallback(self) -> None:
        """--fallback: the reverse slot, while nothing writes on the target yet (cutover/fallback.py)."""
        self.record(step="creating the fallback")
        self.fallback = fallback.establish(self.source, self.target, self.publication, self.slot, self.schema)
        self.record(fallback=self.fallback)
        self.receipt["fallback"] = dict(self.fallback)

    def switch(self) -> None:
        o, r = self.opts, self.receipt
        if self.old_source is not None:  # a rollback: the old source takes the application's writes again
            self.record(step="lifting the old source's fence")
            self.old_fence_lifted = True
            r["old_source_fence_lifted"] = len(fence.lift(self.old_source[0], self.schema))
        if o.switch_command:
            self.record(step="running the switch command")
            try:
                r["switch_command"] = run_switch_command(o.switch_command, r["handoff_lsn"], self.cutover_id,
                                                         self.target, o.switch_timeout)
            except PgferryError as exc:
                r["switch_command"] = {"command": o.switch_command, "ok": False, "error": str(exc)}
                raise
            if self.bouncer is None:
                self.record(step=control.MOVED_BY_COMMAND)  # a later run must not undo it: the application writes there
        if self.bouncer is not None and self.entry is not None:
            self.pb["repointed"] = True
            self.record(step="repointing PgBouncer", pgbouncer=self.pb)
            line = self.bouncer.repoint(self.entry, self.pb["new"])
            failpoints.hit("cutover_after_repoint")
            waiting, longest = self.bouncer.waiting()
            self.pb["resumed"] = True
            self.record(pgbouncer=self.pb)
            self.switched = True  # from here on the application may write on the target
            self.bouncer.resume()
            assert self.paused_at is not None
            r["client_pause_s"] = round(time.monotonic() - self.paused_at, 3)
            r["clients_waiting"] = waiting
            r["longest_client_wait_s"] = round(longest, 3)
            r["pgbouncer"] = {"database": self.pb["database"], "entry": line}
            log.info("PgBouncer sends %s to the target now (%d client(s) waited, the longest %.2f s)",
                     self.pb["database"], waiting, longest)
        self.switched = True
        failpoints.hit("cutover_after_switch")

    def undo(self) -> list[str]:
        """Put back what this run changed (it failed before the application moved). Each step is
        tried whatever the others did (an unreachable target must not leave the source fenced and
        PgBouncer paused); what failed is logged with what to run."""
        did: list[str] = []
        failed: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # best effort: the next steps matter more than this one's error
                failed.append(f"{what}: {exc}")

        def refence() -> None:  # a rollback that failed once the old source's fence was down (maybe in a
            assert self.old_source is not None  # run killed earlier: the catalog tells)
            if not fence.source_fenced(self.old_source[0]):
                Fence(self.old_source[0], self.old_source[1], self.schema, self.cutover_id, self.opts.fence_wait,
                      self.opts.timeout).raise_()
                did.append("the old source is fenced again")
            self.old_fence_lifted = False

        def entry() -> None:
            assert self.bouncer is not None and self.entry is not None
            self.bouncer.write_line(self.entry, self.entry.line)
            did.append("PgBouncer's entry restored")

        def lift() -> None:
            if fence.lift(self.source, self.schema):
                did.append("the fence is lifted")

        def resume() -> None:
            assert self.bouncer is not None
            if self.bouncer.resume():
                did.append("PgBouncer resumed on the source")  # after the lift: its clients may write

        def drop_fallback() -> None:  # by name: a kill or failure part-way through making it left no record
            fb_slot, fb_pub = fallback.names(self.slot, self.publication)
            gone = fallback.drop(self.target, self.fallback or {"slot": fb_slot, "publication": fb_pub})
            did.extend(f"dropped the fallback's {what}" for what in gone)
            self.fallback = None
            self.record(fallback=None)

        if self.old_source is not None:
            step("fencing the old source again", refence)
        if self.bouncer is not None and self.entry is not None and self.pb.get("repointed"):
            step("restoring PgBouncer's entry", entry)
        if self.opts.fence == "read-only":
            step("lifting the fence", lift)
        if self.bouncer is not None and self.pb.get("paused"):
            step("resuming PgBouncer", resume)
        if self.opts.fallback or self.fallback is not None:
            step("dropping the fallback's slot and publication", drop_fallback)
        state = "?"

        def cancel() -> None:
            nonlocal state
            state = control.cancel_or_undo(self.target, self.schema, self.slot, self.cutover_id)
            if self.pb:
                self.pb.update(paused=False, repointed=False)
                self.record(pgbouncer=self.pb, step=f"undone after a failure ({state})")

        step("recording the undo", cancel)
        if failed:
            log.error("the undo could not finish: %s. Run `pgferry cutover --undo` (or `pgferry rollback --undo`) "
                      "once the servers are reachable", "; ".join(failed))
        return did

    def finish(self) -> int:
        r = self.receipt
        conn = connect(self.source, "source")
        try:
            r["refused_writes"] = fence.refused(conn.cursor(), self.schema)
        finally:
            conn.close()
        self.record(step="done")
        r["client_errors"] = bool(r.get("refused_writes") or r.get("sessions_ended"))
        r["write_downtime_s"] = round(time.monotonic() - self.fenced, 3)
        r["finished_at"] = _now()
        dst = connect(self.target, "target")
        try:
            with dst.cursor() as cur:
                s = quote_ident(self.schema)
                cur.execute(f"UPDATE {s}.control SET state = 'done', step = 'done', done_at = now(), receipt = %s, "
                            "updated_at = now() WHERE slot_name = %s AND cutover_id = %s",
                            (json.dumps(r), self.slot, self.cutover_id))
                cur.execute(f"UPDATE {s}.sync SET phase = 'done' WHERE slot_name = %s", (self.slot,))
            dst.commit()
        finally:
            dst.close()
        if self.fallback is not None:  # its WAL is of no use now; the reverse stream writes on the old source
            r["fallback"]["forward_slot_dropped"] = fallback.drop_forward_slot(self.source, self.slot)
        if self.forward is not None:  # a rollback: the forward cutover's fallback has been used
            fb = control.read(self.forward[0], self.schema, self.forward[1])
            if fb is not None and fb.fallback:
                r["fallback_dropped"] = fallback.drop_after_rollback(self.source, fb.fallback)
                fallback.set_record(self.forward[0], self.schema, self.forward[1],
                                    {**fb.fallback, "state": "rolled_back", "rolled_back_at": _now(),
                                     "rollback_handoff_lsn": r["handoff_lsn"]})
        log.info("cutover done at %s: %s", r["handoff_lsn"], "the application is on the target"
                 if self.bouncer is not None or self.opts.switch_command else "point the application at the target")
        # Foreign keys came back NOT VALID; validating them scans, but lets the application write.
        r["constraints_validated_s"] = round(holdback.validate(self.target, self.schema, self.slot), 3)
        conn = connect(self.target, "target")
        try:
            held = holdback.listing(conn.cursor(), self.schema, self.slot)
        finally:
            conn.close()
        r["held_back"] = [msgspec.to_builtins(h) for h in held]
        invalid = [h for h in held if h.state == "invalid"]
        r["constraints_ok"] = not invalid
        _write_receipt(r, self.out, self.opts.receipt_path)
        if invalid:
            raise PgferryError("cutover done (the handoff stands), but " + "; ".join(
                f"foreign key {h.name} on {h.table} is NOT VALID: {h.detail}" for h in invalid)
                + ". Fix those rows on the target, then ALTER TABLE ... VALIDATE CONSTRAINT ...")
        return 0

    # -- the whole run ---------------------------------------------------------------------------
    def run(self, resume: control.Record | None = None) -> int:
        try:
            return self._run(resume)
        finally:
            if self.changes is not None:
                self.changes.close()

    def _run(self, resume: control.Record | None) -> int:
        if resume is None:
            self.precheck()
            if self.opts.verify_mode == "online":
                self.verify_online_first()
            self.prepare()
            try:
                handoff = self.hand_off()
            except BaseException:
                self.undo()
                raise
        else:  # a cutover killed after its handoff: the source is still fenced, carry on from there
            handoff = self._adopt(resume)
            if self.switched:  # killed after the application moved: verified then; only the end is left
                self.receipt.update(handoff_lsn=handoff["handoff_lsn"], applied_lsn=handoff["applied_lsn"])
                return self.finish()
        try:
            ok = self.check(handoff)
            if ok:
                if self.opts.fallback:
                    self.make_fallback()
                self.switch()
        except BaseException as exc:
            if self.switched:
                raise
            did = self.undo()
            if isinstance(exc, PgferryError):
                if self.receipt.get("switch_command", {}).get("ok") is False:
                    self.receipt["ok"] = False
                    _write_receipt(self.receipt, self.out, self.opts.receipt_path)
                raise PgferryError(f"{exc}. The cutover is undone ({', '.join(did) or 'nothing to put back'}); "
                                   "the source takes writes again: `pgferry start` to stream, then cut over again"
                                   ) from None
            raise
        if not ok:
            _write_receipt(self.receipt, self.out, self.opts.receipt_path)
            did = self.undo()
            bad = [t["name"] for t in self.receipt["tables"] if not t["match"]]
            raise PgferryError(f"cutover verification failed ({', '.join(bad) or 'handoff LSN mismatch'}): "
                               f"{', '.join(did) or 'nothing to put back'}; the source takes writes again. "
                               "Investigate, then `pgferry start` to resume streaming")
        return self.finish()

    def _adopt(self, rec: control.Record) -> dict[str, Any]:
        self.cutover_id = rec.cutover_id
        log.warning("cutover %s was interrupted after its handoff at %s (last step: %s): finishing it",
                    rec.cutover_id, rec.handoff_lsn, rec.step)
        self.receipt = dict(rec.receipt or {}) or {"cutover_id": rec.cutover_id, "fence": rec.fence,
                                                   "fenced_at": None}
        self.receipt["resumed_after_interruption"] = True
        self.receipt.setdefault("direction", "reverse" if self.old_source else "forward")
        self.opts.fence = rec.fence or self.opts.fence
        self.opts.fallback = bool(rec.fallback)  # (making it again reuses what was made: idempotent)
        fb = rec.fallback or {}
        if fb.get("state") == "active":
            self.fallback = dict(fb)
            self.receipt["fallback"] = dict(fb)
        self.switched = rec.step == control.MOVED_BY_COMMAND or bool((rec.pgbouncer or {}).get("resumed"))
        if self.switched:
            log.warning("the application had moved to the target before the interruption: finishing without "
                        "pausing, verifying or undoing anything")
            self.fenced = time.monotonic()
            return {"handoff_lsn": rec.handoff_lsn, "applied_lsn": rec.applied_lsn}
        if self.opts.fence == "read-only" and not fence.source_fenced(self.source):
            log.warning("the fence of cutover %s is gone from the source: verify will tell whether anything was "
                        "written there since the handoff", rec.cutover_id)
        found = control.bouncer_of(rec, self.opts.pgbouncer)
        if found is not None:
            self.bouncer, stored = found
            self.pb = dict(rec.pgbouncer or {})
            self.entry = self.bouncer.inspect()
            self.entry.line = stored.line  # the line as it was before the cutover, to put back
            if not self.pb.get("paused"):
                self.pb["paused"] = True
                self.bouncer.pause(min(self.opts.timeout, 30.0))
            self.paused_at = time.monotonic()
        self.fenced = time.monotonic()
        return {"handoff_lsn": rec.handoff_lsn, "applied_lsn": rec.applied_lsn}


def run_switch_command(command: str, handoff_lsn: str, cutover_id: str, target: str,
                       timeout: float) -> dict[str, Any]:
    """Run the operator's `--switch-command` (through the shell) with the handoff in its
    environment; a failure (exit code, timeout) raises, like a failed verify."""
    env = {**os.environ, "PGFERRY_HANDOFF_LSN": handoff_lsn, "PGFERRY_CUTOVER_ID": cutover_id,
           "PGFERRY_TARGET_DSN": target}
    started = time.monotonic()
    try:
        res = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        raise PgferryError(f"the switch command did not finish within {timeout:.0f} s: {command}") from None
    took = round(time.monotonic() - started, 3)
    for line in (res.stdout + res.stderr).splitlines()[-20:]:
        log.info("switch command: %s", line)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise PgferryError(f"the switch command failed (exit {res.returncode}: {tail[0]})")
    return {"command": command, "exit_code": 0, "seconds": took, "ok": True}


def _without_password(dsn: str) -> str:
    try:
        p = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return ""
    p.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in p.items())


def run_rollback(source: str, target: str, publication: str, slot: str, schema: str, opts: CutoverOptions,
                 out: IO[str] = sys.stdout, undo: bool = False) -> int:
    """`pgferry rollback`: after a cutover with --fallback, the cutover in reverse. The reverse
    daemon (`pgferry start`, streaming the new server into the old source) applies up to a handoff
    on the new server; its fence goes up, the old source's comes down, the application moves back."""
    rec = control.read(target, schema, slot)
    fb = (rec.fallback if rec is not None else None) or {}
    if rec is None or rec.state != "done" or fb.get("state") != "active":
        why = (f"the fallback is {fb['state'].replace('_', ' ')}" if fb.get("state") in ("stopped", "rolled_back")
               else "no cutover with --fallback has finished")
        raise PgferryError(f"nothing to roll back to: {why}. A rollback needs `pgferry cutover --fallback` done and "
                           "the reverse `pgferry start` streaming")
    if opts.fallback:
        raise UsageError("--fallback is for `pgferry cutover`: a rollback keeps no way forward")
    if opts.verify_mode == "online":
        raise UsageError("--verify online is for `pgferry cutover`: a rollback verifies with checksum or count")

    if opts.pgbouncer and not opts.pgbouncer_database:  # the entry the cutover moved, not the new server's name
        opts.pgbouncer_database = ((rec.pgbouncer or {}).get("database")
                                   or psycopg2.extensions.parse_dsn(source).get("dbname"))

    def reverse(c: Cutover) -> None:
        c.old_source = (source, publication)
        c.forward = (target, slot)

    # the new server is the reverse's source, the old source its target; the reverse state is on the old
    rc = run_cutover(target, source, fb["publication"], fb["slot"], schema, opts, out, undo, configure=reverse)
    if undo and not fence.source_fenced(source):  # killed after it lifted the old source's fence
        Fence(source, publication, schema, rec.cutover_id, opts.fence_wait, opts.timeout).raise_()
        print("pgferry rollback --undo: the old source is fenced again (the application stays on the new server)",
              file=sys.stderr)
    return rc


def run_cutover(source: str, target: str, publication: str, slot: str, schema: str, opts: CutoverOptions,
                out: IO[str] = sys.stdout, undo: bool = False,
                configure: Callable[[Cutover], None] | None = None) -> int:
    def made(c: Cutover) -> Cutover:
        if configure is not None:
            configure(c)
        return c

    rec = control.read(target, schema, slot)
    if undo:
        if rec is None:
            lifted = fence.lift(source, schema)
            print("pgferry cutover --undo: " + (f"the fence is lifted ({len(lifted)} table(s))" if lifted
                                                else "no cutover to undo"), file=sys.stderr)
            return 0
        did = control.undo(source, target, schema, slot, rec, opts.pgbouncer)
        print(f"pgferry cutover --undo: cutover {rec.cutover_id}: " + ("; ".join(did) or "nothing to undo"),
              file=sys.stderr)
        return 0
    if rec is not None and rec.state == "done":
        raise PgferryError(f"cutover {rec.cutover_id} finished at {rec.handoff_lsn}: the application is on the target. "
                           "Nothing to do (`pgferry cleanup` removes what pgferry left on the source)")
    if rec is not None and rec.state == "handed_off":
        return made(Cutover(source, target, publication, slot, schema, opts, out)).run(resume=rec)
    if (rec is not None and rec.state == "requested") or fence.source_fenced(source):
        did = (control.undo(source, target, schema, slot, rec, opts.pgbouncer) if rec is not None
               else [f"the fence is lifted ({len(fence.lift(source, schema))} table(s))"])
        log.warning("an earlier cutover was interrupted before its handoff; undone first: %s", "; ".join(did))
    return made(Cutover(source, target, publication, slot, schema, opts, out)).run()

def _write_receipt(receipt: dict[str, Any], out: IO[str], path: str | None) -> None:
    text = json.dumps(receipt, indent=2)
    out.write(text + "\n")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def analyze_tables_without_statistics(source: str, target: str, publication: str) -> list[str]:
    """ANALYZE the published tables, and the partitioned tables above them or partitions below, that
    have never been analyzed on the target, before the fence (so it costs no downtime): a copied
    table has no planner statistics until autovacuum gets to it, and autovacuum never analyzes a
    partitioned table itself; the application's first queries on the new server would be planned
    blind. Returns the names of those analyzed; those this role may not analyze are named in a
    warning."""
    src = connect(source, "source")
    try:
        published = [f"{quote_ident(n)}.{quote_ident(t)}" for n, t in published_tables(src, publication)]
    finally:
        src.close()
    conn = connect(target, "target")
    conn.autocommit = True
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            pgferry_session(cur)  # no statement_timeout for a big table's ANALYZE
            cur.execute("""SELECT DISTINCT c.oid, format('%%I.%%I', n.nspname, c.relname), n.nspname || '.' || c.relname
                FROM unnest(%s::text[]) t, LATERAL (SELECT to_regclass(t) AS relid
                                                    UNION SELECT relid FROM pg_partition_ancestors(to_regclass(t))
                                                    UNION SELECT relid FROM pg_partition_tree(to_regclass(t))) a
                JOIN pg_stat_user_tables s ON s.relid = a.relid JOIN pg_class c ON c.oid = a.relid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE s.last_analyze IS NULL AND s.last_autoanalyze IS NULL ORDER BY 3""", (published,))
            todo = cur.fetchall()
            for _, quoted, _ in todo:
                cur.execute(f"ANALYZE {quoted}")  # a table this role may not analyze: a warning, not an error
            cur.execute("SELECT relid FROM pg_stat_user_tables WHERE relid = ANY(%s::oid[]) AND last_analyze IS NULL",
                        ([oid for oid, _, _ in todo],))
            skipped = {r[0] for r in cur.fetchall()}
    finally:
        conn.close()
    done = [name for oid, _, name in todo if oid not in skipped]
    if done:
        log.info("analyzed %d target table(s) that had no planner statistics in %.1f s", len(done),
                 time.monotonic() - started)
    if skipped:
        log.warning("%d target table(s) have no planner statistics and this role may not analyze them: %s; run "
                    "ANALYZE on them as their owner before the application uses the target", len(skipped),
                    ", ".join(name for oid, _, name in todo if oid in skipped))
    return done

