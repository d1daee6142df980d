"""The cutover's fence on the source: every published table refuses writes, whoever writes.

Why triggers, not `default_transaction_read_only`: that setting is a default. A role with its own
setting (role settings win over the database's), a client connecting with
`options=-c default_transaction_read_only=off`, or one that runs `BEGIN READ WRITE` writes through
it. A statement-level trigger `BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE`, set `ENABLE ALWAYS`,
fires for every role (superusers too), every session setting, `session_replication_role =
replica` included, COPY, and a cascade from another table. Privileges would not stop a superuser
or a table's owner; `NOLOGIN` would reach every database of the cluster and end sessions that only
read.

The fence goes up in one source transaction: `LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE` on every
published table (and the tables above and below it in a partition tree) waits for the writers in
flight, which commit before it and so before the handoff marker; writers that come after wait on
the lock, and once the transaction commits the trigger refuses them (SQLSTATE 25006, the read-only
error, with a message that says where the data went). A writer that holds its transaction open
longer than `fence_wait` seconds is ended (pg_terminate_backend): its transaction never commits.

Nothing else on the server changes, so lifting the fence restores exactly what was there: drop
the triggers (the catalog lists them: the state to undo is the fence itself, found again after a
kill) and the function. Reads go on all along. Tables outside the publication are not fenced: they
are not migrated either.

The trigger function counts each refused statement in a sequence (nextval is not rolled back with
the refused transaction): the receipt's `refused_writes`.

pgferry's own sessions pass: after a cutover with `--fallback` the daemon applies the new server's
writes to the fenced old source. The fence lets through a session whose `pgferry.fence_key`
setting equals a random key kept as the value of a sequence in the state schema that only its
owner (pgferry's source role) may read; the trigger function, SECURITY DEFINER, reads it. A
sequence, not a table: a publication FOR ALL TABLES would stream a table's row to the target.
A client would have to read that sequence first: the fence keeps out applications, not pgferry's
own role.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg2
import psycopg2.errors

from sink.state import quote_ident

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn

log = logging.getLogger("pgferry.cutover")

TRIGGER = "pgferry_fence"
FUNCTION = "pgferry_fence"
COUNTER = "pgferry_fence_refused"
KEY_TABLE = "fence_key"
KEY_SETTING = "pgferry.fence_key"
# conflicts with SHARE ROW EXCLUSIVE: a write (RowExclusive) or stronger, held by another session
_WRITE_LOCKS = ("RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
                "ExclusiveLock", "AccessExclusiveLock")


def _function_sql(schema: str, cutover_id: str) -> str:
    s = quote_ident(schema)
    return f"""CREATE OR REPLACE FUNCTION {s}.{FUNCTION}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog AS $pgferry$
BEGIN
    IF current_setting('{KEY_SETTING}', true) = (SELECT last_value::text FROM {s}.{KEY_TABLE}) THEN
        RETURN NULL;  -- pgferry's own apply (a fallback); a statement trigger's result is ignored
    END IF;
    PERFORM nextval('{s}.{COUNTER}');
    RAISE EXCEPTION 'pgferry: table %.% is fenced: this database is being handed over to another server '
                    '(cutover {cutover_id}); writes are refused here',
        quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME)
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'connect to the new server; `pgferry cutover --undo` lifts the fence '
                     'if the cutover did not finish';
END
$pgferry$"""


def _fenced_relations(cur: Any, publication: str) -> list[tuple[int, str]]:
    """(oid, quoted name) of the published tables, the partitions below and the partitioned
    tables above them: a write through any of them reaches a published row."""
    # the published tables first (MATERIALIZED): otherwise the planner may cast other catalog rows'
    # names to regclass, and a role without USAGE on pg_toast fails on a TOAST table's name
    cur.execute("""WITH pub AS MATERIALIZED (
            SELECT format('%%I.%%I', schemaname, tablename)::regclass AS relid
            FROM pg_publication_tables WHERE pubname = %s)
        SELECT DISTINCT c.oid, format('%%I.%%I', n.nspname, c.relname)
        FROM pub, LATERAL (SELECT relid FROM pg_partition_tree(pub.relid)
                           UNION SELECT relid FROM pg_partition_ancestors(pub.relid)
                           UNION SELECT pub.relid) r
        JOIN pg_class c ON c.oid = r.relid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') ORDER BY 2""", (publication,))
    return [(int(oid), name) for oid, name in cur.fetchall()]


def fenced_tables(cur: Any) -> list[str]:
    """The source tables a pgferry fence is up on (the catalog is the fence's own record)."""
    cur.execute("SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_trigger t JOIN pg_class c ON c.oid = "
                "t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = %s ORDER BY 1",
                (TRIGGER,))
    return [r[0] for r in cur.fetchall()]


def refused(cur: Any, schema: str) -> int:
    """Writes the fence has refused so far (0 when it is not there)."""
    cur.execute("SELECT to_regclass(%s)", (f"{quote_ident(schema)}.{COUNTER}",))
    if cur.fetchone()[0] is None:
        return 0
    cur.execute(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {quote_ident(schema)}.{COUNTER}")
    return int(cur.fetchone()[0])


class Fence:
    """The source's write fence for one cutover. `raise_` and `lift` each commit on their own."""

    def __init__(self, dsn: str, publication: str, schema: str, cutover_id: str = "",
                 fence_wait: float = 5.0, timeout: float = 60.0) -> None:
        self.dsn = dsn
        self.publication = publication
        self.schema = schema
        self.cutover_id = cutover_id
        self.fence_wait = fence_wait
        self.timeout = timeout
        self.tables: list[str] = []
        self.ended: list[int] = []  # sessions ended because they held a write open past fence_wait

    def raise_(self) -> list[str]:
        """Fence every published table; returns their names. Waits for the writes in flight (ending
        those still open after fence_wait), up to timeout."""
        conn = connect(self.dsn, "source")
        s = quote_ident(self.schema)
        started = time.monotonic()
        try:
            with conn.cursor() as cur:
                while True:
                    cur.execute("SET LOCAL pgferry.capture = off")  # not a schema change to replay
                    cur.execute("SET LOCAL lock_timeout = '200ms'")
                    relations = _fenced_relations(cur, self.publication)
                    if not relations:
                        conn.rollback()
                        raise PgferryError(f"publication {self.publication!r} on source {describe_dsn(self.dsn)} "
                                           "has no tables: nothing to fence")
                    try:
                        cur.execute(f"LOCK TABLE {', '.join(n for _, n in relations)} IN SHARE ROW EXCLUSIVE MODE")
                        break
                    except psycopg2.errors.LockNotAvailable:
                        conn.rollback()
                    except psycopg2.errors.InsufficientPrivilege as exc:
                        conn.rollback()
                        raise self._privilege_error(exc) from None
                    waited = time.monotonic() - started
                    if waited > self.timeout:
                        raise PgferryError(f"cannot fence source {describe_dsn(self.dsn)}: writers held the "
                                           f"published tables for {waited:.0f} s ({self._holders(cur, relations)}); "
                                           "nothing was changed")
                    if waited > self.fence_wait:
                        self._end_writers(cur, relations)
                try:
                    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                    cur.execute(f"CREATE SEQUENCE IF NOT EXISTS {s}.{COUNTER}")
                    cur.execute("SELECT to_regclass(%s) IS NULL", (f"{s}.{KEY_TABLE}",))
                    if cur.fetchone()[0]:
                        cur.execute(f"CREATE SEQUENCE {s}.{KEY_TABLE} MINVALUE 1 MAXVALUE 9000000000000000000")
                        cur.execute(f"REVOKE ALL ON {s}.{KEY_TABLE} FROM PUBLIC")
                        cur.execute("SELECT setval(%s::regclass, 1 + floor(random() * 8.9e18)::bigint)",
                                    (f"{s}.{KEY_TABLE}",))
                    cur.execute(_function_sql(self.schema, self.cutover_id))
                    for _, name in relations:
                        cur.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {name}")
                        cur.execute(f"CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON "
                                    f"{name} FOR EACH STATEMENT EXECUTE FUNCTION {s}.{FUNCTION}()")
                        cur.execute(f"ALTER TABLE {name} ENABLE ALWAYS TRIGGER {TRIGGER}")
                except psycopg2.Error as exc:
                    conn.rollback()
                    raise self._privilege_error(exc) from None
            conn.commit()
        finally:
            conn.close()
        self.tables = [n for _, n in relations]
        log.info("source fenced: %d table(s) refuse writes from every session but pgferry's%s", len(self.tables),
                 f" ({len(self.ended)} session(s) that held a write open were ended)" if self.ended else "")
        return self.tables

    def _privilege_error(self, exc: psycopg2.Error) -> PgferryError:
        return PgferryError(f"cannot fence source {describe_dsn(self.dsn)}: {first_line(exc)} (the fence is a "
                            "trigger on each published table: it takes their owner or a superuser; or use "
                            "--fence none and stop the writers yourself). Nothing was changed")

    def _holders(self, cur: Any, relations: list[tuple[int, str]]) -> str:
        cur.execute("""SELECT l.pid, a.usename, a.state, now() - a.xact_start FROM pg_locks l
            LEFT JOIN pg_stat_activity a USING (pid)
            WHERE l.relation = ANY(%s::oid[]) AND l.granted AND l.mode = ANY(%s) AND l.pid IS DISTINCT FROM
              pg_backend_pid() GROUP BY 1, 2, 3, 4 ORDER BY 1""", ([o for o, _ in relations], list(_WRITE_LOCKS)))
        rows = cur.fetchall()
        conn = cur.connection
        conn.rollback()
        if not rows:
            return "they are gone now"
        return ", ".join(f"pid {p} ({u}, {st}, transaction open {age})" if p else "a prepared transaction"
                         for p, u, st, age in rows)

    def _end_writers(self, cur: Any, relations: list[tuple[int, str]]) -> None:
        cur.execute("""SELECT DISTINCT l.pid, pg_terminate_backend(l.pid) FROM pg_locks l
            JOIN pg_stat_activity a USING (pid)
            WHERE l.relation = ANY(%s::oid[]) AND l.granted AND l.mode = ANY(%s) AND l.pid <> pg_backend_pid()
              AND a.backend_type = 'client backend' AND a.xact_start < now() - make_interval(secs => %s)""",
                    ([o for o, _ in relations], list(_WRITE_LOCKS), self.fence_wait))
        pids = [p for p, ok in cur.fetchall() if ok]
        cur.connection.rollback()
        if pids:
            self.ended.extend(pids)
            log.warning("ended %d session(s) that held a write open on a published table for over %.0f s (pid %s): "
                        "their transactions roll back", len(pids), self.fence_wait, ", ".join(map(str, pids)))

    def refused(self) -> int:
        conn = connect(self.dsn, "source")
        try:
            return refused(conn.cursor(), self.schema)
        finally:
            conn.close()


def lift(dsn: str, schema: str, deadline_s: float = 60.0) -> list[str]:
    """Drop every pgferry fence trigger on the source (whichever cutover raised it) and the
    function; returns the tables it was on. Safe to run again, and after a kill."""
    s = quote_ident(schema)
    try:
        conn = connect(dsn, "source")
    except PgferryError as exc:
        raise PgferryError(f"could not lift the fence on source {describe_dsn(dsn)} ({exc}): its published tables "
                           "still refuse writes. Run `pgferry cutover --undo` once it is reachable") from None
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute("SET LOCAL pgferry.capture = off")
                # DROP TRIGGER takes an ACCESS EXCLUSIVE lock: a short wait each try, so the
                # application's reads do not queue behind it for long
                cur.execute("SET LOCAL lock_timeout = '100ms'")
                tables = fenced_tables(cur)
                try:
                    for name in tables:
                        cur.execute(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {name}")
                    cur.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
                    if cur.fetchone()[0]:
                        cur.execute(f"DROP FUNCTION IF EXISTS {s}.{FUNCTION}()")
                        cur.execute(f"DROP SEQUENCE IF EXISTS {s}.{COUNTER}")
                        cur.execute(f"DROP SEQUENCE IF EXISTS {s}.{KEY_TABLE}")
                    conn.commit()
                    break
                except psycopg2.errors.LockNotAvailable:
                    conn.rollback()
                    if time.monotonic() - started > deadline_s:
                        raise PgferryError(f"could not lift the fence on source {describe_dsn(dsn)}: long "
                                           f"transactions held its tables for {deadline_s:.0f} s. Run "
                                           "`pgferry cutover --undo` again") from None
    except psycopg2.Error as exc:
        raise PgferryError(f"could not lift the fence on source {describe_dsn(dsn)}: {first_line(exc)}. Its published "
                           "tables still refuse writes; run `pgferry cutover --undo` again") from None
    finally:
        conn.close()
    if tables:
        log.info("fence lifted: %d source table(s) take writes again", len(tables))
    return tables


def pass_through(conn: Any, schema: str) -> bool:
    """Let this session (pgferry's apply into a fenced server) through the fence, if one is up
    there; commits. True when a fence key was found."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f"{quote_ident(schema)}.{KEY_TABLE}",))
        if cur.fetchone()[0] is None:
            conn.commit()
            return False
        cur.execute(f"SELECT set_config(%s, last_value::text, false) FROM {quote_ident(schema)}.{KEY_TABLE}",
                    (KEY_SETTING,))
        found = cur.fetchone() is not None
    conn.commit()
    return found


def source_fenced(dsn: str) -> list[str]:
    conn = connect(dsn, "source")
    try:
        return fenced_tables(conn.cursor())
    finally:
        conn.close()


