"""Foreign keys, user triggers and rules held back from the target until cutover.

Native apply runs with `session_replication_role = replica`: the target's user triggers and rules
do not fire and foreign keys are neither checked nor acted on (no ON DELETE CASCADE). A target
role that may not set it (a managed service's database owner) would fire them for every applied
change: an audit trigger writes rows the stream brings too, a `BEFORE UPDATE` trigger overwrites
the source's values, a cascade deletes children the stream deletes again; and a table where
something fires can only be applied change by change, in source order.

So on such a target pgferry holds them back, and nothing fires:

* When it copies the schema, post-data's foreign keys, triggers and rules are recorded in
  `<state>.held_back` instead of created, in the transaction that creates the rest of post-data.
* With `--no-schema --hold-back-constraints`, those on the published tables (and foreign keys
  pointing at them) are read from the catalog, recorded and dropped, in ONE transaction: a crash
  leaves them either in place or recorded, never lost.

`pgferry cutover` creates them again once the tables verified, before the application moves:
triggers, rules and foreign keys `NOT VALID` (no scan, a brief lock) in one transaction. It then
validates each foreign key, which scans but takes only SHARE UPDATE EXCLUSIVE: the application's
writes go on. A foreign key the data breaks stays NOT VALID and is reported with the rows that
break it; the handoff stands. `pgferry cleanup` restores them the same way (a migration given up).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg2
import psycopg2.errors

from sink.state import ensure_schema, quote_ident, readable_name

from ..errors import PgferryError, UsageError, first_line
from ..source import connect, describe_dsn, published_tables

log = logging.getLogger("pgferry.holdback")

FOREIGN_KEY, TRIGGER, RULE = "foreign key", "trigger", "rule"
# pg_dump's post-data object types that fire during apply, and what pgferry calls them
POST_DATA_TYPES = {"FK CONSTRAINT": FOREIGN_KEY, "TRIGGER": TRIGGER, "RULE": RULE}

_IDENT = r'(?:"(?:[^"]|"")+"|[^\s."(]+)'
_TABLE = rf"(?P<table>{_IDENT}(?:\.{_IDENT})?)"
_PARSE = {  # the table and the object's name in pg_dump's statement
    FOREIGN_KEY: re.compile(rf"ALTER TABLE (?:ONLY )?{_TABLE}\s+ADD CONSTRAINT (?P<name>{_IDENT}) FOREIGN KEY", re.S),
    TRIGGER: re.compile(rf"CREATE (?:CONSTRAINT )?TRIGGER (?P<name>{_IDENT}) .*? ON {_TABLE} ", re.S),
    RULE: re.compile(rf"CREATE RULE (?P<name>{_IDENT}) AS\s+ON \w+ TO (?:ONLY )?{_TABLE}\s", re.S),
}


class HeldBack(msgspec.Struct, kw_only=True):
    """One held-back object as `status` and the cutover receipt show it."""

    kind: str  # foreign key, trigger, rule
    table: str  # as SQL: schema-qualified, quoted where needed
    name: str  # the object's name, unquoted
    state: str  # held, created (a foreign key: NOT VALID), validated, invalid
    detail: str | None = None


@dataclass
class Held:
    kind: str
    table: str
    name: str
    definition: str  # the statement that creates it (without the trailing semicolon)
    was_valid: bool = True  # a foreign key valid where it came from (else it stays NOT VALID)


def unquote(ident: str) -> str:
    """A name as pg_dump prints it (quoted when it must be) -> the name."""
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def from_post_data(pg_dump_type: str, statement: str, header_name: str) -> Held:
    """One of pg_dump's post-data entries (type in POST_DATA_TYPES) as a Held."""
    kind = POST_DATA_TYPES[pg_dump_type]
    definition = statement.strip().rstrip(";").rstrip()
    m = _PARSE[kind].match(definition)
    table, name = (m.group("table"), unquote(m.group("name"))) if m else ("", header_name)
    valid = not (kind == FOREIGN_KEY and definition.endswith("NOT VALID"))
    return Held(kind, table, name, definition, valid)


def replica_role_allowed(conn: Any) -> bool:
    """May this session set session_replication_role = replica? (Leaves no transaction open.)"""
    try:
        with conn.cursor() as cur:
            cur.execute("SET LOCAL session_replication_role = replica")
        return True
    except psycopg2.errors.InsufficientPrivilege:
        return False
    finally:
        conn.rollback()


def record(cur: Any, schema: str, slot: str, items: list[Held]) -> None:
    """Record `items` as held (the caller commits, with whatever holds them back)."""
    if not items:
        return
    cur.execute(f"INSERT INTO {quote_ident(schema)}.held_back (slot_name, kind, table_name, name, definition, "
                "was_valid) SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bool[]) "
                "ON CONFLICT (slot_name, kind, table_name, name) DO UPDATE SET definition = EXCLUDED.definition, "
                "was_valid = EXCLUDED.was_valid, state = 'held', detail = NULL, held_at = now(), restored_at = NULL",
                (slot, [i.kind for i in items], [i.table for i in items], [i.name for i in items],
                 [i.definition for i in items], [i.was_valid for i in items]))


# What fires on the tables (names as SQL) and how to create it again: relations.FIRING's objects.
_CATALOG = """
WITH r AS (SELECT to_regclass(t) AS relid FROM unnest(%s::text[]) AS u(t)),
     t AS (SELECT relid FROM r WHERE relid IS NOT NULL UNION SELECT p.relid FROM r, pg_partition_tree(r.relid) AS p)
SELECT 'foreign key', co.conrelid::regclass::text, co.conname::text,
       format('ALTER TABLE %%s ADD CONSTRAINT %%I %%s', co.conrelid::regclass, co.conname,
              pg_get_constraintdef(co.oid)), co.convalidated
FROM pg_constraint co
WHERE co.contype = 'f' AND co.conparentid = 0 AND (co.conrelid IN (SELECT relid FROM t)
                                                   OR co.confrelid IN (SELECT relid FROM t))
UNION ALL
SELECT 'trigger', tg.tgrelid::regclass::text, tg.tgname::text,
       pg_get_triggerdef(tg.oid) || CASE WHEN tg.tgenabled = 'A' THEN
           format('; ALTER TABLE %%s ENABLE ALWAYS TRIGGER %%I', tg.tgrelid::regclass, tg.tgname) ELSE '' END, true
FROM pg_trigger tg
WHERE tg.tgrelid IN (SELECT relid FROM t) AND NOT tg.tgisinternal AND tg.tgenabled IN ('O', 'A') AND tg.tgparentid = 0
UNION ALL
SELECT 'rule', rw.ev_class::regclass::text, rw.rulename::text,
       rtrim(pg_get_ruledef(rw.oid), ';') || CASE WHEN rw.ev_enabled = 'A' THEN
           format('; ALTER TABLE %%s ENABLE ALWAYS RULE %%I', rw.ev_class::regclass, rw.rulename) ELSE '' END, true
FROM pg_rewrite rw
WHERE rw.ev_class IN (SELECT relid FROM t) AND rw.rulename <> '_RETURN' AND rw.ev_enabled IN ('O', 'A')
ORDER BY 1, 2, 3
"""

_DROP = {FOREIGN_KEY: "ALTER TABLE {table} DROP CONSTRAINT {name}", TRIGGER: "DROP TRIGGER {name} ON {table}",
         RULE: "DROP RULE {name} ON {table}"}


def migrated_tables(src: Any, publication: str, only: list[str] | None) -> list[str]:
    """The tables the migration covers, as names for to_regclass: the publication's if it exists, else
    `only` (--tables), else every user table of the source (what FOR ALL TABLES will publish)."""
    with src.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
        exists = cur.fetchone() is not None
        if not exists:
            cur.execute("""SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
                ORDER BY 1, 2""")
            every = cur.fetchall()
    src.rollback()
    if exists:
        tables = published_tables(src, publication)
    elif only:
        tables = [t for t in every if f"{t[0]}.{t[1]}" in only or t[1] in only]
    else:
        tables = every
    return [readable_name(n, t) for n, t in tables]


def hold_migrated(source: str, target: str, schema: str, slot: str, publication: str,
                  only: list[str] | None) -> list[Held]:
    """hold_existing on the tables the migration covers."""
    src = connect(source, "source")
    try:
        tables = migrated_tables(src, publication, only)
    finally:
        src.close()
    return hold_existing(target, schema, slot, tables)


def hold_existing(target: str, schema: str, slot: str, tables: list[str]) -> list[Held]:
    """`--hold-back-constraints` on tables made by hand: record, then drop, what fires on `tables`
    (names as SQL), in one transaction. Returns what was held back now."""
    conn = connect(target, "target")
    try:
        cur = conn.cursor()
        ensure_schema(cur, schema)
        try:
            items = hold_in(cur, schema, slot, tables)
        except psycopg2.Error as exc:
            conn.rollback()
            i = getattr(exc, "held", None)
            what = f"{i.kind} {i.name} on {i.table}" if i is not None else "the foreign keys and triggers"
            raise UsageError(f"cannot hold back {what} on target {describe_dsn(target)}: "
                             f"{first_line(exc)}. pgferry's target role must own the table; or let it set "
                             "session_replication_role (GRANT SET ON PARAMETER session_replication_role TO "
                             "...), or pass --keep-constraints. Nothing was held back") from None
        if not items:
            conn.rollback()
            return []
        conn.commit()
    finally:
        conn.close()
    log.info("held back until cutover: %s", ", ".join(f"{i.kind} {i.name} on {i.table}" for i in items))
    return items


def hold_in(cur: Any, schema: str, slot: str, tables: list[str]) -> list[Held]:
    """Record, then drop, what fires on `tables` (names as SQL), in the caller's transaction; a
    failure to drop one is raised with the item as `exc.held`. (Also after a schema change the
    stream applied: sink/ddl.py.)"""
    cur.execute("SELECT current_setting('search_path')")
    (path,) = cur.fetchone()
    cur.execute("SELECT set_config('search_path', '', true)")  # every name in the definitions qualified
    cur.execute(_CATALOG, (tables,))
    items = [Held(*row) for row in cur.fetchall()]
    cur.execute("SELECT set_config('search_path', %s, true)", (path,))
    record(cur, schema, slot, items)
    for i in items:
        try:
            cur.execute("SAVEPOINT pgferry_hold")
            cur.execute(_DROP[i.kind].format(table=i.table, name=quote_ident(i.name)))
            cur.execute("RELEASE SAVEPOINT pgferry_hold")
        except psycopg2.Error as exc:
            exc.held = i
            raise
    return items


def listing(cur: Any, schema: str, slot: str) -> list[HeldBack]:
    """Every object held back for `slot`, with its state."""
    cur.execute(f"SELECT kind, table_name, name, state, detail FROM {quote_ident(schema)}.held_back "
                "WHERE slot_name = %s ORDER BY kind DESC, table_name, name", (slot,))
    return [HeldBack(kind=k, table=t, name=n, state=s, detail=d) for k, t, n, s, d in cur.fetchall()]


class Restored(msgspec.Struct, kw_only=True):
    """What `restore` did: every object with its state now, and how long each step took."""

    objects: list[HeldBack]
    created_s: float = 0.0
    validated_s: float = 0.0

    @property
    def invalid(self) -> list[HeldBack]:
        return [o for o in self.objects if o.state == "invalid"]


def create(target: str, schema: str, slot: str) -> float:
    """Create what is held: triggers, rules and foreign keys NOT VALID, in one transaction.
    Returns the seconds it took (it is part of the cutover's write downtime)."""
    started = time.monotonic()
    s = quote_ident(schema)
    conn = connect(target, "target")
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT kind, table_name, name, definition, was_valid FROM {s}.held_back "
                    "WHERE slot_name = %s AND state = 'held' ORDER BY kind DESC, table_name, name FOR UPDATE",
                    (slot,))
        todo = [Held(*r) for r in cur.fetchall()]
        for i in todo:
            state = "created"
            try:
                cur.execute("SAVEPOINT pgferry_create")
                if i.kind == FOREIGN_KEY and i.was_valid:
                    try:
                        cur.execute(i.definition + " NOT VALID")
                    except psycopg2.errors.WrongObjectType:
                        # PostgreSQL < 18 has no NOT VALID foreign key on a partitioned table: created
                        # valid, with its scan (and its lock) now.
                        cur.execute("ROLLBACK TO SAVEPOINT pgferry_create")
                        cur.execute(i.definition)
                        state = "validated"
                else:
                    cur.execute(i.definition)
                cur.execute("RELEASE SAVEPOINT pgferry_create")
            except psycopg2.Error as exc:
                conn.rollback()
                raise PgferryError(f"re-creating {i.kind} {i.name} on {i.table} on target {describe_dsn(target)} "
                                   f"failed: {first_line(exc)}. Nothing held back was created; fix it and run the "
                                   "same command again") from None
            cur.execute(f"UPDATE {s}.held_back SET state = %s, restored_at = now() WHERE slot_name = %s AND kind = %s "
                        "AND table_name = %s AND name = %s", (state, slot, i.kind, i.table, i.name))
        conn.commit()
    finally:
        conn.close()
    if todo:
        log.info("created %d held-back object(s) on the target in %.2f s (foreign keys NOT VALID)", len(todo),
                 time.monotonic() - started)
    return time.monotonic() - started


def validate(target: str, schema: str, slot: str) -> float:
    """Validate every foreign key created NOT VALID (the application's writes go on meanwhile).
    One that the data breaks is marked invalid with the rows that break it. Returns the seconds."""
    started = time.monotonic()
    s = quote_ident(schema)
    conn = connect(target, "target")
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(set_config(name, '0', false)) FROM pg_settings WHERE name IN "
                    "('statement_timeout', 'lock_timeout')")  # a big table's scan is not cut short
        cur.execute("SELECT set_config('search_path', '', false)")  # names in messages schema-qualified
        cur.execute(f"SELECT table_name, name FROM {s}.held_back WHERE slot_name = %s AND kind = %s "
                    "AND state = 'created' AND was_valid ORDER BY table_name, name", (slot, FOREIGN_KEY))
        for table, name in cur.fetchall():
            try:
                cur.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {quote_ident(name)}")
                state, detail = "validated", None
            except psycopg2.errors.ForeignKeyViolation as exc:
                state, detail = "invalid", _breaking_rows(cur, table, name) or first_line(exc)
                log.error("foreign key %s on %s is NOT VALID: %s", name, table, detail)
            cur.execute(f"UPDATE {s}.held_back SET state = %s, detail = %s WHERE slot_name = %s AND kind = %s "
                        "AND table_name = %s AND name = %s", (state, detail, slot, FOREIGN_KEY, table, name))
    finally:
        conn.close()
    return time.monotonic() - started


def _breaking_rows(cur: Any, table: str, name: str, shown: int = 5) -> str | None:
    """'N row(s) of T break it, e.g. (a)=(1), ...' for foreign key `name` on `table`."""
    cur.execute("""SELECT co.confrelid::regclass::text,
            array(SELECT quote_ident(a.attname) FROM unnest(co.conkey) WITH ORDINALITY k(n, o)
                  JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.n ORDER BY k.o),
            array(SELECT quote_ident(a.attname) FROM unnest(co.confkey) WITH ORDINALITY k(n, o)
                  JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.n ORDER BY k.o)
        FROM pg_constraint co WHERE co.conrelid = to_regclass(%s) AND co.conname = %s""", (table, name))
    row = cur.fetchone()
    if row is None:
        return None
    parent, cols, pcols = row
    # MATCH SIMPLE: a row with a NULL in the key is not checked
    where = " AND ".join([f"c.{c} IS NOT NULL" for c in cols] + [
        "NOT EXISTS (SELECT 1 FROM " + parent + " p WHERE " +
        " AND ".join(f"p.{p} = c.{c}" for c, p in zip(cols, pcols, strict=True)) + ")"])
    keys = ", ".join(f"c.{c}" for c in cols)
    cur.execute(f"SELECT count(*) FROM {table} c WHERE {where}")
    (count,) = cur.fetchone()
    if not count:
        return None
    cur.execute(f"SELECT DISTINCT ({keys})::text FROM {table} c WHERE {where} ORDER BY 1 LIMIT {shown}")
    names = ", ".join(cols)
    examples = ", ".join(f"({names})={k if len(cols) > 1 else '(' + k + ')'}" for (k,) in cur.fetchall())
    return f"{count} row(s) of {table} reference no row of {parent}, e.g. {examples}"


def restore(target: str, schema: str, slot: str) -> Restored:
    """create, then validate: everything held back is in place again (`cleanup`)."""
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{quote_ident(schema)}.held_back",))
            (exists,) = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    if not exists:  # state from before pgferry held anything back
        return Restored(objects=[])
    created = create(target, schema, slot)
    validated = validate(target, schema, slot)
    conn = connect(target, "target")
    try:
        objects = listing(conn.cursor(), schema, slot)
    finally:
        conn.close()
    return Restored(objects=objects, created_s=round(created, 3), validated_s=round(validated, 3))


_NAMED = re.compile(rf"\bREFERENCES\s+(?P<ref>{_IDENT}(?:\.{_IDENT})?)\s*\(", re.I)


class StreamHold:
    """What a schema change applied by the stream means for what is held back (sink/ddl.py,
    SchemaChanges.hold), in the stream's target transaction: a foreign key or trigger it creates
    on a migrated table is held back too, and a held-back definition follows its tables' renames
    (it names them as they were when it was held)."""

    def __init__(self, schema: str, slot: str) -> None:
        self.schema, self.slot = schema, slot
        self._oids: dict[str, int] = {}

    def before(self, cur: Any) -> None:
        """The tables the held-back definitions name, as the target knows them now (by oid)."""
        cur.execute(f"SELECT table_name, definition FROM {quote_ident(self.schema)}.held_back "
                    "WHERE slot_name = %s AND state <> 'validated'", (self.slot,))
        names = set()
        for table, definition in cur.fetchall():
            names.add(table)
            names.update(m.group("ref") for m in _NAMED.finditer(definition))
        self._oids = {}
        if names:
            cur.execute("SELECT n, to_regclass(n)::oid FROM unnest(%s::text[]) AS u(n)", (sorted(names),))
            self._oids = {n: oid for n, oid in cur.fetchall() if oid is not None}

    def after(self, cur: Any, tables: list[str]) -> list[Held]:
        """Follow renames, then hold back what now fires on `tables`."""
        if self._oids:
            cur.execute("SELECT current_setting('search_path')")
            (path,) = cur.fetchone()
            cur.execute("SELECT set_config('search_path', '', true)")
            cur.execute("SELECT n, o::regclass::text FROM unnest(%s::text[], %s::oid[]) AS u(n, o) "
                        "WHERE o::regclass::text <> n", (list(self._oids), list(self._oids.values())))
            renamed = dict(cur.fetchall())
            cur.execute("SELECT n FROM unnest(%s::text[], %s::oid[]) AS u(n, o) WHERE NOT EXISTS "
                        "(SELECT 1 FROM pg_class WHERE oid = o)", (list(self._oids), list(self._oids.values())))
            gone = [r[0] for r in cur.fetchall()]
            cur.execute("SELECT set_config('search_path', %s, true)", (path,))
            s = quote_ident(self.schema)
            if gone:  # dropped by the change: what was held back on it goes with it
                cur.execute(f"DELETE FROM {s}.held_back WHERE slot_name = %s AND table_name = ANY(%s)",
                            (self.slot, gone))
            for old, new in renamed.items():
                cur.execute(f"UPDATE {s}.held_back SET table_name = CASE WHEN table_name = %s THEN %s ELSE table_name "
                            "END, definition = regexp_replace(regexp_replace(definition, %s, %s), %s, %s, 'g') "
                            "WHERE slot_name = %s",
                            (old, new, "^(ALTER TABLE (ONLY )?)" + re.escape(old) + " ", "\\1" + new + " ",
                             "REFERENCES " + re.escape(old) + "\\(", "REFERENCES " + new + "(", self.slot))
                cur.execute(f"UPDATE {s}.held_back SET definition = regexp_replace(definition, %s, %s) "
                            "WHERE slot_name = %s AND kind <> 'foreign key'",
                            (" ON " + re.escape(old) + " ", " ON " + new + " ", self.slot))
        return hold_in(cur, self.schema, self.slot, tables) if tables else []
