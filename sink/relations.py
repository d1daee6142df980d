"""Source relations -> target tables, and the SQL that applies one change to a target table.

A source table is matched to the target table of the same schema and name, and columns are
matched BY NAME, so a different column order, extra target columns (they get their defaults) and
columns dropped on the source (pgoutput never sends them) all work. A source column missing on
the target is a schema mismatch, reported before any row of that table is written.

Rows are found by the replica identity the source sent: key columns (primary key or `USING
INDEX`) compared with `=`; for `REPLICA IDENTITY FULL` every column compared with `IS NOT DISTINCT
FROM` (or as text for types without an equality operator), touching exactly ONE row even when the
table holds duplicates (native apply does the same).

Values travel in PostgreSQL's text form as untyped literals, so the target parses them into its
own column types: enums, domains, composites, ranges and arrays need no client-side conversion.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from decoder import UNCHANGED, Relation

from .errors import SchemaMismatch
from .state import quote_ident, readable_name

# Types without a default equality operator: FULL identity compares them as text.
_NO_EQUALITY = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})

_TARGET_COLUMNS = """
SELECT a.attname, a.attgenerated <> '' AS generated, a.attidentity = 'a' AS identity_always,
       COALESCE(et.typname, bt.typname, t.typname) AS base_type, c.relkind,
       format_type(a.atttypid, a.atttypmod) AS sql_type
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON bt.oid = t.typbasetype AND t.typtype = 'd'
LEFT JOIN pg_type et ON et.oid = COALESCE(bt.typelem, t.typelem) AND COALESCE(bt.typcategory, t.typcategory) = 'A'
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
ORDER BY a.attnum
"""


# What fires on a target table during apply unless the session runs with session_replication_role
# = replica (as native apply does): enabled user triggers and rules on the table (or its partitions),
# and foreign keys from or to it (their checks and ON DELETE/UPDATE actions are triggers too).
# Triggers and foreign keys cloned onto partitions are named once, by their parent's. One row per
# object: (the table as given, kind, name).
FIRING = """
SELECT r.t, x.kind, x.name FROM unnest(%s::text[]) AS r(t)
CROSS JOIN LATERAL (SELECT to_regclass(r.t) UNION SELECT relid FROM pg_partition_tree(to_regclass(r.t))) AS p(relid)
CROSS JOIN LATERAL (
    SELECT 'trigger', tgname::text FROM pg_trigger
    WHERE tgrelid = p.relid AND NOT tgisinternal AND tgenabled IN ('O', 'A') AND tgparentid = 0
    UNION ALL
    SELECT 'rule', rulename::text FROM pg_rewrite
    WHERE ev_class = p.relid AND rulename <> '_RETURN' AND ev_enabled IN ('O', 'A')
    UNION ALL
    SELECT 'foreign key', CASE WHEN conrelid = p.relid THEN conname::text
                               ELSE conname || ' of ' || conrelid::regclass::text END FROM pg_constraint
    WHERE contype = 'f' AND conparentid = 0 AND (conrelid = p.relid OR confrelid = p.relid)
) AS x(kind, name)
ORDER BY 1, 2, 3
"""


def firing(cur: Any, tables: list[str]) -> list[tuple[str, str, str]]:
    """(table, kind, name) of what fires during apply without the replica role (see FIRING);
    `tables`: names as SQL (`public.t`, `"My S"."T"`); tables that do not exist are left out. A
    foreign key fires on both its tables: on the referenced one its name reads `fk of child`."""
    cur.execute(FIRING, (tables,))
    return [tuple(r) for r in cur.fetchall()]


@dataclass
class TargetTable:
    """One source relation as it maps onto the target. Built from a Relation message."""

    rel: Relation
    qualified: str
    names: list[str]  # quoted target column names, one per source column
    writable: list[bool]  # False for target generated columns
    settable: list[bool]  # also False for GENERATED ALWAYS identity columns (UPDATE cannot set them)
    key: list[int]  # indexes of the replica identity columns
    text_compare: list[bool]
    types: list[str]  # the target column's SQL type, one per source column (casts in VALUES lists)
    snapshot_lsn: int = 0  # changes committed before this LSN are in the table's initial copy
    # What fires on it during apply (without the replica role: see FIRING), as "kind name": its
    # changes are then applied one by one, in source order, like a trigger or foreign key expects.
    fires: list[str] = field(default_factory=list)
    partitioned: bool = True  # the target table is partitioned (False: a plain table)
    _sql: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    # statement text -> its name as prepared on the sink's connection, "" if it could not be
    # (direct.py: _prepare); the sink maps its tables per connection
    prepared: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = readable_name(self.rel.namespace, self.rel.name)  # as `display`, once (metrics labels)
        self.all_writable = all(self.writable)
        # what a set-based UPDATE may set: settable columns outside the key
        self.update_cols = tuple(i for i, ok in enumerate(self.settable) if ok and i not in self.key)
        self._getters: dict[tuple[int, ...], Any] = {}
        self.oid = self.rel.oid
        # NetBatch.add: the one key column's index; -1 for a key of several columns; -2 when rows
        # are found by comparing whole rows (no key, or FULL identity)
        # -3: never folded (something fires on it: one by one, in order)
        if self.fires:
            self.key0 = -3
        elif self.full_identity or not self.key:
            self.key0 = -2
        else:
            self.key0 = self.key[0] if len(self.key) == 1 else -1
        self.counts: dict[type, int] = {}  # source changes received per message type (metrics)

    def getter(self, cols: tuple[int, ...]) -> Any:
        """A function row -> tuple of the values at `cols` (operator.itemgetter, cached)."""
        g = self._getters.get(cols)
        if g is None:
            if len(cols) == 1:
                i = cols[0]
                g = self._getters[cols] = lambda row: (row[i],)
            elif cols:
                g = self._getters[cols] = operator.itemgetter(*cols)
            else:
                g = self._getters[cols] = lambda row: ()
        return g

    @property
    def display(self) -> str:
        """`schema.table` for messages, quoted where it must be (`public."My T"`)."""
        return self.name

    @property
    def full_identity(self) -> bool:
        return self.rel.replica_identity == "f"

    # -- statements --------------------------------------------------------------------------
    def insert(self, new: tuple) -> tuple[str, str, list[Any]]:
        """(statement with one `VALUES %s` for any number of rows, the row template, the values):
        consecutive inserts with the same statement go to the target as one multi-row INSERT."""
        cols = tuple(i for i, v in enumerate(new) if v is not UNCHANGED and self.writable[i])
        parts = self._sql.get(("i", cols))
        if parts is None:
            # OVERRIDING SYSTEM VALUE: the source's value of a GENERATED ALWAYS identity column wins.
            parts = (f"INSERT INTO {self.qualified} ({', '.join(self.names[i] for i in cols)}) "
                     "OVERRIDING SYSTEM VALUE VALUES %s", f"({', '.join(['%s'] * len(cols))})")
            self._sql["i", cols] = parts
        return parts[0], parts[1], [new[i] for i in cols]

    def copy_in(self, new: tuple | list) -> tuple[str, tuple | list]:
        """(COPY statement, the row's values) for a set-based insert. COPY writes GENERATED ALWAYS
        identity columns as given, like INSERT ... OVERRIDING SYSTEM VALUE."""
        if self.all_writable and UNCHANGED not in new:  # the usual case: every column, as sent
            sql = self._sql.get(("C*",))
            if sql is None:
                sql = self._sql["C*",] = f"COPY {self.qualified} ({', '.join(self.names)}) FROM STDIN"
            return sql, new
        cols = tuple(i for i, v in enumerate(new) if v is not UNCHANGED and self.writable[i])
        sql = self._sql.get(("C", cols))
        if sql is None:
            sql = self._sql["C", cols] = (f"COPY {self.qualified} ({', '.join(self.names[i] for i in cols)}) "
                                          "FROM STDIN")
        return sql, [new[i] for i in cols]

    def update(self, old: tuple | None, new: tuple) -> tuple[str, list[Any]]:
        sets = tuple(i for i, v in enumerate(new) if v is not UNCHANGED and self.settable[i])
        where, wparams = self._where(old if old is not None else new)
        sql = self._sql.get(("u", sets, where))
        if sql is None:
            assignments = ", ".join(f"{self.names[i]} = %s" for i in sets)
            sql = f"UPDATE {self.qualified} SET {assignments} WHERE {where}"
            self._sql["u", sets, where] = sql
        return sql, [new[i] for i in sets] + wparams

    def delete(self, old: tuple) -> tuple[str, list[Any]]:
        where, params = self._where(old)
        return f"DELETE FROM {self.qualified} WHERE {where}", params

    # -- set-based statements (sink/netbatch.py): one text array literal per column --------------
    def _from(self, cols: tuple[int, ...]) -> str:
        """Rows given as one text array literal per column, named k0.. (key) then c<i> (columns
        `cols`); each value is cast to its column's type where it is used (see _val)."""
        names = [f"k{n}" for n in range(len(self.key))] + [f"c{i}" for i in cols]
        # n: the row's 1-based position in the arrays, returned to say which rows were touched
        return f"unnest({', '.join(['%s::text[]'] * len(names))}) WITH ORDINALITY AS v({', '.join(names)}, n)"

    def _match(self) -> str:
        return " AND ".join(f"t.{self.names[i]} = v.k{n}::{self.types[i]}" for n, i in enumerate(self.key))

    def delete_using(self) -> str:
        sql = self._sql.get(("D",))
        if sql is None:
            sql = self._sql["D",] = (f"DELETE FROM {self.qualified} AS t USING {self._from(())} WHERE "
                                     f"{self._match()} RETURNING v.n")
        return sql

    def update_from(self, sets: tuple[int, ...], newer: int | None = None) -> str:
        """UPDATE of the columns `sets` from rows (key columns..., set columns...), returning the
        positions of the rows found. `newer`: only where that column's new value is greater."""
        sql = self._sql.get(("U", sets, newer))
        if sql is None:
            assignments = ", ".join(f"{self.names[i]} = v.c{i}::{self.types[i]}" for i in sets)
            cond = ""
            if newer is not None:
                col, typ = self.names[newer], self.types[newer]
                cond = f" AND (t.{col} IS NULL OR t.{col} < v.c{newer}::{typ})"
            sql = self._sql["U", sets, newer] = (f"UPDATE {self.qualified} AS t SET {assignments} FROM "
                                                 f"{self._from(sets)} WHERE {self._match()}{cond} RETURNING v.n")
        return sql

    def existing(self) -> str:
        """The target rows (as JSON) for keys given as arrays, with the keys' positions."""
        sql = self._sql.get(("E",))
        if sql is None:
            sql = self._sql["E",] = (f"SELECT v.n, to_jsonb(t) FROM {self.qualified} AS t JOIN {self._from(())} "
                                     f"ON {self._match()}")
        return sql

    def as_dict(self, row: tuple | list | None) -> dict[str, Any] | None:
        """A row as column -> text value (columns the server did not send are left out)."""
        if row is None:
            return None
        return {c.name: v for c, v in zip(self.rel.columns, row, strict=False) if v is not UNCHANGED}

    def key_dict(self, key: tuple) -> dict[str, Any]:
        return {self.rel.columns[i].name: v for i, v in zip(self.key, key, strict=True)}

    def _where(self, row: tuple) -> tuple[str, list[Any]]:
        """The row's identity as a WHERE clause. Identity columns the server did not send
        (UNCHANGED) are left out; FULL identity narrows to one physical row."""
        if not self.full_identity:
            cols = tuple(i for i in self.key if row[i] is not UNCHANGED)
            where = " AND ".join(f"{self.names[i]} = %s" for i in cols)
            return where, [row[i] for i in cols]
        conds, params = [], []
        for i, v in enumerate(row):
            if v is UNCHANGED:
                continue
            if v is None:
                conds.append(f"{self.names[i]} IS NULL")
            elif self.text_compare[i]:
                conds.append(f"{self.names[i]}::text = %s")
                params.append(v)
            else:
                conds.append(f"{self.names[i]} = %s")
                params.append(v)
        inner = " AND ".join(conds) or "true"
        if self.partitioned:
            # (tableoid, ctid): a ctid alone is not unique across the partitions of a partitioned table.
            return (f"(tableoid, ctid) = (SELECT tableoid, ctid FROM {self.qualified} WHERE {inner} LIMIT 1)",
                    params)
        # A plain table: `ctid = (...)` is a TID scan; the row comparison above was a sequential scan
        # per change. tableoid keeps inheritance children out.
        me = "'" + self.qualified.replace("'", "''") + "'::regclass"
        return (f"ctid = (SELECT ctid FROM {self.qualified} WHERE tableoid = {me} AND {inner} LIMIT 1) "
                f"AND tableoid = {me}", params)


def map_relation(cur: Any, rel: Relation, check_fires: bool = False) -> TargetTable:
    """Look the relation up on the target; raise SchemaMismatch naming what is missing.
    `check_fires`: the session fires triggers and foreign keys (no replica role): look them up."""
    cur.execute(_TARGET_COLUMNS, (rel.namespace, rel.name))
    rows = cur.fetchall()
    display = readable_name(rel.namespace, rel.name)
    if not rows:
        raise SchemaMismatch(f"table {display} does not exist on the target: create it (same schema and name) "
                             "or remove it from the publication")
    target = {name: (generated, base, always, sql_type) for name, generated, always, base, _, sql_type in rows}
    missing = [c.name for c in rel.columns if c.name not in target]
    if missing:
        raise SchemaMismatch(f"table {display} on the target lacks column(s) {', '.join(missing)} that the source "
                             "publishes: add them (ALTER TABLE ... ADD COLUMN) with compatible types")
    qualified = f"{quote_ident(rel.namespace)}.{quote_ident(rel.name)}"
    fires = [f"{kind} {name}" for _, kind, name in firing(cur, [qualified])] if check_fires else []
    return TargetTable(
        rel=rel,
        qualified=qualified,
        fires=fires,
        partitioned=rows[0][4] == "p",
        names=[quote_ident(c.name) for c in rel.columns],
        writable=[not target[c.name][0] for c in rel.columns],
        settable=[not target[c.name][0] and not target[c.name][2] for c in rel.columns],
        key=[i for i, c in enumerate(rel.columns) if c.is_key],
        text_compare=[target[c.name][1] in _NO_EQUALITY for c in rel.columns],
        types=[target[c.name][3] for c in rel.columns],
    )
