"""pgferry's state on the target (docs/design.md, the state schema): a schema, default `pgferry`.

`progress` holds, per slot, the source position up to which every committed change is on the
target (`applied_lsn`, the end LSN of the last applied source commit, or a later position the
walsender reported with nothing pending). It is written in the SAME target transaction as the rows
it covers, which is what makes apply exactly-once: after any crash, the target's rows and its
progress row agree, and the stream restarts from there.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from decoder import Lsn

log = logging.getLogger("pgferry.sink")

DEFAULT_SCHEMA = "pgferry"


# pgferry's sessions run long statements (a table's COPY, a batch) and hold transactions open while
# they wait for a source; the timeouts a server sets for its applications must not cut them (a
# cancelled batch would be retried, and cancelled again, forever). pg_dump's output sets the same.
# One statement for every server version: a timeout the server does not have (idle_session_timeout
# came in 14, transaction_timeout, which terminates the whole session, in 17) is not in pg_settings.
NO_TIMEOUTS = ("SELECT count(set_config(name, '0', false)) FROM pg_settings WHERE name IN ('statement_timeout', "
               "'lock_timeout', 'idle_in_transaction_session_timeout', 'idle_session_timeout', 'transaction_timeout')")


# Values cross between servers as text in formats every server reads back the same, whatever the
# database's own settings: a source with DateStyle = 'SQL, DMY' prints 05/11/2026, which a target in
# MDY reads as May 11 (or rejects: 30/03/2026); extra_float_digits below 1 rounds floats; a target
# with array_nulls = off reads {a,NULL} as the string 'NULL', one with xmloption = document rejects
# XML content fragments. What native logical replication's walreceiver and pg_dump set; and
# lc_monetary, which neither sets: a source database in de_DE prints money as '-3.765,44 €', which a
# target in C (or en_US) rejects or misreads. 'C' exists on every server.
PORTABLE_FORMATS = ("SET DateStyle = 'ISO'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; "
                    "SET array_nulls = on; SET xmloption = content; SET lc_monetary = 'C'")


# As pg_dump sets it: where row-level security policies apply to pgferry's role, its statements fail
# ("query would be affected by row-level security policy") instead of reading or changing only the
# rows the policies show: a COPY on the source would copy a part, an UPDATE or DELETE on the target
# would skip rows. (Native apply refuses such tables too.)
ROW_SECURITY_OFF = "SET row_security = off"

# What every session pgferry moves data in sets first (one round trip): no timeouts, portable text
# formats, no silent row-level security. (The caller commits: a rollback would undo the settings.)
SESSION = f"{PORTABLE_FORMATS}; {ROW_SECURITY_OFF}; {NO_TIMEOUTS}"


def pgferry_session(cur: Any) -> None:
    cur.execute(SESSION)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def readable_name(schema: str, table: str) -> str:
    """`schema.table` for to_regclass and messages, quoted only where it must be."""
    return ".".join(i if re.fullmatch(r"[a-z_][a-z0-9_$]*", i) else quote_ident(i) for i in (schema, table))


def readable_name_sql(schema: str, table: str) -> str:
    """readable_name as an SQL expression over the columns `schema` and `table`."""
    return " || '.' || ".join(f"CASE WHEN {c} ~ '^[a-z_][a-z0-9_$]*$' THEN {c}::text ELSE quote_ident({c}) END"
                              for c in (schema, table))


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
    cur.execute(f"ALTER TABLE {s}.progress ADD COLUMN IF NOT EXISTS rows_applied bigint NOT NULL DEFAULT 0")
    # Cutover (replicator/cutover/control.py): `pgferry cutover` requests a handoff (state
    # 'requested', an id it also sends through the source's WAL as a logical message); the daemon
    # that applies that message's transaction sets state 'handed_off' and the handoff LSN in the
    # same target transaction, then stops. A cutover that gives up first sets 'cancelled', so
    # exactly one of the two wins. The cutover sets 'done' once the application has moved, or
    # 'undone' when it lifted the fence after the handoff. What it must undo if it is killed (the
    # fence, PgBouncer's pause and entry) is recorded here before it is changed.
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.control (
        slot_name text PRIMARY KEY,
        cutover_id text,
        state text,
        requested_at timestamptz,
        handoff_lsn pg_lsn,
        done_at timestamptz)""")
    cur.execute(f"ALTER TABLE {s}.control ADD COLUMN IF NOT EXISTS step text, "
                "ADD COLUMN IF NOT EXISTS fence text, ADD COLUMN IF NOT EXISTS pgbouncer jsonb, "
                "ADD COLUMN IF NOT EXISTS receipt jsonb, ADD COLUMN IF NOT EXISTS updated_at timestamptz, "
                "ADD COLUMN IF NOT EXISTS fallback jsonb")  # the way back (replicator/cutover/fallback.py)
    # Initial sync, per slot: the phase (schema -> copy -> streaming) and per table its state and
    # the snapshot LSN its copy was taken at. Stream changes to a table that commit before its
    # snapshot LSN are already in the copy and are skipped (PostgreSQL's table sync does the same).
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.sync (
        slot_name text PRIMARY KEY,
        phase text NOT NULL,
        consistent_lsn pg_lsn NOT NULL,
        pre_data_done boolean NOT NULL DEFAULT false,
        post_data_done boolean NOT NULL DEFAULT false,
        publication_created boolean NOT NULL DEFAULT false,
        started_at timestamptz NOT NULL DEFAULT now(),
        copied_at timestamptz)""")
    cur.execute(f"ALTER TABLE {s}.sync ADD COLUMN IF NOT EXISTS publication text")
    # when the copy (of what was left, on a resume) started: `status` reckons the copy's rate from it
    cur.execute(f"ALTER TABLE {s}.sync ADD COLUMN IF NOT EXISTS copy_started_at timestamptz")
    # the dead-letter table: every conflict not applied as sent (sink/conflicts.py)
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.conflicts (
        id bigserial PRIMARY KEY,
        slot_name text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        lsn pg_lsn,
        xid bigint,
        table_name text NOT NULL,
        kind text NOT NULL,
        key jsonb,
        old_row jsonb,
        new_row jsonb,
        target_row jsonb,
        resolution text NOT NULL,
        detail text)""")
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.skip (
        slot_name text NOT NULL,
        lsn pg_lsn NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        done_at timestamptz,
        PRIMARY KEY (slot_name, lsn))""")
    # Post-data groups created (replicator/sync/postdata.py): a table's indexes and constraints, or the
    # rest; each recorded in the transaction that created it.
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.post_data (
        slot_name text NOT NULL,
        item text NOT NULL,
        done_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (slot_name, item))""")
    # What would fire during apply without the replica role, held back until cutover
    # (replicator/sync/holdback.py): each definition recorded before the object is dropped or instead of
    # creating it; state held -> created (a foreign key NOT VALID) -> validated, or invalid.
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.held_back (
        slot_name text NOT NULL,
        kind text NOT NULL,
        table_name text NOT NULL,
        name text NOT NULL,
        definition text NOT NULL,
        was_valid boolean NOT NULL DEFAULT true,
        state text NOT NULL DEFAULT 'held',
        detail text,
        held_at timestamptz NOT NULL DEFAULT now(),
        restored_at timestamptz,
        PRIMARY KEY (slot_name, kind, table_name, name))""")
    # Schema changes captured on the source (sink/ddl.py), each recorded in the transaction that
    # applied (or skipped) it: what `status` counts.
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.ddl (
        id bigserial PRIMARY KEY,
        slot_name text NOT NULL,
        lsn pg_lsn,
        xid bigint,
        tag text NOT NULL,
        query text NOT NULL,
        search_path text,
        result text NOT NULL,
        detail text,
        at timestamptz NOT NULL DEFAULT now())""")
    # Without schema-change capture: each table's columns as the source last described them, to
    # tell what changed in the next description (sink/evolve.py)
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.source_columns (
        slot_name text NOT NULL,
        schema_name text NOT NULL,
        table_name text NOT NULL,
        columns jsonb NOT NULL,
        PRIMARY KEY (slot_name, schema_name, table_name))""")
    # Pause requests (replicator/stream/pause.py): `pgferry pause` (at_lsn NULL: at the next
    # transaction boundary) or `verify --online` (at_lsn X: everything committed before X applied,
    # nothing after). The daemon fills paused_lsn once it holds there; deleting the row resumes it.
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.pause (
        slot_name text PRIMARY KEY,
        at_lsn pg_lsn,
        requested_by text NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        paused_lsn pg_lsn,
        paused_since timestamptz)""")
    # Tables to re-copy while streaming (replicator/sync/resync.py): asked by `pgferry resync`, or
    # recorded with a schema change whose values only the source computed (sink/ddl.py)
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.resync (
        id bigserial PRIMARY KEY,
        slot_name text NOT NULL,
        table_name text NOT NULL,
        reason text,
        requested_at timestamptz NOT NULL DEFAULT now(),
        done_at timestamptz,
        snapshot_lsn pg_lsn,
        rows bigint)""")
    cur.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS resync_pending ON {s}.resync (slot_name, table_name) "
                "WHERE done_at IS NULL")
    cur.execute(f"""CREATE TABLE IF NOT EXISTS {s}.tables (
        slot_name text NOT NULL,
        schema_name text NOT NULL,
        table_name text NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        snapshot_lsn pg_lsn,
        rows bigint,
        bytes bigint,
        copied_at timestamptz,
        PRIMARY KEY (slot_name, schema_name, table_name))""")


# The change-by-change path's statements (UPDATE/DELETE: `EXECUTE` of a shape prepared on the
# connection, with its values inlined) run in ONE round trip: this function executes them in order
# and returns for each whether it touched its row. On an error it
# returns the counts of those before the failing one, whose effects the block's subtransaction
# undid; the caller re-runs those and names the failing change itself (sink/direct.py).
APPLY_EACH = "apply_each_v2"


def ensure_apply_function(cur: Any, schema: str) -> bool:
    """Create `<schema>.apply_each_v2(text[])` if missing: it runs statements that each return one
    row when they touched one (`RETURNING 1`, or `EXECUTE` of a statement prepared so) and returns
    1 or 0 per statement; on an error, the counts of those before it (the caller re-runs them).
    False when the role may not (the caller then sends one statement per round trip). Runs in a
    savepoint of the caller's transaction."""
    s = quote_ident(schema)
    cur.execute("SELECT to_regprocedure(%s) IS NOT NULL", (f"{s}.{APPLY_EACH}(text[])",))
    if cur.fetchone()[0]:
        return True
    cur.execute("SAVEPOINT pgferry_fn")
    try:
        cur.execute(f"""CREATE FUNCTION {s}.{APPLY_EACH}(statements text[]) RETURNS int[] LANGUAGE plpgsql AS $$
DECLARE
    counts int[] := '{{}}';
    n int;
    q text;
BEGIN
    FOREACH q IN ARRAY statements LOOP
        n := NULL;
        EXECUTE q INTO n;
        counts := counts || coalesce(n, 0);
    END LOOP;
    RETURN counts;
EXCEPTION WHEN OTHERS THEN
    RETURN counts;
END $$""")
    except Exception:  # no plpgsql, no CREATE on the schema: one round trip per statement
        log.warning("cannot create %s.%s on the target (%s): updates and deletes that go change by change "
                    "take one round trip each", schema, APPLY_EACH, "no plpgsql or no CREATE on the schema")
        cur.execute("ROLLBACK TO SAVEPOINT pgferry_fn")
        return False
    cur.execute("RELEASE SAVEPOINT pgferry_fn")
    return True


def read_progress(cur: Any, schema: str, slot: str) -> Lsn | None:
    """The stored progress for `slot`, or None when pgferry never streamed it into this target."""
    cur.execute(f"SELECT applied_lsn::text FROM {quote_ident(schema)}.progress WHERE slot_name = %s", (slot,))
    row = cur.fetchone()
    return None if row is None else Lsn.parse(row[0])


def init_progress(cur: Any, schema: str, slot: str, lsn: Lsn, created_slot: bool) -> None:
    cur.execute(f"INSERT INTO {quote_ident(schema)}.progress (slot_name, applied_lsn, slot_created_by_pgferry) "
                "VALUES (%s, %s::pg_lsn, %s) ON CONFLICT (slot_name) DO NOTHING", (slot, str(lsn), created_slot))


def snapshot_lsns(cur: Any, schema: str, slot: str) -> dict[tuple[str, str], Lsn]:
    """(schema, table) -> the LSN of the snapshot its copy was taken in."""
    cur.execute(f"SELECT schema_name, table_name, snapshot_lsn::text FROM {quote_ident(schema)}.tables "
                "WHERE slot_name = %s AND snapshot_lsn IS NOT NULL", (slot,))
    return {(n, t): Lsn.parse(lsn) for n, t, lsn in cur.fetchall()}


def pending_resyncs(cur: Any, schema: str, slot: str) -> list[str]:
    """The tables waiting to be re-copied, oldest request first."""
    cur.execute(f"SELECT table_name FROM {quote_ident(schema)}.resync WHERE slot_name = %s AND done_at IS NULL "
                "ORDER BY requested_at", (slot,))
    return [r[0] for r in cur.fetchall()]


def request_resync(cur: Any, schema: str, slot: str, table: str, reason: str) -> None:
    """Ask for `table` (schema.table as SQL) to be re-copied while streaming (the caller commits)."""
    cur.execute(f"INSERT INTO {quote_ident(schema)}.resync (slot_name, table_name, reason) VALUES (%s, %s, %s) "
                "ON CONFLICT (slot_name, table_name) WHERE done_at IS NULL DO NOTHING", (slot, table, reason))


def progress_sql(schema: str) -> str:
    """The statement a batch runs last, inside its transaction. GREATEST: progress never moves back."""
    s = quote_ident(schema)
    # RETURNING: whether a table waits to be re-copied (pgferry resync), and the pause asked for
    # (pause_sql's value): noticed at the next batch
    return (f"UPDATE {s}.progress SET applied_lsn = GREATEST(applied_lsn, %s::pg_lsn), "
            "source_commit_time = COALESCE(%s, source_commit_time), rows_applied = rows_applied + %s, "
            f"updated_at = now() WHERE slot_name = %s RETURNING EXISTS (SELECT 1 FROM {s}.resync r "
            f"WHERE r.slot_name = progress.slot_name AND r.done_at IS NULL), "
            f"({pause_sql(schema, 'progress.slot_name')})")


def pause_sql(schema: str, slot_expr: str = "%s") -> str:
    """The pause asked for the slot: NULL (none), '' (at the next transaction boundary) or an LSN."""
    return f"SELECT coalesce(at_lsn::text, '') FROM {quote_ident(schema)}.pause p WHERE p.slot_name = {slot_expr}"


HANDOFF_PREFIX = "pgferry-handoff"


def handoff_sql(schema: str) -> str:
    """Run by the daemon in the batch that applies the handoff marker's transaction."""
    return (f"UPDATE {quote_ident(schema)}.control SET state = 'handed_off', handoff_lsn = %s::pg_lsn, "
            "step = 'handed off', updated_at = now() WHERE slot_name = %s AND cutover_id = %s AND state = 'requested'")
