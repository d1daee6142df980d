"""`pgferry tail`: print the source's decoded changes as JSON lines.

One line per change (insert, update, delete, truncate, logical message) with its LSN, the commit
LSN, xid and commit time of its transaction, schema, table, op, key, old and new values. Values
are typed JSON (numbers, booleans, strings, arrays, embedded json); NULL is `null`; an unchanged
TOASTed column (not sent by the server) is left out of `new` and named in `unchanged_toast`.
NaN/Infinity and dates at ±infinity print as strings, bytea as `\\x...` hex, numeric as a string
(exact), interval in PostgreSQL's text form.

The stream uses a temporary slot unless --slot names one; a temporary slot vanishes when the
connection closes (Ctrl-C, SIGTERM, a crash).
"""

from __future__ import annotations

import math
import os
import select
import signal
import sys
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import IO, Any
from uuid import UUID

import msgspec
import psycopg2
import psycopg2.extras

from decoder import (
    UNCHANGED,
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
    Truncate,
    Update,
)
from decoder.values import Interval, convert, pg_epoch_to_datetime

from ..errors import PgferryError, first_line
from ..source import (
    check_logical_source,
    connect,
    describe_dsn,
    max_protocol_version,
    replication_connection,
)
from ..stream.stopflag import StopFlag

_INFINITE_TYPES = {1082, 1114, 1184}  # date, timestamp, timestamptz print 'infinity'


def jsonable(value: Any, type_oid: int) -> Any:
    """A converted column value -> something JSON shows without loss or ambiguity."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            if type_oid in _INFINITE_TYPES:
                return "infinity" if value > 0 else "-infinity"
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, Interval):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, list):
        return [jsonable(v, type_oid) for v in value]
    return value  # parsed json: dict / list / scalars


class ChangeFormatter:
    """Turns decoded messages into JSON-ready dicts; keeps the relation cache and the current
    transaction's identity."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.begin: Begin | None = None  # the open transaction
        self.origin: str | None = None

    def _row(self, rel: Relation, values: tuple | None, key_only: bool = False,
             ) -> tuple[dict[str, Any] | None, list[str]]:
        if values is None:
            return None, []
        out: dict[str, Any] = {}
        unchanged: list[str] = []
        for col, v in zip(rel.columns, values, strict=True):
            if key_only and not col.is_key:
                continue  # a 'K' tuple sends NULL for non-key columns: they are unknown, not NULL
            if v is UNCHANGED:
                unchanged.append(col.name)
            else:
                out[col.name] = jsonable(convert(v, col.type_oid), col.type_oid)
        return out, unchanged

    @staticmethod
    def _base(lsn: Lsn, op: str, txn: Begin | None) -> dict[str, Any]:
        return {
            "lsn": str(lsn),
            "commit_lsn": str(txn.final_lsn) if txn is not None else None,
            "xid": txn.xid if txn is not None else None,
            "commit_time": pg_epoch_to_datetime(txn.commit_time).isoformat() if txn is not None else None,
            "op": op,
        }

    def format(self, msg: Message, lsn: Lsn) -> dict[str, Any] | None:
        if isinstance(msg, Begin):
            self.begin = msg
            self.origin = None
            return None
        if isinstance(msg, Commit):
            self.begin = None
            return None
        if isinstance(msg, Relation):
            self.relations[msg.oid] = msg
            return None
        if isinstance(msg, Origin):
            self.origin = msg.name
            return None
        if isinstance(msg, (Insert, Update, Delete)):
            t = type(msg)
            rel = self.relations.get(msg.relation_oid)
            if rel is None:
                raise PgferryError(f"change for relation OID {msg.relation_oid} at {lsn} arrived before its "
                                   "Relation message: the stream is inconsistent")
            op = {Insert: "insert", Update: "update", Delete: "delete"}[t]
            new, unchanged = self._row(rel, getattr(msg, "new", None))
            old, _ = self._row(rel, getattr(msg, "old", None), key_only=getattr(msg, "old_kind", None) == "K")
            keysrc = old if t is Delete or (t is Update and old is not None) else new
            key = {c.name: keysrc.get(c.name) for c in rel.columns if c.is_key} if keysrc else None
            line = self._base(lsn, op, self.begin)
            line.update({"schema": rel.namespace, "table": rel.name, "key": key, "old": old, "new": new})
            if unchanged:
                line["unchanged_toast"] = unchanged
            if self.origin:
                line["origin"] = self.origin
            return line
        if isinstance(msg, Truncate):
            line = self._base(lsn, "truncate", self.begin)
            line["tables"] = [
                f"{self.relations[o].namespace}.{self.relations[o].name}" if o in self.relations else str(o)
                for o in msg.relation_oids]
            line.update({"cascade": msg.cascade, "restart_identity": msg.restart_identity})
            return line
        if isinstance(msg, LogicalMessage):
            # A non-transactional message belongs to no transaction, even if one is open.
            line = self._base(lsn, "message", self.begin if msg.transactional else None)
            try:
                content: str = msg.content.decode()
            except UnicodeDecodeError:
                content = "\\x" + msg.content.hex()
            line.update({"transactional": msg.transactional, "prefix": msg.prefix, "content": content})
            return line
        return None  # Type messages and the like carry nothing to print


def run_tail(source_dsn: str, publication: str, slot: str | None, out: IO[str] = sys.stdout,
             on_ready: Callable[[str], None] | None = None) -> int:
    """Stream and print until interrupted. Returns the exit code."""
    conn = connect(source_dsn)
    try:
        check_logical_source(conn, source_dsn, publication)
        proto = max_protocol_version(conn.server_version)
        if slot is not None:
            with conn.cursor() as cur:
                cur.execute("SELECT plugin, active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                row = cur.fetchone()
            if row is not None and row[0] != "pgoutput":
                raise PgferryError(f"slot {slot!r} uses plugin {row[0]}, not pgoutput: name another slot")
            if row is not None and row[1]:
                raise PgferryError(f"slot {slot!r} is in use by another connection: stop it or name another slot")
            create = row is None
        else:
            create = True
    finally:
        conn.close()

    repl = replication_connection(source_dsn)
    cur = repl.cursor()
    slot_name = slot or f"pgferry_tail_{os.getpid()}"
    try:
        if create:
            # Legacy syntax: understood by every server version with pgoutput (10+).
            temp = "" if slot else " TEMPORARY"
            cur.execute(f"CREATE_REPLICATION_SLOT {psycopg2.extensions.quote_ident(slot_name, cur)}"
                        f"{temp} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
        cur.start_replication(slot_name=slot_name, decode=False, options={
            "proto_version": str(proto), "publication_names": publication, "messages": "true"})
    except psycopg2.Error as exc:
        repl.close()
        raise PgferryError(f"could not start streaming from {describe_dsn(source_dsn)} "
                           f"slot {slot_name}: {first_line(exc)}") from None

    if on_ready is not None:
        on_ready(slot_name)
    decoder = PgOutputDecoder()
    fmt = ChangeFormatter()
    encode = msgspec.json.Encoder().encode

    def consume(msg: psycopg2.extras.ReplicationMessage) -> None:
        m = decoder.decode(msg.payload)
        line = fmt.format(m, Lsn(msg.data_start))
        if line is not None:
            out.write(encode(line).decode() + "\n")
        end = m.end_lsn if isinstance(m, Commit) else m.lsn if isinstance(m, LogicalMessage) and not m.transactional \
            else None
        if end is not None:
            out.flush()
            # Acknowledge what is printed: a named slot then resumes after it.
            msg.cursor.send_feedback(flush_lsn=end)

    # Our own read loop instead of consume_stream(): its select() runs inside psycopg2's C code,
    # which does not return to Python for a signal, so Ctrl-C could wait for the next message.
    stop = StopFlag()
    old = {sig: signal.signal(sig, stop.request) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.set:
            msg = cur.read_message()
            if msg is not None:
                consume(msg)
            else:
                select.select([repl, stop], [], [], 1.0)
    except psycopg2.Error as exc:
        raise PgferryError(f"replication stream from {describe_dsn(source_dsn)} failed: "
                           f"{first_line(exc)}") from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        try:
            repl.close()  # a temporary slot is dropped with its connection
        except psycopg2.Error:
            pass
    return 0
