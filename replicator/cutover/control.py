"""The cutover's record on the target (`<state schema>.control`, one row per slot) and its undo.

States: `requested` (the handoff marker is on its way), `cancelled` (given up before the daemon
claimed it), `handed_off` (the daemon applied up to the marker and stopped; the cutover is still
copying sequences, verifying, moving the application), `done` (the application moved), `undone`
(the fence was lifted after the handoff: `pgferry start` streams again).

Before the cutover changes anything it records what it will change: the fence mode, and for a
PgBouncer the admin console, the entry's line as it was, and whether it paused it or rewrote the
entry. So a cutover killed anywhere leaves enough behind for `pgferry cutover --undo`, or the next
`pgferry cutover` (which finishes the undo, or finishes a cutover killed after its handoff), and
for `status` to say which of those to run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg2.extensions

from sink.state import quote_ident

from ..errors import PgferryError
from ..source import connect, read_state
from . import fence
from .pgbouncer import Bouncer, Entry

log = logging.getLogger("pgferry.cutover")

MOVED_BY_COMMAND = "the switch command moved the application"  # the record's step once it did


@dataclass
class Record:
    cutover_id: str
    state: str
    handoff_lsn: str | None
    applied_lsn: str | None
    step: str | None
    fence: str | None
    pgbouncer: dict[str, Any] | None
    receipt: dict[str, Any] | None
    requested_at: Any = None
    fallback: dict[str, Any] | None = None  # the reverse direction (cutover/fallback.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unfinished(self) -> bool:
        return self.state in ("requested", "handed_off")


def read(target: str, schema: str, slot: str) -> Record | None:
    def q(cur: Any, s: str) -> Any:
        cur.execute(f"SELECT c.cutover_id, c.state, c.handoff_lsn::text, p.applied_lsn::text, c.step, c.fence, "
                    f"c.pgbouncer, c.receipt, c.requested_at, c.fallback FROM {s}.control c "
                    f"LEFT JOIN {s}.progress p USING (slot_name) WHERE c.slot_name = %s", (slot,))
        return cur.fetchone()

    try:
        row = read_state(target, schema, q)
    except psycopg2.errors.UndefinedColumn:  # state made by a pgferry before these columns
        return None
    return None if row is None else Record(*row)


def update(target: str, schema: str, slot: str, cutover_id: str, **cols: Any) -> None:
    """Set columns of this cutover's row (committed before the step it prepares)."""
    sets = ", ".join(f"{k} = %s" for k in cols) + ", updated_at = now()"
    values = [json.dumps(v) if k in ("pgbouncer", "receipt", "fallback") and v is not None else v
              for k, v in cols.items()]
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute(f"UPDATE {quote_ident(schema)}.control SET {sets} WHERE slot_name = %s AND cutover_id = %s",
                        (*values, slot, cutover_id))
        conn.commit()
    finally:
        conn.close()


def cancel_or_undo(target: str, schema: str, slot: str, cutover_id: str) -> str:
    """The cutover gives up: 'cancelled' when the daemon had not claimed it (an UPDATE that races
    the claim through the same row: exactly one wins), else 'undone'. Returns the new state."""
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            s = quote_ident(schema)
            cur.execute(f"UPDATE {s}.control SET state = CASE state WHEN 'requested' THEN 'cancelled' ELSE 'undone' "
                        "END, updated_at = now() WHERE slot_name = %s AND cutover_id = %s "
                        "AND state IN ('requested', 'handed_off') RETURNING state", (slot, cutover_id))
            row = cur.fetchone()
            if row is None:
                cur.execute(f"SELECT state FROM {s}.control WHERE slot_name = %s", (slot,))
                row = cur.fetchone() or ("none",)
        conn.commit()
        return str(row[0])
    finally:
        conn.close()


def bouncer_of(rec: Record, admin_dsn: str | None) -> tuple[Bouncer, Entry] | None:
    """The PgBouncer an earlier cutover drove, from its record (the admin DSN as given now wins:
    the record keeps none of its password)."""
    pb = rec.pgbouncer
    if not pb:
        return None
    b = Bouncer(admin_dsn or pb["admin"], pb["database"], pb["conffile"])
    entry = Entry(pb["database"], pb["conffile"], -1, pb["line"], {}, "", bool(pb.get("paused")))
    return b, entry


def undo(source: str, target: str, schema: str, slot: str, rec: Record, admin_dsn: str | None) -> list[str]:
    """Put back what cutover `rec` changed: PgBouncer's entry and pause, the fence; cancel it
    (or mark it undone after its handoff). Returns what it did. Refused once the application has
    moved (the target took writes the source does not have)."""
    if rec.state == "done":
        raise PgferryError(f"cutover {rec.cutover_id} finished at {rec.handoff_lsn}: the application is on the target "
                           "and wrote there, so there is nothing to undo (a way back to the source is a fallback)")
    if rec.step == MOVED_BY_COMMAND:
        raise PgferryError(f"cutover {rec.cutover_id}'s switch command moved the application to the target, which "
                           "may have written there: it cannot be undone; run `pgferry cutover` to finish it")
    did: list[str] = []
    found = bouncer_of(rec, admin_dsn)
    if found is not None:
        b, entry = found
        pb = rec.pgbouncer or {}
        if pb.get("repointed"):
            if pb.get("resumed") or (not b.running_entry().get("paused") and pb.get("new")
                                     and b.points_at(pb["new"])):
                raise PgferryError(f"PgBouncer at {b.where} already sends {entry.database!r} to the target: the "
                                   "application writes there, so the cutover cannot be undone; run `pgferry "
                                   "cutover` to finish it")
            b.write_line(entry, entry.line)
            did.append(f"PgBouncer's entry for {entry.database} points at the source again")
    fb = rec.fallback or {}
    if fb.get("state") in ("requested", "active") and rec.unfinished:  # made (maybe part-way) before the
        from .fallback import drop  # application moved: of no use now

        did.extend(f"dropped the fallback's {what}" for what in drop(target, fb))
    lifted = fence.lift(source, schema)  # before the resume: the clients let through may write
    if lifted:
        did.append(f"the fence is lifted ({len(lifted)} table(s) take writes again)")
    if found is not None and (rec.pgbouncer or {}).get("paused") and found[0].resume():
        did.append(f"PgBouncer resumed {found[1].database} (on the source)")
    state = cancel_or_undo(target, schema, slot, rec.cutover_id) if rec.unfinished else rec.state
    if state == "cancelled":
        did.append("the handoff is withdrawn (the daemon streams on)")
    elif state == "undone":
        did.append(f"the handoff at {rec.handoff_lsn or '?'} is undone: run `pgferry start` to stream again")
    return did


def advice(rec: Record | None, fenced: list[str]) -> str | None:
    """What `status` tells the operator to run after an interrupted cutover (None: nothing)."""
    if rec is not None and rec.state == "handed_off":
        return (f"cutover {rec.cutover_id} was interrupted after its handoff at {rec.handoff_lsn} "
                f"(last step: {rec.step or 'handed off'}): run `pgferry cutover` to finish it, or "
                "`pgferry cutover --undo` to lift the fence and stream again")
    pb = (rec.pgbouncer or {}) if rec is not None else {}
    if rec is not None and rec.state == "requested" and (fenced or pb.get("paused")):
        return (f"cutover {rec.cutover_id} was interrupted before its handoff (last step: {rec.step or 'requested'}): "
                "the source is " + ("fenced" if fenced else "paused in PgBouncer")
                + "; run `pgferry cutover --undo` to lift it, or `pgferry cutover` to try again")
    if fenced and (rec is None or rec.state in ("cancelled", "undone")):
        return (f"the source is fenced ({len(fenced)} table(s) refuse writes) though no cutover is under way: "
                "run `pgferry cutover --undo` to lift it")
    return None


def check_start(source: str, target: str, schema: str, slot: str) -> None:
    """`pgferry start`: refuse to stream after a handoff that stands; say so when the source is
    still fenced by an interrupted cutover."""
    rec = read(target, schema, slot)
    fb = (rec.fallback if rec is not None else None) or {}
    if rec is not None and rec.state == "done" and fb.get("state") == "rolled_back":
        raise PgferryError(f"the migration was rolled back at {fb.get('rollback_handoff_lsn')}: the application is on "
                           "the source again and the target is fenced. Nothing to stream; to migrate again, start "
                           "afresh into an empty target")
    if rec is not None and rec.state == "done":
        raise PgferryError(f"the migration is done: cutover {rec.cutover_id} handed off at {rec.handoff_lsn} and the "
                           "application moved to the target. Nothing to stream (`pgferry cleanup` removes what "
                           "pgferry left on the source)")
    if rec is not None and rec.state == "handed_off":
        raise PgferryError(f"cutover {rec.cutover_id} handed off at {rec.handoff_lsn} and did not finish: run "
                           "`pgferry cutover` to finish it, or `pgferry cutover --undo` to lift the fence; then "
                           "start streams again")
    fenced = fence.source_fenced(source)
    if fenced:
        log.warning("the source is fenced (%d table(s) refuse writes) by a cutover that did not finish: run "
                    "`pgferry cutover --undo` to lift it, or `pgferry cutover` to try again", len(fenced))
