"""The net effect of a batch's row changes, applied set-based.

Within one target transaction, the changes to one row (same table, same replica-identity key)
fold into one net operation: insert, update (the columns any of the updates set, newest value
wins), delete, or delete-then-insert. The batch is then written per table with one statement per
page of rows: `DELETE ... USING (VALUES ...)`, `UPDATE ... FROM (VALUES ...)` per set of changed
columns, and multi-row `INSERT`s, in that order.

Folding and reordering keep the one-by-one result for every row; they can only differ where a
constraint sees rows side by side (a unique index over other columns, a foreign key). The caller
therefore uses this only with `session_replication_role = replica` (no foreign-key triggers), and
when a set-based statement fails, re-applies the same source transactions in exact order.

A change that does not fold (a key-changing update, a FULL-identity table, an insert of a key the
batch already inserted, ...) is refused by `add`; the caller writes out what is pending and then
applies that change on its own, so source order is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2.extras

from decoder import UNCHANGED, Delete, Insert, Update

from .relations import TargetTable

INS, UPD, DEL, DEL_INS = range(4)
PAGE = 1000  # rows per statement


class NetBatch:
    """Pending net changes, per table in first-touched order."""

    def __init__(self) -> None:
        self.tables: dict[int, tuple[TargetTable, dict[tuple, list[Any]]]] = {}
        self.current = ""  # the table being written (named when a statement fails)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def add(self, table: TargetTable, msg: Insert | Update | Delete) -> bool:
        """Fold one change in; False when it cannot be folded (apply it on its own, in order)."""
        if table.full_identity or not table.key:
            return False
        t = type(msg)
        if t is Delete:
            row = msg.old  # type: ignore[union-attr]
        elif t is Update and msg.old is not None:  # type: ignore[union-attr]
            return False  # the key changed
        else:
            row = msg.new  # type: ignore[union-attr]
        if row is None:
            return False
        key = tuple(row[i] for i in table.key)
        if UNCHANGED in key or None in key:
            return False
        entry = self.tables.get(table.rel.oid)
        if entry is None or entry[0] is not table:
            if entry is not None:
                return False  # the relation was redescribed mid-batch: keep it simple
            entry = self.tables[table.rel.oid] = (table, {})
        rows = entry[1]
        cur = rows.get(key)
        if t is Insert:
            if cur is None:
                rows[key] = [INS, list(row)]
            elif cur[0] == DEL:
                rows[key] = [DEL_INS, list(row)]
            else:
                return False
        elif t is Update:
            if cur is None:
                rows[key] = [UPD, list(row)]
            elif cur[0] == DEL:
                return False
            else:
                merged = cur[1]
                for i, v in enumerate(row):
                    if v is not UNCHANGED:
                        merged[i] = v
        else:
            if cur is None:
                rows[key] = [DEL, None]
            elif cur[0] == INS:
                del rows[key]
            elif cur[0] == DEL:
                return False
            else:
                rows[key] = [DEL, None]
        return True

    def write(self, cur: Any) -> Iterator[tuple[TargetTable, str, int]]:
        """Send everything pending (and forget it). Yields (table, 'update'|'delete', rows that were
        not found on the target) where some were missing."""
        tables, self.tables = self.tables, {}
        for table, rows in tables.values():
            self.current = table.display
            deletes = [k for k, (op, _) in rows.items() if op in (DEL, DEL_INS)]
            if deletes:
                found = _run(cur, table.delete_using(), table.key_template(), deletes)
                if found < len(deletes):
                    yield table, "delete", len(deletes) - found
            updates: dict[tuple[int, ...], list[list[Any]]] = {}
            for key, (op, row) in rows.items():
                if op == UPD:
                    sets = tuple(i for i, v in enumerate(row) if v is not UNCHANGED and table.settable[i]
                                 and i not in table.key)
                    if sets:
                        updates.setdefault(sets, []).append([*key, *(row[i] for i in sets)])
            for sets, params in updates.items():
                sql, template = table.update_from(sets)
                found = _run(cur, sql, template, params)
                if found < len(params):
                    yield table, "update", len(params) - found
            inserts: dict[str, tuple[str, list[list[Any]]]] = {}
            for op, row in rows.values():
                if op == INS or op == DEL_INS:
                    head, template, params = table.insert(row)
                    inserts.setdefault(head, (template, []))[1].append(params)
            for head, (template, params) in inserts.items():
                _run(cur, head, template, params)


def _run(cur: Any, sql: str, template: str, params: list[Any]) -> int:
    """Execute `sql` (one `VALUES %s`) over the rows a page at a time; total rows affected."""
    n = 0
    for i in range(0, len(params), PAGE):
        page = params[i:i + PAGE]
        psycopg2.extras.execute_values(cur, sql, page, template=template, page_size=len(page))
        n += cur.rowcount
    return n
