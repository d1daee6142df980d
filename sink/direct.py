"""The change-by-change path of the sink: what cannot be folded into a set-based batch (a key
change, a FULL-identity update or delete, a table where a trigger or foreign key fires) and every change
while a failed batch is re-applied in exact source order (`Sink.isolate_until`).

Inserts are buffered into multi-row INSERTs; in exact mode a failing one is retried row by row
under savepoints so the conflicting row is found and resolved (sink/resolve.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extras

from decoder import Lsn

from .errors import RETRYABLE
from .netbatch import INS, existing_rows
from .relations import TargetTable

if TYPE_CHECKING:
    from .errors import ApplyError
    from .resolve import ConflictResolver

INSERT_ROWS = 1000  # rows per multi-row INSERT
EACH_STATEMENTS = 1000  # buffered UPDATE/DELETE statements per round trip (state.APPLY_EACH)...
EACH_BYTES = 4 << 20  # ...or this much SQL text
PREPARED_MAX = 1000  # statement shapes prepared per target connection; the rest are sent as text
_PLACEHOLDER = re.compile(r"%s")



def first_line_of(exc: psycopg2.Error) -> str:
    text = (exc.pgerror or str(exc)).strip()
    return text.splitlines()[0] if text else repr(exc)


@dataclass
class InsertRun:
    """A run of inserts into one table with the same columns, sent as one multi-row INSERT."""

    head: str | None = None  # `INSERT INTO ... VALUES %s` of the run (identity: same table and columns)
    template: str = ""
    table: str = ""  # its name, for messages
    rows: list[list[Any]] = field(default_factory=list)
    meta: list[tuple[TargetTable, tuple, Lsn | None, int | None]] = field(default_factory=list)  # for conflicts
    lsn: Lsn | None = None  # of the newest row's transaction: named on failure
    xid: int | None = None

    def fits(self, head: str) -> bool:
        """May a row of statement `head` join the run (else: flush it first)?"""
        return head is self.head and len(self.rows) < INSERT_ROWS

    def start(self, head: str, template: str, table: str) -> None:
        self.head, self.template, self.table = head, template, table

    def add(self, params: list[Any], table: TargetTable, row: tuple, lsn: Lsn | None, xid: int | None) -> None:
        self.rows.append(params)
        self.meta.append((table, row, lsn, xid))
        self.lsn, self.xid = lsn, xid

    def take(self) -> tuple[list[list[Any]], list[tuple[TargetTable, tuple, Lsn | None, int | None]]]:
        rows, meta = self.rows, self.meta
        self.rows, self.meta = [], []
        return rows, meta


# per buffered statement, what a conflict names: (table, kind, key, [message type, row, lsn, xid],
# sql, params, row for apply_error)
Buffered = tuple[TargetTable, str, tuple, list[Any], str, list[Any], Any]


@dataclass
class StatementBuffer:
    """UPDATE/DELETE statements of the change-by-change path waiting to go in one round trip
    (state.APPLY_EACH), and the statement shapes prepared on this connection."""

    sql: str | None = None  # `SELECT <state>.apply_each_v2(%s::text[])`, or None: one round trip each
    statements: list[Buffered] = field(default_factory=list)
    bytes: int = 0
    prepared: int = 0  # shapes prepared on the connection so far (PREPARED_MAX at most)

    def add(self, statement: Buffered) -> bool:
        """Buffer one; True when the buffer is full (send it)."""
        self.statements.append(statement)
        self.bytes += len(statement[4]) + sum(len(p) for p in statement[5] if type(p) is str)
        return len(self.statements) >= EACH_STATEMENTS or self.bytes >= EACH_BYTES

    def take(self) -> list[Buffered]:
        out, self.statements, self.bytes = self.statements, [], 0
        return out


class DirectHost(Protocol):
    """What the change-by-change path reads from the sink that owns it: the open source
    transaction (`_exact`, `_commit_lsn`, `_xid`), the table being applied (`_current`, named in
    errors), waiting for the background batch (`_join`) and the error it raises."""

    _exact: bool
    _current: str | None
    _commit_lsn: Lsn | None
    _xid: int | None

    def _join(self) -> None: ...

    def _apply_error(self, exc: psycopg2.Error, lsn: Lsn | None = None,
                     xid: int | None = None) -> ApplyError: ...


class DirectPath:
    """The change-by-change path: a run of inserts sent as one multi-row INSERT, UPDATE/DELETE
    statements buffered into one round trip, and single statements, each failure resolved by the
    conflict policies. One per Sink (`Sink.direct`), on the sink's target cursor."""

    def __init__(self, host: DirectHost, cur: Any, policies: Any, resolver: ConflictResolver) -> None:
        self.host = host
        self.cur = cur
        self.policies = policies
        self.resolver = resolver
        self.inserts = InsertRun()  # a run of inserts into one table with the same columns
        self.each = StatementBuffer()  # buffered UPDATE/DELETE statements

    def can_buffer(self, table: TargetTable, kind: str) -> bool:
        """May this UPDATE/DELETE wait in the buffer? Only where nothing but its own row count
        matters in between: no hook, apply_error stops, and a row not found is skipped or stops
        (an `overwrite` insert would have to come before the statements after it)."""
        if self.each.sql is None or self.policies.hook is not None:
            return False
        policy = self.policies.for_table(table.name)
        return policy.apply_error == "error" and policy.for_kind(kind) in ("skip", "error")

    def buffer(self, table: TargetTable, kind: str, sql: str, params: list[Any], key: tuple,
                       entry: list[Any], row: Any) -> None:
        """Queue one UPDATE/DELETE of the change-by-change path; sent with the others in one
        round trip (`_flush_each`) before anything else touches the target."""
        if self.each.add((table, kind, key, entry, sql, params, row)):
            self.flush_each()

    def _each_text(self, table: TargetTable, sql: str, params: list[Any]) -> str:
        """One buffered statement as state.APPLY_EACH runs it: `EXECUTE` of its shape prepared on
        this connection (planned once, not per change: half the server's time on the FULL-identity
        bench), or its text with `RETURNING 1` where the shape could not be prepared."""
        name = table.prepared.get(sql)
        if name is None:
            name = table.prepared[sql] = self._prepare(sql)
        if not name:
            return self.cur.mogrify(sql + " RETURNING 1", params).decode()
        if not params:
            return f"EXECUTE {name}"
        return self.cur.mogrify(f"EXECUTE {name}({', '.join(['%s'] * len(params))})",
                                params).decode()

    def _prepare(self, sql: str) -> str:
        """PREPARE a statement shape (its %s placeholders as $n) in a savepoint; its name, or ""
        when the target refused it or this connection holds PREPARED_MAX already."""
        if self.each.prepared >= PREPARED_MAX:
            return ""
        n = 0

        def number(_: re.Match[str]) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        self.each.prepared += 1
        name = f"pgferry_each{self.each.prepared}"
        body = _PLACEHOLDER.sub(number, sql)
        try:
            self.cur.execute(f"SAVEPOINT pgferry_prep; PREPARE {name} AS {body} RETURNING 1; "
                             "RELEASE SAVEPOINT pgferry_prep")
        except RETRYABLE:
            raise
        except psycopg2.Error:  # e.g. a parameter type it cannot infer: sent as text instead
            self.cur.execute("ROLLBACK TO SAVEPOINT pgferry_prep")
            return ""
        return name

    def flush_each(self) -> None:
        """Run the buffered statements in order, in one round trip per EACH_STATEMENTS; rows they
        did not find go to the conflict policies. A statement the target rejects is run on its own
        after the ones before it, so the error names its change exactly."""
        if not self.each.statements:
            return
        self.host._join()
        meta = self.each.take()
        texts = [self._each_text(table, sql, params) for table, _, _, _, sql, params, _ in meta]
        done = 0
        while done < len(texts):
            chunk = texts[done:done + EACH_STATEMENTS]
            counts = self._run_each(chunk)
            if len(counts) < len(chunk):  # chunk[len(counts)] failed; the ones before were undone
                ok = len(counts)
                if ok:
                    counts = self._run_each(chunk[:ok])
                    assert len(counts) == ok, "statements that ran before failed on their re-run"
                self._missing_each(meta[done:done + ok], counts)
                table, _, _, entry, sql, params, row = meta[done + ok]
                self.host._current = table.display
                touched = self.execute_change(table, sql, params, row, entry[2], entry[3])  # raises
                if touched == 0:
                    self._missing_each([meta[done + ok]], [0])
                done += ok + 1
                continue
            self._missing_each(meta[done:done + len(chunk)], counts)
            done += len(chunk)

    def _run_each(self, texts: list[str]) -> list[int]:
        try:
            self.cur.execute(self.each.sql, (texts,))
            return self.cur.fetchone()[0] or []
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:  # the call itself failed (the function was dropped?)
            raise self.host._apply_error(exc) from None

    def _missing_each(self, meta: list[tuple], counts: list[int]) -> None:
        for (table, kind, key, entry, *_), n in zip(meta, counts, strict=True):
            if n == 0:
                self.resolver.precise = True
                self.resolver.missing(table, kind, [(key, entry)])

    def flush(self) -> None:
        """Send whatever the change-by-change path holds (a buffer at a time is ever non-empty)."""
        self.flush_each()
        self.flush_inserts()

    def flush_inserts(self) -> None:
        """Send the buffered run of inserts (same table and columns) as one multi-row INSERT.
        Change by change (exact mode), a failure is retried row by row to find and resolve the
        conflicting rows."""
        run = self.inserts
        if not run.rows:
            return
        self.host._join()
        rows, meta = run.take()
        self.host._current = run.table
        try:
            if self.host._exact:
                self.cur.execute("SAVEPOINT pgferry_ins")
            psycopg2.extras.execute_values(self.cur, run.head, rows, template=run.template, page_size=INSERT_ROWS)
            if self.host._exact:
                self.cur.execute("RELEASE SAVEPOINT pgferry_ins")
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            if not self.host._exact:
                raise self.host._apply_error(exc, run.lsn, run.xid) from None
            self.cur.execute("ROLLBACK TO SAVEPOINT pgferry_ins")
            for params, (table, row, lsn, xid) in zip(rows, meta, strict=True):
                self._insert_one(table, params, row, lsn, xid)

    def _insert_one(self, table: TargetTable, params: list[Any], row: tuple, lsn: Lsn | None,
                    xid: int | None) -> None:
        head, template, _ = table.insert(row)
        self.cur.execute("SAVEPOINT pgferry_row")
        try:
            psycopg2.extras.execute_values(self.cur, head, [params], template=template)
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            self.cur.execute("ROLLBACK TO SAVEPOINT pgferry_row")
            self.resolver.precise = True
            keyed = bool(table.key) and not table.full_identity
            if keyed and isinstance(exc, psycopg2.errors.UniqueViolation):
                key = tuple(row[i] for i in table.key)
                found = existing_rows(self.cur, table, [key])
                if found:
                    self.resolver.insert_exists(table, [(key, [INS, row, lsn, xid], found[0])])
                    return
            if not self.resolver.apply_error(table, row, lsn, xid, first_line_of(exc)):
                raise self.host._apply_error(exc, lsn, xid) from None
            return
        self.cur.execute("RELEASE SAVEPOINT pgferry_row")

    def execute_change(self, table: TargetTable, sql: str, params: list[Any], row: Any, lsn: Lsn | None = None,
                        xid: int | None = None) -> int | None:
        """One UPDATE or DELETE (change-by-change path): the rows it touched, or None when the
        target rejected it and the apply_error policy skipped it. `lsn`, `xid`: of its
        transaction when it is not the open one (a buffered statement)."""
        self.host._join()
        if lsn is None:
            lsn, xid = self.host._commit_lsn, self.host._xid
        guard = self.host._exact and (self.policies.hook is not None or
                                 self.policies.for_table(table.name).apply_error != "error")
        try:
            if guard:
                self.cur.execute("SAVEPOINT pgferry_row")
            self.cur.execute(sql, params)
            touched = self.cur.rowcount
            if guard:
                self.cur.execute("RELEASE SAVEPOINT pgferry_row")
            return touched
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            if guard:
                self.cur.execute("ROLLBACK TO SAVEPOINT pgferry_row")
                self.resolver.precise = True
                if self.resolver.apply_error(table, row, lsn, xid, first_line_of(exc)):
                    return None
            raise self.host._apply_error(exc, lsn, xid) from None

    def execute(self, sql: str, params: list[Any]) -> None:
        self.host._join()
        try:
            self.cur.execute(sql, params)
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            raise self.host._apply_error(exc) from None
