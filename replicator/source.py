"""The source side: connections, capability checks, replication slots.

Every failure here becomes a PgferryError whose message names what failed and the fix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from sink.state import pgferry_session, quote_ident

from .errors import ConnectError, SourceNotReady, UsageError, first_line

T = TypeVar("T")


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, without the password (never log a DSN as given)."""
    try:
        p = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(unparsable DSN)"
    return f"{p.get('host', 'localhost')}:{p.get('port', '5432')}/{p.get('dbname', p.get('user', '?'))}"


def connect(dsn: str, role: str = "source", **kwargs: object) -> psycopg2.extensions.connection:
    """Open a connection. A missing or malformed DSN is a usage error (exit 2); a server that cannot
    be reached or refuses (password, pg_hba, no such database, SSL) a ConnectError (exit 1)."""
    if not dsn:
        raise UsageError(f"no {role} given: pass --{role} DSN or set PGFERRY_{role.upper()}")
    try:
        psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise UsageError(f"invalid {role} DSN: {first_line(exc)} (expected e.g. "
                         f"'host=db1 port=5432 dbname=app user=pgferry' or postgresql://user@db1/app)") from None
    try:
        conn = psycopg2.connect(dsn, application_name="pgferry", client_encoding="UTF8", **kwargs)
    except psycopg2.OperationalError as exc:
        msg = first_line(exc)
        if msg.startswith("invalid ") and ("connection option" in msg or " value" in msg):
            # libpq checks the values when it connects: `port=notaport`, `sslmode=x`
            raise UsageError(f"invalid {role} DSN: {msg}") from None
        if "password authentication failed" in msg or "no password supplied" in msg:
            hint = "check the password in the DSN, PGPASSWORD or ~/.pgpass"
        elif "does not exist" in msg:
            hint = "check the database and user names in the DSN"
        elif "pg_hba.conf" in msg:
            hint = "allow this client in the server's pg_hba.conf and reload the server"
        else:
            hint = "check host, port and that the server is running and reachable"
        raise ConnectError(f"cannot connect to {role} {describe_dsn(dsn)}: {msg}; {hint}") from None
    if isinstance(conn, psycopg2.extras.LogicalReplicationConnection):
        # A walsender runs transactions too (the exported snapshot's, the catalog lookups while it
        # decodes a big transaction): the server's transaction_timeout would end the stream in
        # every retry, its idle_in_transaction_session_timeout the exported snapshot. And pgoutput
        # prints values with the walsender's DateStyle, IntervalStyle and extra_float_digits.
        with conn.cursor() as cur:
            pgferry_session(cur)
    return conn


def read_state(target: str, schema: str, read: Callable[[Any, str], T]) -> T | None:
    """Run `read(cursor, quoted schema)` on the target in a read-only moment and close; None
    when pgferry's state tables are not there (never started, or cleaned up)."""
    dst = connect(target, "target")
    try:
        with dst.cursor() as cur:
            try:
                return read(cur, quote_ident(schema))
            except (psycopg2.errors.UndefinedTable, psycopg2.errors.InvalidSchemaName):
                return None
            finally:
                dst.rollback()
    finally:
        dst.close()


def query_one(conn: Any, sql: str, params: tuple = ()) -> Any:
    """The first row of a query (None: no row), in a transaction of its own (rolled back)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    conn.rollback()
    return row


def max_protocol_version(server_version_num: int) -> int:
    """The highest pgoutput protocol version a server speaks (4 since 16, 3 since 15, 2 since 14)."""
    if server_version_num >= 160000:
        return 4
    if server_version_num >= 150000:
        return 3
    if server_version_num >= 140000:
        return 2
    return 1


class ThreadConnections:
    """Connections that worker threads open once and reuse (`mine`: this thread's), all closed
    together at the end (`close`)."""

    def __init__(self) -> None:
        self.mine = threading.local()
        self.opened: list[Any] = []
        self.lock = threading.Lock()

    def keep(self, conn: Any) -> Any:
        """Register a connection to be closed with the others; returns it."""
        with self.lock:
            self.opened.append(conn)
        return conn

    def close(self) -> None:
        with self.lock:
            for conn in self.opened:
                conn.close()
            self.opened.clear()


def completed_or_cancel(futures: Iterable[Future[Any]]) -> Iterator[Future[Any]]:
    """Each future as it completes. On the first failure the ones not started yet are cancelled
    (fail fast: a failed table or index group stops the rest) and its exception is raised."""
    futures = list(futures)
    for f in as_completed(futures):
        if f.exception() is not None:
            for other in futures:
                other.cancel()
        f.result()
        yield f


def table_spec_sql(spec: str) -> str:
    """A `--tables` entry (`schema.table` or `table`, as typed) as SQL: what CREATE PUBLICATION
    ... FOR TABLE names, and to_regclass finds."""
    return ".".join(quote_ident(p) for p in spec.split(".", 1))


def published_tables(src: Any, publication: str, only: list[str] | None = None) -> list[tuple[str, str]]:
    """(schema, table) of every table in `publication`, in order; `only`: those named there
    (`schema.table` or `table`)."""
    with src.cursor() as cur:
        cur.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1, 2",
                    (publication,))
        tables = cur.fetchall()
    src.rollback()
    if only:
        wanted = set(only)
        tables = [t for t in tables if f"{t[0]}.{t[1]}" in wanted or t[1] in wanted]
    return tables


def check_logical_source(conn: psycopg2.extensions.connection, dsn: str, publication: str | None) -> None:
    """wal_level, REPLICATION privilege and the publication: what any stream from this source needs."""
    where = describe_dsn(dsn)
    with conn.cursor() as cur:
        cur.execute("SHOW wal_level")
        (wal_level,) = cur.fetchone()
        if wal_level != "logical":
            raise SourceNotReady(
                f"source {where} has wal_level = {wal_level}; logical decoding needs wal_level = logical: "
                "run ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart the server")
        cur.execute("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user")
        row = cur.fetchone()
        if row is not None and not (row[0] or row[1]):
            cur.execute("SELECT current_user")
            (user,) = cur.fetchone()
            raise SourceNotReady(
                f"role {user} on source {where} lacks the REPLICATION privilege: "
                f"run ALTER ROLE {user} WITH REPLICATION as a superuser")
        if publication is not None:
            cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
            if cur.fetchone() is None:
                raise SourceNotReady(
                    f"publication {publication!r} does not exist on source {where}: create it with "
                    f"CREATE PUBLICATION {publication} FOR ALL TABLES (or FOR TABLE ...), or pass --publication")


def replication_connection(dsn: str, **kwargs: object) -> psycopg2.extras.LogicalReplicationConnection:
    """A logical replication connection to the source (the stream's, tail's): a refusal exits 1
    from every command, with the pg_hba.conf rule such a connection matches."""
    try:
        return connect(dsn, "source", connection_factory=psycopg2.extras.LogicalReplicationConnection, **kwargs)
    except ConnectError as exc:
        raise ConnectError(
            f"{exc}; a logical replication connection matches the database name in pg_hba.conf "
            "(not the 'replication' keyword)") from None


def slot_wal(dsn: str, slot: str, application_name: str) -> tuple[int | None, int | None] | None:
    """(WAL the slot retains, its safe_wal_size) in bytes, on a short connection of its own; None
    when the slot is missing or the source does not answer (callers poll: the next poll retries)."""
    try:
        conn = psycopg2.connect(dsn, application_name=application_name, connect_timeout=5)
    except psycopg2.Error:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, safe_wal_size "
                        "FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
    except psycopg2.Error:
        return None
    finally:
        conn.close()
    if row is None:
        return None
    return (None if row[0] is None else int(row[0]), None if row[1] is None else int(row[1]))
