"""Pausing the daemon from anywhere that reaches the target: a row in `<schema>.pause`.

`pgferry pause` asks for a hold at the next source transaction boundary, `verify --online` for
one before the first transaction that commits at or after an LSN X (so the target holds exactly
what the source committed before X). The daemon sees the request with its next batch's progress
row, or within PAUSE_POLL seconds while idle (Session.pausing), applies up to the point, writes
`paused_lsn`, and then reads nothing while it keeps answering the walsender: the slot keeps its
position and the WAL since (the WAL guard still watches it). Deleting the row resumes it. The
request is state, not a message: a daemon restarted while paused pauses again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from decoder import Lsn
from sink.state import ensure_schema, quote_ident

from ..errors import PgferryError
from ..source import connect, read_state


@dataclass
class PauseState:
    at_lsn: str | None  # None: at the next boundary
    requested_by: str
    requested_at: Any
    paused_lsn: str | None  # set by the daemon once it holds
    paused_since: Any


def read(target: str, schema: str, slot: str) -> PauseState | None:
    def q(cur: Any, s: str) -> Any:
        cur.execute(f"SELECT at_lsn::text, requested_by, requested_at, paused_lsn::text, paused_since "
                    f"FROM {s}.pause WHERE slot_name = %s", (slot,))
        return cur.fetchone()

    row = read_state(target, schema, q)  # (None also when the state has no pause table yet)
    return None if row is None else PauseState(*row)


def request(target: str, schema: str, slot: str, by: str, at: Lsn | None = None) -> None:
    """Ask for a pause (replacing any earlier request of the slot: one pause at a time)."""
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (f"{quote_ident(schema)}.pause",))
            if cur.fetchone()[0] is None:  # state made before pauses existed (the daemon adds it as it starts)
                ensure_schema(cur, schema)
            cur.execute(f"SELECT 1 FROM {quote_ident(schema)}.progress WHERE slot_name = %s", (slot,))
            if cur.fetchone() is None:
                raise PgferryError(f"no pgferry progress for slot {slot!r} on the target: nothing streams to pause")
            cur.execute(f"INSERT INTO {quote_ident(schema)}.pause (slot_name, at_lsn, requested_by) VALUES "
                        "(%s, %s::pg_lsn, %s) ON CONFLICT (slot_name) DO UPDATE SET at_lsn = excluded.at_lsn, "
                        "requested_by = excluded.requested_by, requested_at = now(), paused_lsn = NULL, "
                        "paused_since = NULL", (slot, str(at) if at is not None else None, by))
        conn.commit()
    finally:
        conn.close()


def release(target: str, schema: str, slot: str, by: str | None = None) -> bool:
    """Withdraw the request (only `by`'s, when given); True when there was one."""
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (f"{quote_ident(schema)}.pause",))
            if cur.fetchone()[0] is None:
                conn.rollback()
                return False
            cur.execute(f"DELETE FROM {quote_ident(schema)}.pause WHERE slot_name = %s"
                        + (" AND requested_by = %s" if by else ""), (slot, by) if by else (slot,))
            found = cur.rowcount > 0
        conn.commit()
        return found
    finally:
        conn.close()


def wait_paused(target: str, schema: str, slot: str, timeout: float, daemon_running: Any, by: str | None = None,
                at: Lsn | None = None) -> PauseState:
    """Until the daemon holds (its paused_lsn is set) for this request (`by`, `at`: whose, and
    where). `daemon_running()`: False ends the wait at once (nobody would ever hold)."""
    deadline = time.monotonic() + timeout
    while True:
        st = read(target, schema, slot)
        if st is None:
            raise PgferryError("the pause request is gone (someone ran `pgferry resume`)")
        if by is not None and (st.requested_by != by or (at is not None and st.at_lsn != str(at))):
            raise PgferryError(f"another pause request ({st.requested_by}) replaced this one: try again")
        if st.paused_lsn is not None:
            return st
        if not daemon_running():
            raise PgferryError("no `pgferry start` streams this slot: nothing applies, so nothing can pause")
        if time.monotonic() > deadline:
            raise PgferryError(f"the daemon did not pause within {timeout:.0f} s (is it applying a long "
                               "transaction, or far behind?)")
        time.sleep(0.1)


def daemon_streaming(source: str, slot: str) -> bool:
    """Whether a session streams the slot (its walsender is active)."""
    try:
        conn = connect(source, "source")
    except PgferryError:
        return True  # cannot tell: let the timeout decide
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
        return bool(row and row[0])
    finally:
        conn.close()
