"""A way back after the cutover: the new server's writes streamed into the fenced old source.

`pgferry cutover --fallback`, once the target verified and before the application is let onto it
(PgBouncer still paused, the switch command not run), creates on the target a publication of the
migrated tables and a logical slot. Nothing has written on the target since the handoff: the
forward daemon stopped at the marker and the application waits. So the slot starts exactly where
the old source is, and every write the application makes on the new server is after it.
Loops cannot happen by position: the reverse stream starts after the last forward write, and the
forward direction never runs again once the handoff stands (`pgferry start` refuses it).

The reverse direction's state (progress, conflicts, its own cutover record) lives on the old
source, in the same state schema, under the slot `<slot>_fallback`: the same exactly-once engine,
run with source and target swapped. Its progress row is written when the slot is created, so a
reverse daemon never starts anywhere else (a lost slot is an error, not a silent new start).
The old source stays fenced for everyone but pgferry (replicator/cutover/fence.py: the apply
session holds the fence key).

The record on the target's `control` row (`fallback`, JSON): `state` (`requested` before the
cutover's fence, `active` once the slot exists, `rolled_back`, `stopped`), `slot`, `publication`,
`start_lsn`. `pgferry start` with the forward settings reads it and streams whichever direction
it says.

`pgferry rollback` is the cutover in reverse (handoff.Cutover with the servers swapped): fence
the target, hand off at one LSN, copy sequences back, verify, lift the old source's fence, move
the application back, receipt. `pgferry fallback stop` drops the reverse slot and publication.
"""

from __future__ import annotations

import json
import logging
import re
import select
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import psycopg2

from decoder import Lsn
from sink.state import ensure_schema, init_progress, quote_ident

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn, published_tables, read_state
from . import control

log = logging.getLogger("pgferry.fallback")


def names(slot: str, publication: str) -> tuple[str, str]:
    """The reverse slot and publication (on the target) of a forward slot and publication."""
    return f"{slot}_fallback", f"{publication}_fallback"


@dataclass
class Reverse:
    """The reverse direction as `pgferry start` runs it: source and target swapped."""
    source: str  # the new server
    target: str  # the old source
    slot: str
    publication: str


def check_ready(source: str, target: str, schema: str, slot: str) -> None:
    """Before the cutover changes anything: can the target stream back (wal_level, a role that may
    replicate, a free slot and sender) and can the old source hold the reverse state? Raises
    with every finding and its fix."""
    problems: list[str] = []
    fb_slot, _ = names(slot, "")
    dst = connect(target, "target")
    try:
        with dst.cursor() as cur:
            cur.execute("SELECT current_setting('wal_level'), "
                        "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), current_user, "
                        "current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots), "
                        "current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication), "
                        "EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = %s)", (fb_slot,))
            wal_level, may_replicate, role, free_slots, free_senders, slot_exists = cur.fetchone()
            cur.execute("SELECT current_setting('max_slot_wal_keep_size')")
            (keep,) = cur.fetchone()
        dst.rollback()
    finally:
        dst.close()
    where = describe_dsn(target)
    if wal_level != "logical":
        problems.append(f"target {where} has wal_level = {wal_level}: set wal_level = logical (ALTER SYSTEM SET "
                        "wal_level = logical, then restart the target) before the cutover")
    if not may_replicate:
        shown = role if re.fullmatch(r"[a-z_][a-z0-9_$]*", role) else quote_ident(role)
        problems.append(f"target role {role} may not replicate: ALTER ROLE {shown} REPLICATION (on a "
                        "managed service, its replication role or grant)")
    if free_slots < 1 and not slot_exists:
        problems.append(f"target {where} has no free replication slot: raise max_replication_slots (restart)")
    if free_senders < 1:
        problems.append(f"target {where} has no free WAL sender: raise max_wal_senders (restart)")
    src = connect(source, "source")
    try:
        with src.cursor() as cur:
            cur.execute("SELECT has_database_privilege(current_database(), 'CREATE') "
                        "OR to_regnamespace(%s) IS NOT NULL", (schema,))
            (can_state,) = cur.fetchone()
        src.rollback()
    finally:
        src.close()
    if not can_state:
        problems.append(f"the source role may not create the {schema!r} schema for the reverse state on "
                        f"{describe_dsn(source)}: GRANT CREATE ON DATABASE ... TO it")
    if problems:
        raise PgferryError("--fallback refused before anything changed: " + "; ".join(problems))
    if keep == "-1":
        log.warning("target %s has max_slot_wal_keep_size = -1: while no reverse daemon runs, the fallback's slot "
                    "keeps WAL there without a limit (fallback_max_wal only acts while one runs); consider a "
                    "limit on the new server", where)


def establish(source: str, target: str, publication: str, slot: str, schema: str) -> dict[str, Any]:
    """Create the reverse publication and slot on the target and the reverse progress on the old
    source. Run while nothing writes on the target (after the handoff, before the application
    moves). Returns the record to keep (state 'active')."""
    fb_slot, fb_pub = names(slot, publication)
    src = connect(source, "source")
    try:
        tables = published_tables(src, publication)
    finally:
        src.close()
    if not tables:
        raise PgferryError(f"publication {publication!r} on the source has no tables: nothing to stream back")
    dst = connect(target, "target")
    dst.autocommit = True
    try:
        with dst.cursor() as cur:
            listed = ", ".join(f"{quote_ident(n)}.{quote_ident(t)}" for n, t in tables)
            cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (fb_pub,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE PUBLICATION {quote_ident(fb_pub)} FOR TABLE {listed}")
            # a slot of that name left by an earlier try starts too early (forward writes came since):
            # nothing streams from it (the reverse daemon starts only once a cutover is done)
            cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s "
                        "AND NOT active", (fb_slot,))
            cur.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (fb_slot,))
            (start_lsn,) = cur.fetchone()
    except psycopg2.Error as exc:
        raise PgferryError(f"could not create the fallback's publication and slot on target "
                           f"{describe_dsn(target)}: {first_line(exc)}") from None
    finally:
        dst.close()
    old = connect(source, "source")
    try:
        with old.cursor() as cur:
            cur.execute("SET LOCAL pgferry.capture = off")  # the state's tables are not the application's DDL
            ensure_schema(cur, schema)
            cur.execute(f"DELETE FROM {quote_ident(schema)}.progress WHERE slot_name = %s", (fb_slot,))
            init_progress(cur, schema, fb_slot, start_lsn, True)
        old.commit()
    finally:
        old.close()
    log.info("fallback ready: slot %s and publication %s on the target from %s (%d table(s)); the old source "
             "keeps the reverse state", fb_slot, fb_pub, start_lsn, len(tables))
    return {"state": "active", "slot": fb_slot, "publication": fb_pub, "start_lsn": start_lsn,
            "created_at": datetime.now(UTC).isoformat()}


def drop(target: str, record: dict[str, Any]) -> list[str]:
    """Drop the reverse slot and publication on the target; returns what was dropped. Refused while
    a reverse daemon streams from the slot."""
    dropped: list[str] = []
    dst = connect(target, "target")
    dst.autocommit = True
    try:
        with dst.cursor() as cur:
            cur.execute("SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = %s", (record["slot"],))
            row = cur.fetchone()
            if row is not None and row[0]:
                raise PgferryError(f"the fallback's slot {record['slot']!r} is in use (pid {row[1]}): stop the "
                                   "reverse `pgferry start` first (SIGTERM), then run this again")
            if row is not None:
                cur.execute("SELECT pg_drop_replication_slot(%s)", (record["slot"],))
                dropped.append(f"slot {record['slot']}")
            cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (record["publication"],))
            if cur.fetchone() is not None:
                cur.execute(f"DROP PUBLICATION {quote_ident(record['publication'])}")
                dropped.append(f"publication {record['publication']}")
    except psycopg2.Error as exc:
        raise PgferryError(f"could not drop the fallback on target {describe_dsn(target)}: {first_line(exc)}") from None
    finally:
        dst.close()
    return dropped


def set_record(target: str, schema: str, slot: str, record: dict[str, Any] | None) -> None:
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute(f"UPDATE {quote_ident(schema)}.control SET fallback = %s, updated_at = now() "
                        "WHERE slot_name = %s", (json.dumps(record) if record is not None else None, slot))
        conn.commit()
    finally:
        conn.close()


def reverse_of(source: str, target: str, schema: str, slot: str) -> Reverse | None:
    """The reverse direction `pgferry start` must stream, or None (forward, or nothing to stream)."""
    rec = control.read(target, schema, slot)
    fb = rec.fallback if rec is not None else None
    if rec is None or rec.state != "done" or not fb or fb.get("state") != "active":
        return None
    back = control.read(source, schema, fb["slot"])  # a rollback's own record, on the old source
    if back is not None and back.state in ("handed_off", "done"):
        raise PgferryError(f"rollback {back.cutover_id} handed back at {back.handoff_lsn}: nothing to stream back "
                           + ("(run `pgferry rollback` to finish it)" if back.state == "handed_off" else "any more"))
    return Reverse(source=target, target=source, slot=fb["slot"], publication=fb["publication"])


def await_reverse(source: str, target: str, schema: str, slot: str, stop: Any) -> Reverse | None:
    """A forward daemon that just handed off: when the cutover asked for a fallback, wait until it
    is done (the reverse slot made, the application moved) and return the direction to stream;
    None when there is no fallback, the cutover was undone, or `stop` (a StopFlag) was set."""
    said = False
    while not stop.set:
        rec = control.read(target, schema, slot)
        fb = rec.fallback if rec is not None else None
        if rec is None or not fb:
            return None
        if rec.state == "done" and fb.get("state") == "active":
            return Reverse(source=target, target=source, slot=fb["slot"], publication=fb["publication"])
        if rec.state not in ("requested", "handed_off") or fb.get("state") not in ("requested", "active"):
            return None
        if not said:
            log.info("handed off; the cutover asked for a fallback: waiting for it to finish, then streaming the "
                     "new server's writes back into the old source")
            said = True
        select.select([stop], [], [], 0.5)
    return None


def drop_forward_slot(source: str, slot: str) -> bool:
    """The forward slot holds WAL on the old source for nothing once the handoff stands and the
    reverse stream writes there: drop it (a warning when it is still in use)."""
    conn = connect(source, "source")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            if row is None:
                return False
            if row[0]:
                log.warning("the forward slot %s is still in use on the source: it keeps WAL there until "
                            "`pgferry cleanup`", slot)
                return False
            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return True
    finally:
        conn.close()


def run_fallback_stop(source: str, target: str, schema: str, slot: str, out: IO[str] = sys.stdout) -> int:
    """`pgferry fallback stop`: the migration is confirmed; drop the reverse slot and publication
    (the old source stays fenced) and print a receipt."""
    rec = control.read(target, schema, slot)
    fb = rec.fallback if rec is not None else None
    if rec is None or not fb:
        raise PgferryError("no fallback to stop: the cutover was not run with --fallback")
    if rec.state != "done" and fb.get("state") != "stopped":
        raise PgferryError(f"cutover {rec.cutover_id} is not done ({rec.state}): finish it (`pgferry cutover`) or "
                           "undo it (`pgferry cutover --undo`, which drops the fallback too) first")
    if fb.get("state") in ("stopped", "rolled_back"):
        raise PgferryError(f"the fallback is already {fb['state'].replace('_', ' ')}: nothing to stop")
    dropped = drop(target, fb)
    applied = _reverse_applied(source, schema, fb["slot"])
    stopped = {**fb, "state": "stopped", "stopped_at": datetime.now(UTC).isoformat()}
    set_record(target, schema, slot, stopped)
    receipt = {"fallback": "stopped", "cutover_id": rec.cutover_id, "handoff_lsn": rec.handoff_lsn,
               "reverse_applied_lsn": applied, "dropped": dropped, "stopped_at": stopped["stopped_at"],
               "old_source": "still fenced: `pgferry cleanup` lifts the fence and drops what pgferry left there"}
    out.write(json.dumps(receipt, indent=2) + "\n")
    print(f"pgferry fallback stop: dropped {', '.join(dropped) or 'nothing (already gone)'}; the old source stays "
          "fenced", file=sys.stderr)
    return 0


def _reverse_applied(source: str, schema: str, fb_slot: str) -> str | None:
    """How far the old source got, from the reverse progress there (None: not known)."""
    def q(cur: Any, s: str) -> Any:
        cur.execute(f"SELECT applied_lsn::text FROM {s}.progress WHERE slot_name = %s", (fb_slot,))
        return cur.fetchone()

    try:
        row = read_state(source, schema, q)
    except PgferryError:  # the old source out of reach: status and the receipt say so with None
        return None
    return row[0] if row else None


def status(source: str, target: str, schema: str, record: dict[str, Any]) -> dict[str, Any]:
    """`pgferry status`'s view of the fallback: its record, and while active the reverse applied LSN
    (on the old source), the new server's LSN, the lag, the WAL the reverse slot keeps there and
    whether a reverse daemon streams from it."""
    out = dict(record)
    if record.get("state") != "active":
        return out
    out["applied_lsn"] = _reverse_applied(source, schema, record["slot"])
    try:
        conn = connect(target, "target")
    except PgferryError:
        return out
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()::text, (SELECT active FROM pg_replication_slots WHERE "
                        "slot_name = %s), (SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots "
                        "WHERE slot_name = %s)", (record["slot"], record["slot"]))
            now, active, retained = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    out["source_lsn"] = now
    out["streaming"] = bool(active)
    out["retained_wal_bytes"] = int(retained) if retained is not None else None
    if out["applied_lsn"] is not None:
        out["lag_bytes"] = max(0, int(Lsn.parse(now)) - int(Lsn.parse(out["applied_lsn"])))
    return out


def drop_after_rollback(target: str, record: dict[str, Any], wait: float = 30.0) -> list[str]:
    """After a rollback the reverse slot holds WAL on the new server for nothing: drop it and the
    publication, once the reverse daemon (which stops at the rollback's handoff) has let go."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return drop(target, record)
        except PgferryError as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                log.warning("%s: drop them with `SELECT pg_drop_replication_slot('%s'); DROP PUBLICATION %s` on the "
                            "new server", exc, record["slot"], record["publication"])
                return []
            time.sleep(0.2)


class Guard:
    """A forgotten fallback must not fill the new server's disk. While the reverse daemon runs (also
    while it cannot reach the old source, the likely way to forget one: the old server shut down),
    it polls the WAL the reverse slot keeps on the new server: a warning past 80% of
    `fallback_max_wal`, and past the limit the daemon stops and the slot is dropped (`drop_now`),
    the fallback recorded as `dropped`. With the daemon down nothing here watches: PostgreSQL's
    `max_slot_wal_keep_size` on the new server is the backstop (check_ready warns when unset)."""

    def __init__(self, reverse: Reverse, limit: int, stop: Any, every: float = 5.0) -> None:
        self.reverse, self.limit, self.stop, self.every = reverse, limit, stop, every
        self.over: str | None = None  # why the slot must go
        self.done = threading.Event()

    def start(self) -> Guard:
        threading.Thread(target=self._run, name="fallback-guard", daemon=True).start()
        return self

    def _run(self) -> None:
        from ..source import slot_wal

        warned = False
        wait = 0.0
        while not self.done.wait(wait):
            wait = self.every
            found = slot_wal(self.reverse.source, self.reverse.slot, "pgferry-fallback-guard")
            retained = found[0] if found is not None else None
            if retained is None:
                continue
            if retained > self.limit:
                self.over = (f"the fallback's slot {self.reverse.slot} kept {retained >> 20} MiB of WAL on the new "
                             f"server (fallback_max_wal {self.limit >> 20} MiB)")
                log.error("%s: stopping to drop it", self.over)
                self.stop.request()
                return
            if retained > self.limit * 0.8 and not warned:
                log.warning("the fallback's slot %s keeps %d MiB of WAL on the new server: at fallback_max_wal "
                            "(%d MiB) it is dropped and the way back is gone (is the old source reachable?)",
                            self.reverse.slot, retained >> 20, self.limit >> 20)
                warned = True

    def drop_now(self, forward_target: str, schema: str, forward_slot: str) -> None:
        """The daemon has stopped streaming: drop the reverse slot and publication, record why."""
        rec = control.read(forward_target, schema, forward_slot)
        fb = dict((rec.fallback if rec is not None else None) or {"slot": self.reverse.slot,
                                                                  "publication": self.reverse.publication})
        dropped = drop_after_rollback(self.reverse.source, fb)  # (waits for the slot to be let go)
        set_record(forward_target, schema, forward_slot,
                   {**fb, "state": "dropped", "dropped_at": datetime.now(UTC).isoformat(), "why": self.over})
        raise PgferryError(f"{self.over}: dropped {', '.join(dropped) or 'nothing'}; the way back is gone (the old "
                           "source stays fenced; `pgferry cleanup` ends the migration there)")
