"""Following schema changes without capture: what the stream itself shows.

Where no event trigger captures the source's DDL (replicator/ddl/capture.py: it takes a
superuser), pgoutput still describes each table again (a Relation message) before the first change
after its columns changed. From that, pgferry follows:
- a column the target lacks: `ALTER TABLE ... ADD COLUMN` with the type the message names (a
  built-in type by its oid, a user type by the name its Type message gave);
- a table the target lacks: `CREATE TABLE` with the message's columns and, for the default
  replica identity, its key as the primary key;
- a column the source dropped (it is gone from the message): kept, made nullable (`dropped_columns
  = keep`, the default) or dropped (`drop`).
It stops, naming what it saw, where the stream cannot tell what happened: a column gone and another
new in the same description (a rename, or a drop and an add: the values of a renamed column would
be lost) and a column whose type changed (a rewrite: `ALTER COLUMN TYPE ... USING`). Indexes,
constraints, defaults, views, functions and types are not followed: nothing in the stream shows
them.
"""

from __future__ import annotations

import logging
from typing import Any

from decoder import Relation

from .errors import DdlStop
from .state import quote_ident, readable_name

log = logging.getLogger("pgferry.sink")

FIRST_USER_OID = 16384  # below: built-in objects, the same oid on every server


class Follower:
    """Applies what a Relation message shows changed, in the sink's open target transaction."""

    def __init__(self, cur: Any, dropped_columns: str = "keep") -> None:
        self.cur = cur
        self.dropped_columns = dropped_columns  # keep | drop
        self.types: dict[int, tuple[str, str]] = {}  # user type oid -> (schema, name), from Type messages

    def type_name(self, oid: int, typmod: int) -> str:
        """The SQL type of a source column, as the target spells it."""
        if oid < FIRST_USER_OID:
            self.cur.execute("SELECT format_type(%s, %s)", (oid, typmod if typmod >= 0 else None))
            return str(self.cur.fetchone()[0])
        named = self.types.get(oid)
        if named is None:
            raise DdlStop(f"a column of type oid {oid} appeared on the source, and the stream did not name the type")
        return f"{quote_ident(named[0])}.{quote_ident(named[1])}"

    def known(self, schema: str, slot: str, rel: Relation) -> list[list[Any]] | None:
        """The table's columns as the source last described them ([name, type oid, modifier]),
        recorded by `remember` in the state (None: never seen)."""
        self.cur.execute(f"SELECT columns FROM {quote_ident(schema)}.source_columns WHERE slot_name = %s "
                         "AND schema_name = %s AND table_name = %s", (slot, rel.namespace, rel.name))
        row = self.cur.fetchone()
        return row[0] if row else None

    def remember(self, schema: str, slot: str, rel: Relation) -> None:
        """Record the columns `rel` describes (in the open transaction: with the changes that follow)."""
        import json

        cols = json.dumps([[c.name, c.type_oid, c.type_modifier] for c in rel.columns])
        self.cur.execute(f"INSERT INTO {quote_ident(schema)}.source_columns (slot_name, schema_name, table_name, "
                         "columns) VALUES (%s, %s, %s, %s::jsonb) ON CONFLICT (slot_name, schema_name, table_name) "
                         "DO UPDATE SET columns = EXCLUDED.columns", (slot, rel.namespace, rel.name, cols))

    def changed(self, before: list[list[Any]] | None, after: Relation) -> None:
        """Follow what changed since the table's last description (`known`)."""
        if before is None:
            return
        table = readable_name(after.namespace, after.name)
        old = {c[0]: (c[1], c[2]) for c in before}
        new = {c.name: (c.type_oid, c.type_modifier) for c in after.columns}
        gone = [n for n in old if n not in new]
        added = [n for n in new if n not in old]
        if gone and added:
            raise DdlStop(f"on the source, column(s) {', '.join(gone)} of {table} disappeared and {', '.join(added)} "
                          "appeared in the same change: a rename cannot be told from a drop and an add without "
                          "schema-change capture (the renamed column's values would be lost). Make the same change on "
                          "the target by hand, then start pgferry again; or let pgferry capture schema changes "
                          "(a superuser's source role)")
        retyped = [n for n in new if n in old and old[n] != new[n]]
        if retyped:
            raise DdlStop(f"on the source, the type of column(s) {', '.join(retyped)} of {table} changed: a rewrite "
                          "cannot be followed without schema-change capture. Change the column on the target by hand "
                          "(ALTER TABLE ... ALTER COLUMN ... TYPE), then start pgferry again")
        qualified = f"{quote_ident(after.namespace)}.{quote_ident(after.name)}"
        for n in gone:
            if self.dropped_columns == "drop":
                self.cur.execute(f"ALTER TABLE {qualified} DROP COLUMN IF EXISTS {quote_ident(n)}")
                log.warning("column %s of %s was dropped on the source: dropped on the target too", n, table)
            else:
                self.cur.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                                 "AND attname = %s AND NOT attisdropped", (qualified, n))
                row = self.cur.fetchone()
                if row and row[0]:
                    self.cur.execute(f"ALTER TABLE {qualified} ALTER COLUMN {quote_ident(n)} DROP NOT NULL")
                log.warning("column %s of %s was dropped on the source: kept on the target (nullable; "
                            "dropped_columns = drop removes it)", n, table)

    def add_missing(self, rel: Relation, missing: list[str], exists: bool) -> None:
        """Create what the target lacks for `rel`: the table, or its columns."""
        table = readable_name(rel.namespace, rel.name)
        qualified = f"{quote_ident(rel.namespace)}.{quote_ident(rel.name)}"
        cols = {c.name: c for c in rel.columns}
        if not exists:
            defs = [f"{quote_ident(c.name)} {self.type_name(c.type_oid, c.type_modifier)}" for c in rel.columns]
            key = [quote_ident(c.name) for c in rel.columns if c.is_key]
            if key and rel.replica_identity == "d":
                defs.append(f"PRIMARY KEY ({', '.join(key)})")
            self.cur.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(rel.namespace)}")
            self.cur.execute(f"CREATE TABLE {qualified} ({', '.join(defs)})")
            if rel.replica_identity == "f":
                self.cur.execute(f"ALTER TABLE {qualified} REPLICA IDENTITY FULL")
            log.warning("table %s is new on the source: created on the target from the stream's description "
                        "(columns and primary key only)", table)
            return
        for n in missing:
            c = cols[n]
            self.cur.execute(f"ALTER TABLE {qualified} ADD COLUMN {quote_ident(n)} "
                             f"{self.type_name(c.type_oid, c.type_modifier)}")
            log.warning("column %s of %s is new on the source: added on the target (%s)", n, table,
                        self.type_name(c.type_oid, c.type_modifier))
