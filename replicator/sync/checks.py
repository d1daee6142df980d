"""Checks run before anything is created: what logical replication cannot carry, and what the
target lacks. Every finding names its fix."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from sink.state import readable_name_sql

from ..errors import CheckError
from ..source import describe_dsn, published_tables

if TYPE_CHECKING:
    from .plan import SyncConfig

log = logging.getLogger("pgferry.sync")


class Finding(msgspec.Struct, kw_only=True):
    """One preflight finding: what is wrong (or worth knowing) and the exact fix."""

    severity: Literal["error", "warning", "info"]
    side: Literal["source", "target"]
    check: str
    message: str
    fix: str = ""


def replicability_findings(src: Any, tables: list[str] | None) -> list[Finding]:
    """What logical replication cannot carry: unlogged tables and large objects (warnings with the
    fix), and tables without a replica identity. Publishing such a table makes every UPDATE and
    DELETE on it FAIL on the source, so that is an error when the source has updated or deleted rows
    in it, and a warning otherwise (insert-only tables are fine). `tables`: None for all."""
    with src.cursor() as cur:
        cur.execute(f"""SELECT {readable_name_sql("n.nspname", "c.relname")}, c.relpersistence = 'u',
                c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (
                    SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)),
                coalesce(s.n_tup_upd + s.n_tup_del, 0) > 0
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
            WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
              AND (%s::text[] IS NULL OR n.nspname || '.' || c.relname = ANY(%s::text[])
                   OR c.relname = ANY(%s::text[]))
            ORDER BY n.nspname, c.relname""", (tables, tables, tables))
        rows = cur.fetchall()
        cur.execute("SELECT count(*) FROM pg_largeobject_metadata")
        (large_objects,) = cur.fetchone()
    src.rollback()
    out = []
    unlogged = [r[0] for r in rows if r[1]]
    if unlogged:
        out.append(Finding(severity="warning", side="source", check="unlogged tables",
                           message=f"unlogged tables are not replicated: {', '.join(unlogged)}",
                           fix="copy them by hand at cutover, or make them logged first: ALTER TABLE <table> SET "
                               "LOGGED"))
    if large_objects:
        out.append(Finding(severity="warning", side="source", check="large objects",
                           message=f"the source has {large_objects} large objects; logical replication does not "
                                   "carry them",
                           fix="copy them at cutover: pg_dump --large-objects --data-only ... | psql ..."))
    no_identity = [(r[0], r[3]) for r in rows if r[2] and not r[1]]
    quiet = [name for name, changed in no_identity if not changed]
    if quiet:
        out.append(Finding(severity="warning", side="source", check="replica identity",
                           message=f"tables without a primary key or replica identity: {', '.join(quiet)}. They "
                                   "seem insert-only; an UPDATE or DELETE on them would fail on the source once "
                                   "published",
                           fix="ALTER TABLE <table> REPLICA IDENTITY FULL (or add a primary key)"))
    written = [name for name, changed in no_identity if changed]
    if written:
        out.append(Finding(severity="error", side="source", check="replica identity",
                           message="tables without a primary key or replica identity that receive UPDATE or "
                                   f"DELETE: {', '.join(written)}. Once published, those statements would fail "
                                   "on the source",
                           fix="add a primary key, or run ALTER TABLE <table> REPLICA IDENTITY FULL (or USING "
                               "INDEX <unique index>), then start again"))
    return out


def check_replicability(src: Any, cfg: SyncConfig) -> None:
    """Raise on what `replicability_findings` calls an error (preflight reported the rest)."""
    errors = [f for f in replicability_findings(src, cfg.tables) if f.severity == "error"]
    if errors:
        raise CheckError("; ".join(f"{f.message} (fix: {f.fix})" for f in errors))


_COLUMNS = """SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"""


def check_target_schema(src: Any, target: Any, cfg: SyncConfig) -> None:
    """--no-schema: the target's tables were made by hand. Every published table and column must be
    there; all differences are reported at once, before anything is created or copied."""
    tables = published_tables(src, cfg.publication)
    with src.cursor() as cur:
        cur.execute(_COLUMNS, ([t[0] for t in tables], [t[1] for t in tables]))
        source = cur.fetchall()
    src.rollback()
    cur = target.cursor()
    cur.execute(_COLUMNS, ([t[0] for t in tables], [t[1] for t in tables]))
    on_target = {(n, t, a): typ for n, t, a, typ in cur.fetchall()}
    target.rollback()
    present = {(n, t) for n, t, _ in on_target}
    problems = [f"table {n}.{t} is missing" for n, t in tables if (n, t) not in present]
    for n, t, a, typ in source:
        if (n, t) not in present:
            continue
        other = on_target.get((n, t, a))
        if other is None:
            problems.append(f"{n}.{t}: column {a} ({typ}) is missing")
        elif other != typ:
            problems.append(f"{n}.{t}: column {a} is {other} on the target but {typ} on the source")
    if problems:
        raise CheckError(f"--no-schema: the target {describe_dsn(cfg.target)} does not match the source's published "
                        f"tables ({len(problems)} problem(s)): " + "; ".join(problems) +
                        ". Fix the target's tables (or drop --no-schema to let pgferry create them)")


def check_extensions(src: Any, target: Any, cfg: SyncConfig) -> None:
    """Extensions the source uses that the target cannot install: reported before anything starts."""
    if not cfg.schema_copy:
        return
    with src.cursor() as cur:
        cur.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'")
        used = {r[0] for r in cur.fetchall()}
    src.rollback()
    cur = target.cursor()
    cur.execute("SELECT name FROM pg_available_extensions")
    available = {r[0] for r in cur.fetchall()}
    target.rollback()
    missing = sorted(used - available)
    if missing:
        raise CheckError(f"the source uses extension(s) {', '.join(missing)} that the target "
                        f"{describe_dsn(cfg.target)} cannot install: install them on the target server first")
