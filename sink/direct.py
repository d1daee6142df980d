"""The change-by-change path of the sink: what cannot be folded into a set-based batch (a key
change, a FULL-identity update or delete, a table where a trigger or foreign key fires) and every change
while a failed batch is re-applied in exact source order (`Sink.isolate_until`).

Inserts are buffered into multi-row INSERTs; in exact mode a failing one is retried row by row
under savepoints so the conflicting row is found and resolved (sink/resolve.py). Mixed into Sink.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from decoder import Lsn

from .netbatch import INS, existing_rows
from .relations import TargetTable

INSERT_ROWS = 1000  # rows per multi-row INSERT

# Connection-level failures: the stream loop reconnects and resumes from the stored progress.
RETRYABLE = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.errors.SerializationFailure,
             psycopg2.errors.DeadlockDetected)


def first_line_of(exc: psycopg2.Error) -> str:
    text = (exc.pgerror or str(exc)).strip()
    return text.splitlines()[0] if text else repr(exc)


class ChangeByChange:
    """Needs from Sink: cur, policies, the insert buffer (_ins_*), _exact, _precise, _current,
    _commit_lsn, _xid, _join(), _apply_error(), and Resolving's insert_exists() and apply_error()."""

    cur: Any
    policies: Any
    _ins_rows: list[list[Any]]
    _ins_meta: list[tuple[TargetTable, tuple, Lsn | None, int | None]]
    _ins_head: str | None
    _ins_template: str
    _ins_table: str
    _ins_lsn: Lsn | None
    _ins_xid: int | None
    _exact: bool
    _precise: bool
    _current: str | None
    _commit_lsn: Lsn | None
    _xid: int | None

    # (no method stubs here: in Sink's MRO they would shadow the real ones from Sink and Resolving)

    def _flush_inserts(self) -> None:
        """Send the buffered run of inserts (same table and columns) as one multi-row INSERT.
        Change by change (exact mode), a failure is retried row by row to find and resolve the
        conflicting rows."""
        if not self._ins_rows:
            return
        self._join()
        rows, self._ins_rows = self._ins_rows, []
        meta, self._ins_meta = self._ins_meta, []
        self._current = self._ins_table
        try:
            if self._exact:
                self.cur.execute("SAVEPOINT pgferry_ins")
            psycopg2.extras.execute_values(self.cur, self._ins_head, rows, template=self._ins_template,
                                           page_size=INSERT_ROWS)
            if self._exact:
                self.cur.execute("RELEASE SAVEPOINT pgferry_ins")
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            if not self._exact:
                raise self._apply_error(exc, self._ins_lsn, self._ins_xid) from None
            self.cur.execute("ROLLBACK TO SAVEPOINT pgferry_ins")
            for params, (table, row, lsn, xid) in zip(rows, meta, strict=True):
                self._insert_one(table, params, row, lsn, xid)

    def _insert_one(self, table: TargetTable, params: list[Any], row: tuple, lsn: Lsn, xid: int) -> None:
        head, template, _ = table.insert(row)
        self.cur.execute("SAVEPOINT pgferry_row")
        try:
            psycopg2.extras.execute_values(self.cur, head, [params], template=template)
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            self.cur.execute("ROLLBACK TO SAVEPOINT pgferry_row")
            self._precise = True
            keyed = bool(table.key) and not table.full_identity
            if keyed and isinstance(exc, psycopg2.errors.UniqueViolation):
                key = tuple(row[i] for i in table.key)
                found = existing_rows(self.cur, table, [key])
                if found:
                    self.insert_exists(table, [(key, [INS, row, lsn, xid], found[0])])
                    return
            if not self.apply_error(table, row, lsn, xid, first_line_of(exc)):
                raise self._apply_error(exc, lsn, xid) from None
            return
        self.cur.execute("RELEASE SAVEPOINT pgferry_row")

    def _execute_change(self, table: TargetTable, sql: str, params: list[Any], row: Any) -> int | None:
        """One UPDATE or DELETE (change-by-change path): the rows it touched, or None when the
        target rejected it and the apply_error policy skipped it."""
        self._join()
        guard = self._exact and (self.policies.hook is not None or
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
                self._precise = True
                if self.apply_error(table, row, self._commit_lsn, self._xid, first_line_of(exc)):
                    return None
            raise self._apply_error(exc) from None

    def _execute(self, sql: str, params: list[Any]) -> None:
        self._join()
        try:
            self.cur.execute(sql, params)
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            raise self._apply_error(exc) from None
