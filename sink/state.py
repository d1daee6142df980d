"""pgferry's state on the target (DESIGN.md §4): a schema, default `pgferry`.

`progress` holds, per slot, the source position up to which every committed change is on the
target (`applied_lsn`, the end LSN of the last applied source commit, or a later position the
walsender reported with nothing pending). It is written in the SAME target transaction as the rows
it covers, which is what makes apply exactly-once: after any crash, the target's rows and its
progress row agree, and the stream restarts from there.
"""

from __future__ import annotations

from typing import Any

from decoder import Lsn

DEFAULT_SCHEMA = "pgferry"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def ensure_schema(cur: Any, schema: str) -> None:
    """Create the state tables if missing (idempotent; the caller commits)."""
    s = quote_ident(schema)
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.progress (
        slot_name text PRIMARY KEY,
        applied_lsn pg_lsn NOT NULL,
        source_commit_time timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        slot_created_by_pgferry boolean NOT NULL DEFAULT false)""")


def read_progress(cur: Any, schema: str, slot: str) -> Lsn | None:
    """The stored progress for `slot`, or None when pgferry never streamed it into this target."""
    cur.execute(f"SELECT applied_lsn::text FROM {quote_ident(schema)}.progress WHERE slot_name = %s", (slot,))
    row = cur.fetchone()
    return None if row is None else Lsn.parse(row[0])


def init_progress(cur: Any, schema: str, slot: str, lsn: Lsn, created_slot: bool) -> None:
    cur.execute(f"INSERT INTO {quote_ident(schema)}.progress (slot_name, applied_lsn, slot_created_by_pgferry) "
                "VALUES (%s, %s::pg_lsn, %s) ON CONFLICT (slot_name) DO NOTHING", (slot, str(lsn), created_slot))


def progress_sql(schema: str) -> str:
    """The statement a batch runs last, inside its transaction. GREATEST: progress never moves back."""
    return (f"UPDATE {quote_ident(schema)}.progress SET applied_lsn = GREATEST(applied_lsn, %s::pg_lsn), "
            "source_commit_time = COALESCE(%s, source_commit_time), updated_at = now() WHERE slot_name = %s")
