"""The net effect of a batch's row changes, applied set-based.

Within one target transaction, the changes to one row (same table, same replica-identity key)
fold into one net operation: insert, update (the columns any of the updates set, newest value
wins), delete, or delete-then-insert. The batch is then written per table with one statement per
page of rows: `DELETE ... USING unnest(arrays)`, `UPDATE ... FROM unnest(arrays)` per set of changed
columns (one array literal per column, not a staging table: the planner knows how many rows a
constant array holds and picks the key index), and a `COPY` per set of inserted columns, in that
order. The arrays are text[] (an array-typed column's values are elements holding array text);
each value is cast to its column's type where it is used.

Folding and reordering keep the one-by-one result for every row; they can only differ where a
constraint sees rows side by side (a unique index over other columns, a foreign key) or a trigger
sees them. The caller therefore folds only tables where nothing fires (`session_replication_role =
replica`, or no foreign key, user trigger or rule: TargetTable.fires), and when a set-based
statement fails, re-applies the same source transactions in exact order.

A change that does not fold (a key-changing update, a FULL-identity table, an insert of a key the
batch already inserted, ...) is refused by `add`; the caller writes out what is pending and then
applies that change on its own, so source order is kept.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import psycopg2.errors

from decoder import UNCHANGED, Delete, Insert, Update

from .relations import TargetTable

INS, UPD, DEL, DEL_INS, APPEND = range(5)  # APPEND: an insert into a table without a key
# What sink/_cfold.c relies on (it folds into the same dicts as NetBatch.add): these op codes, an
# entry [op, row, lsn, xid], the TargetTable attributes it reads, and the special values of
# TargetTable.key0 (>= 0: the one key column). tests/sink/test_cfold.py checks the C side's
# _cfold.CONTRACT against this.
FOLD_CONTRACT = {
    "ops": {"INS": INS, "UPD": UPD, "DEL": DEL, "DEL_INS": DEL_INS, "APPEND": APPEND},
    "entry_len": 4,
    "table_attrs": ("key0", "key", "snapshot_lsn", "counts"),
    "key0": {"several_columns": -1, "whole_row": -2, "fires": -3},
}
PAGE = 5000  # rows per UPDATE / DELETE statement
COPY_CHUNK = 1 << 20  # bytes per read when psycopg2 sends a COPY


class NetBatch:
    """Pending net changes, per table in first-touched order."""

    def __init__(self) -> None:
        self.tables: dict[int, tuple[TargetTable, dict[tuple, list[Any]]]] = {}
        self._appended: list[None] = []  # a counter: keys for APPEND rows
        self.current = ""  # the table being written (named when a statement fails)

    def __bool__(self) -> bool:
        """Any row pending (a table is entered before its first row is known to fold)."""
        return any(rows for _, rows in self.tables.values())

    def add(self, table: TargetTable, msg: Insert | Update | Delete, lsn: Any = None, xid: int | None = None) -> bool:
        """Fold one change in; False when it cannot be folded (apply it on its own, in order).
        `lsn`, `xid`: its transaction's (kept per row, for conflicts: the newest change's)."""
        # The stream's hot path: one call per row change, so written for speed (locals, no calls).
        k0 = table.key0
        if k0 == -3:
            return False  # something fires on it: applied on its own, in order
        t = type(msg)
        if k0 == -2 and t is not Insert:  # no key, or FULL identity: found by comparing whole rows,
            return False  # applied on its own, after what is pending (nothing added: the batch may be empty)
        entry = self.tables.get(table.oid)
        if entry is None or (entry[0] is not table and not entry[1]):
            entry = self.tables[table.oid] = (table, {})
        elif entry[0] is not table:
            return False  # redescribed since its rows were added: the caller writes those out first
        rows = entry[1]
        if k0 == -2:
            rows[(len(self._appended),)] = [APPEND, msg.new, lsn, xid]  # type: ignore[union-attr]
            self._appended.append(None)
            return True
        if t is Delete:
            row = msg.old  # type: ignore[union-attr]
        elif t is Update and msg.old is not None:  # type: ignore[union-attr]
            return False  # the key changed
        else:
            row = msg.new  # type: ignore[union-attr]
        if row is None:
            return False
        if k0 >= 0:  # a one-column key
            v = row[k0]
            if v is None or v is UNCHANGED:
                return False
            key: tuple = (v,)
        else:
            key = tuple([row[i] for i in table.key])
            if UNCHANGED in key or None in key:
                return False
        cur = rows.get(key)
        if t is Insert:
            if cur is None:
                rows[key] = [INS, row, lsn, xid]  # row: a tuple until an update merges into it
            elif cur[0] == DEL:
                rows[key] = [DEL_INS, row, lsn, xid]
            else:
                return False
        elif t is Update:
            if cur is None:
                rows[key] = [UPD, row, lsn, xid]
            elif cur[0] == DEL:
                return False
            else:
                merged = cur[1]
                if type(merged) is tuple:
                    merged = cur[1] = list(merged)
                for i, v in enumerate(row):
                    if v is not UNCHANGED:
                        merged[i] = v
                cur[2] = lsn
                cur[3] = xid
        else:
            if cur is None:
                rows[key] = [DEL, row, lsn, xid]
            elif cur[0] == INS:
                del rows[key]
            elif cur[0] == DEL:
                return False
            else:
                rows[key] = [DEL, row, lsn, xid]
        return True

    def write(self, cur: Any, resolver: Resolver) -> None:
        """Send everything pending (and forget it). Rows an update or delete did not find, and
        inserts whose key exists, go to `resolver` (conflicts)."""
        tables, self.tables = self.tables, {}
        self._appended = []
        for table, rows in tables.values():
            self.current = table.display
            deletes: list[tuple] = []
            upd_items: list[tuple] = []
            ins_items: list[tuple] = []
            for item in rows.items():  # one pass, each list in first-touched order
                op = item[1][0]
                if op == INS or op == APPEND:
                    ins_items.append(item)
                elif op == UPD:
                    upd_items.append(item)
                else:
                    deletes.append(item)
                    if op == DEL_INS:
                        ins_items.append(item)
            if deletes:
                missing = _run(cur, table.delete_using(), [k for k, _ in deletes], deletes)
                if missing:
                    resolver.missing(table, "delete_missing", missing)
            updates: dict[tuple[int, ...], tuple[list[Any], list[tuple]]] = {}
            every = table.update_cols  # the usual case: every column sent (no unchanged TOAST)
            every_get = table.getter(every)
            for item in upd_items:
                key, (_, row, _, _) = item
                if UNCHANGED not in row:
                    sets = every
                    values = key + every_get(row)
                else:
                    sets = tuple(i for i in every if row[i] is not UNCHANGED)
                    values = key + table.getter(sets)(row)
                group = updates.get(sets)
                if group is None:
                    group = updates[sets] = ([], [])
                group[0].append(values)
                group[1].append(item)
            for sets, (params, items) in updates.items():
                if not sets:  # only key or generated columns: set the first key column to itself
                    sets = (table.key[0],)
                    params = [(*k, k[0]) for k, _ in items]
                missing = _run(cur, table.update_from(sets), params, items)
                if missing:
                    resolver.missing(table, "update_missing", missing)
            inserts: dict[str, tuple[list[Any], list[Any]]] = {}
            if table.all_writable:  # the usual case: every column as sent (inserts carry them all)
                if ins_items:
                    inserts[table.copy_in(ins_items[0][1][1])[0]] = ([e[1] for _, e in ins_items], ins_items)
            else:
                for item in ins_items:
                    sql, row_values = table.copy_in(item[1][1])
                    group = inserts.get(sql)
                    if group is None:
                        group = inserts[sql] = ([], [])
                    group[0].append(row_values)
                    group[1].append(item)
            keyed = bool(table.key) and not table.full_identity
            for sql, (params, items) in inserts.items():
                if not keyed:
                    cur.copy_expert(sql, io.StringIO(copy_text(params)), size=COPY_CHUNK)
                    continue
                cur.execute("SAVEPOINT pgferry_copy")
                try:
                    cur.copy_expert(sql, io.StringIO(copy_text(params)), size=COPY_CHUNK)
                except psycopg2.errors.UniqueViolation:
                    # Some keys exist on the target: insert the others, hand those to the resolver.
                    cur.execute("ROLLBACK TO SAVEPOINT pgferry_copy")
                    found = existing_rows(cur, table, [k for k, _ in items])
                    fresh = [p for n, p in enumerate(params) if n not in found]
                    if fresh:
                        cur.copy_expert(sql, io.StringIO(copy_text(fresh)), size=COPY_CHUNK)
                    resolver.insert_exists(table, [(*items[n], target) for n, target in sorted(found.items())])
                cur.execute("RELEASE SAVEPOINT pgferry_copy")


def existing_rows(cur: Any, table: TargetTable, keys: list[tuple]) -> dict[int, Any]:
    """Position (0-based, in `keys`) -> the target's row as JSON, for the keys that exist."""
    out: dict[int, Any] = {}
    for i in range(0, len(keys), PAGE):
        page = keys[i:i + PAGE]
        cur.execute(table.existing(), [array_text(col) for col in zip(*page, strict=True)])
        for n, row in cur.fetchall():
            out[i + n - 1] = row
    return out


class Resolver(Protocol):
    """Decides what happens to conflicting rows (sink/apply.py). `items`: (key, [op, row, lsn,
    xid]) pairs, for insert_exists with the target's row (JSON) appended."""

    def missing(self, table: TargetTable, kind: str, items: list[tuple]) -> None: ...

    def insert_exists(self, table: TargetTable, items: list[tuple]) -> None: ...


_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


NULL = "\\N"  # COPY text's NULL


def copy_text(rows: list[Any]) -> str:
    """Rows of text values (or None) in COPY's text format."""
    j = "\t".join
    if rows:
        # Fast path, all in C but for rows with a NULL: join everything, then check by counting
        # that no value held a tab, newline, backslash (each NULL put one in) or CR.
        try:
            text = "\n".join(map(j, rows))
            nulls = 0
        except TypeError:  # a None: substitute \N in the rows that have one (a nullable column is common)
            text = "\n".join([j(r) if None not in r else j([NULL if v is None else v for v in r]) for r in rows])
            nulls = sum([r.count(None) for r in rows])
        width = len(rows[0])
        if (all(len(r) == width for r in rows) and text.count("\t") == len(rows) * (width - 1)
                and text.count("\n") == len(rows) - 1 and text.count("\\") == nulls and "\r" not in text):
            return text + "\n"
    out = []
    for r in rows:
        if None not in r:
            line = j(r)
            # one check per row: no value holds a tab (the count), backslash, newline or CR
            if line.count("\t") == len(r) - 1 and "\\" not in line and "\n" not in line and "\r" not in line:
                out.append(line)
                continue
        out.append(j([NULL if v is None else v.translate(_ESCAPE) for v in r]))
    out.append("")
    return "\n".join(out)


def _run(cur: Any, sql: str, rows: list[Any], items: list[tuple]) -> list[tuple]:
    """Execute `sql` (RETURNING the positions it touched) over the rows, a page at a time, one
    array literal per column; the `items` whose rows it did not touch."""
    missing: list[tuple] = []
    for i in range(0, len(rows), PAGE):
        page = rows[i:i + PAGE]
        cur.execute(sql, [array_text(col) for col in zip(*page, strict=True)])
        if cur.rowcount < len(page):
            touched = {r[0] for r in cur.fetchall()}
            missing += [items[i + n] for n in range(len(page)) if n + 1 not in touched]
    return missing


def array_text(values: tuple[Any, ...]) -> str:
    """Text values (or None) as a one-dimensional array literal."""
    return "{" + ",".join(["NULL" if v is None else '"' + (v.replace("\\", "\\\\").replace('"', '\\"')
                                                            if ("\\" in v or '"' in v) else v) + '"'
                           for v in values]) + "}"
