"""DDL capture on the source: an event trigger that writes each schema change into the WAL.

PostgreSQL's logical replication carries no DDL. pgferry installs, in the source database, an
event trigger (`pgferry_ddl`, on `ddl_command_end` and `sql_drop`) whose function emits, inside the
transaction that ran the command, a transactional logical message (prefix `pgferry.ddl`) holding
the command's text, its `search_path`, the role, and the objects it created, changed or dropped.
pgoutput (option `messages`) delivers it exactly between the data changes before and after the
command, so the sink applies it at that position (sink/ddl.py).

Creating an event trigger takes a superuser (up to PostgreSQL 18): where the source role is not
one, pgferry follows what the stream itself shows (sink/evolve.py) and preflight says so.

The function is SECURITY DEFINER (the application's roles may not call pg_logical_emit_message)
and skips pgferry's own objects and publications. It has no EXCEPTION block on purpose: that runs
it in a subtransaction, and a message emitted in a subtransaction reaches the decoder AFTER the
changes its top transaction made later (seen on PostgreSQL 15: the row inserted right after an
ALTER TABLE came before the ALTER's message). It does nothing when wal_level is not logical, the
one condition under which pg_logical_emit_message fails. It is removed by `pgferry cleanup`.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg2

from sink.ddl import PREFIX
from sink.state import quote_ident

log = logging.getLogger("pgferry.ddl")

TRIGGER = "pgferry_ddl"
DROP_TRIGGER = "pgferry_ddl_drop"
FUNCTION = "pgferry_capture_ddl"

# Tags never replayed: pgferry's own (publications) and what a target has no business with.
IGNORED_TAGS = ("CREATE PUBLICATION", "ALTER PUBLICATION", "DROP PUBLICATION", "CREATE SUBSCRIPTION",
                "ALTER SUBSCRIPTION", "DROP SUBSCRIPTION")


def _function_sql(schema: str) -> str:
    s = quote_ident(schema)
    ignored = ", ".join(f"'{t}'" for t in IGNORED_TAGS)
    # One message per client statement: a query string of several statements fires the trigger once
    # per statement with the same current_query(); statement_timestamp() tells them from a second
    # statement of the same text (pgferry.ddl_last, local to the transaction).
    return f"""
CREATE OR REPLACE FUNCTION {s}.{FUNCTION}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $pgferry$
DECLARE
    objs jsonb;
    dropped jsonb;
    key text;
    -- the command's own search_path (a SET clause on the function would hide it): read, then
    -- replaced by a safe one for the function's body until it returns
    caller_path text := pg_catalog.current_setting('search_path');
BEGIN
    IF pg_catalog.current_setting('pgferry.capture', true) = 'off' THEN
        RETURN;  -- pgferry installing (or refreshing) the capture itself
    END IF;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    IF current_setting('wal_level') <> 'logical' OR tg_tag IN ({ignored}) THEN
        PERFORM set_config('search_path', caller_path, true);
        RETURN;
    END IF;
    IF tg_event = 'sql_drop' THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object('type', object_type, 'identity', object_identity,
                                                     'schema', schema_name)), '[]')
          INTO dropped FROM pg_event_trigger_dropped_objects() WHERE original;
        PERFORM set_config('pgferry.ddl_dropped',
                           (coalesce(nullif(current_setting('pgferry.ddl_dropped', true), ''), '[]')::jsonb
                            || dropped)::text, true);
        PERFORM set_config('search_path', caller_path, true);
        RETURN;
    END IF;
    dropped := coalesce(nullif(current_setting('pgferry.ddl_dropped', true), ''), '[]')::jsonb;
    PERFORM set_config('pgferry.ddl_dropped', '', true);
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'type', c.object_type, 'identity', c.object_identity, 'schema', c.schema_name,
               'table', (SELECT i.indrelid::regclass::text FROM pg_index i
                         WHERE c.classid = 'pg_class'::regclass AND i.indexrelid = c.objid))), '[]')
      INTO objs FROM pg_event_trigger_ddl_commands() c WHERE NOT c.in_extension;
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(objs || dropped) o
                   WHERE o->>'schema' IS DISTINCT FROM {_literal(schema)}) THEN
        PERFORM set_config('search_path', caller_path, true);
        RETURN;  -- nothing outside pgferry's own schema (or a command inside an extension script)
    END IF;
    key := md5(current_query()) || statement_timestamp()::text;
    IF current_setting('pgferry.ddl_last', true) = key THEN
        PERFORM set_config('search_path', caller_path, true);
        RETURN;  -- the same client statement's text was already sent
    END IF;
    PERFORM set_config('pgferry.ddl_last', key, true);
    PERFORM pg_logical_emit_message(true, '{PREFIX}', jsonb_build_object(
        'tag', tg_tag, 'query', current_query(), 'search_path', caller_path,
        'role', session_user::text, 'objects', objs, 'dropped', dropped)::text);
    PERFORM set_config('search_path', caller_path, true);
END
$pgferry$"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def can_capture(cur: Any) -> str | None:
    """None when this source session may install the capture; else why not (for preflight)."""
    cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    row = cur.fetchone()
    if not row or not row[0]:
        return ("creating an event trigger takes a superuser on the source; without one pgferry follows "
                "only what the stream shows (added and dropped columns, new tables)")
    return None


def installed(cur: Any) -> bool:
    cur.execute("SELECT count(*) = 2 FROM pg_event_trigger WHERE evtname IN (%s, %s) AND evtenabled <> 'D'",
                (TRIGGER, DROP_TRIGGER))
    return bool(cur.fetchone()[0])


def install(conn: Any, schema: str) -> bool:
    """Install (or refresh) the capture in the source database `conn` is on; commits. False when
    the role may not (nothing is left behind)."""
    s = quote_ident(schema)
    with conn.cursor() as cur:
        if can_capture(cur) is not None:
            conn.rollback()
            return False
        try:
            cur.execute("SET LOCAL pgferry.capture = off")
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            cur.execute(_function_sql(schema))
            cur.execute(f"REVOKE ALL ON FUNCTION {s}.{FUNCTION}() FROM PUBLIC")
            cur.execute(f"DROP EVENT TRIGGER IF EXISTS {TRIGGER}; DROP EVENT TRIGGER IF EXISTS {DROP_TRIGGER}")
            cur.execute(f"CREATE EVENT TRIGGER {TRIGGER} ON ddl_command_end EXECUTE FUNCTION {s}.{FUNCTION}()")
            cur.execute(f"CREATE EVENT TRIGGER {DROP_TRIGGER} ON sql_drop EXECUTE FUNCTION {s}.{FUNCTION}()")
        except psycopg2.errors.InsufficientPrivilege:
            conn.rollback()
            return False
    conn.commit()
    return True


def remove(conn: Any, schema: str) -> bool:
    """Drop the capture (and its schema on the source when nothing else is in it); True if it
    was there. The caller commits."""
    s = quote_ident(schema)
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('pgferry.capture', 'off', false)")  # (this session is pgferry's)
        cur.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname IN (%s, %s)", (TRIGGER, DROP_TRIGGER))
        was = cur.fetchone()[0] > 0
        cur.execute(f"DROP EVENT TRIGGER IF EXISTS {TRIGGER}; DROP EVENT TRIGGER IF EXISTS {DROP_TRIGGER}")
        cur.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
        if cur.fetchone()[0]:
            cur.execute(f"DROP FUNCTION IF EXISTS {s}.{FUNCTION}()")
            cur.execute("SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = to_regnamespace(%s)) + "
                        "(SELECT count(*) FROM pg_proc WHERE pronamespace = to_regnamespace(%s)) + "
                        "(SELECT count(*) FROM pg_type WHERE typnamespace = to_regnamespace(%s))",
                        (schema, schema, schema))
            if cur.fetchone()[0] == 0:
                cur.execute(f"DROP SCHEMA IF EXISTS {s}")
    return was


def install_for_start(dsn: str, schema: str) -> bool:
    """`start`: install the capture where the source role may (logged either way)."""
    from ..source import connect, describe_dsn

    conn = connect(dsn, "source")
    try:
        with conn.cursor() as cur:
            why = can_capture(cur)
        conn.rollback()
        if why is None and install(conn, schema):
            log.info("schema changes on source %s are captured (event trigger %s): they are applied on the "
                     "target where they happen", describe_dsn(dsn), TRIGGER)
            return True
        log.warning("schema changes on source %s are not captured: %s", describe_dsn(dsn),
                    why or "the role may not create an event trigger")
        return False
    finally:
        conn.close()
