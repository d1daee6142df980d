"""`pgferry verify`: compare source and target, table by table, computed inside each database.

`--mode count` compares row counts. `--mode checksum` (default) compares content: each row's md5
(of its columns' text as UTF-8), summed as two 64-bit halves over the table. The sum does not
depend on the order rows are read in, so two servers whose collations (or glibc versions, or
encodings) order a text key differently still digest equal tables the same, in one scan each and
bounded memory; duplicates count. A table that differs and has a primary key is then digested in
key ranges of CHUNK rows, to name the ranges that differ.

Both sessions use the same output settings (UTC, ISO dates, postgres intervals), so a value
prints the same on PostgreSQL 15 and 18.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec
import psycopg2

from sink.state import pgferry_session, quote_ident, readable_name

from ..errors import first_line
from ..source import connect, published_tables

log = logging.getLogger("pgferry.verify")

CHUNK = 100_000
ROWS_NAMED = 10  # rows named per differing key range


class Side:
    """One database's view for a comparison. Plain: each query in a transaction of its own (rolled
    back: nothing held). Pinned (`verify --online`): every query in the one REPEATABLE READ
    transaction whose snapshot was taken at the comparison's LSN; a failed query rolls back to a
    savepoint so the snapshot survives it."""

    def __init__(self, conn: Any, pinned: bool = False) -> None:
        self.conn, self.pinned = conn, pinned

    def all(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        cur = self.conn.cursor()
        if not self.pinned:
            try:
                cur.execute(sql, params)
                return cur.fetchall()
            finally:
                self.conn.rollback()
        cur.execute("SAVEPOINT pgferry_verify")
        try:
            cur.execute(sql, params)
            rows = cur.fetchall()
        except psycopg2.Error:
            cur.execute("ROLLBACK TO SAVEPOINT pgferry_verify")
            raise
        cur.execute("RELEASE SAVEPOINT pgferry_verify")
        return rows

    def one(self, sql: str, params: tuple | list = ()) -> Any:
        rows = self.all(sql, params)
        return rows[0] if rows else None
_SETTINGS = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
             "SET extra_float_digits = 1; SET bytea_output = 'hex'")


@dataclass
class TableResult:
    name: str
    source_rows: int = 0
    target_rows: int = 0
    match: bool = True
    differences: list[str] = field(default_factory=list)
    # the key ranges that differ, (above, up to) as text tuples (None: unbounded): what `pgferry repair` copies again
    ranges: list[tuple[tuple | None, tuple | None]] = field(default_factory=list)
    keyed: bool = True  # False: no primary key, compared whole (a difference can only be resynced whole)


def _columns(src: Side, qualified: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(columns to compare, primary-key columns with their types) from the source."""
    cols = [r[0] for r in src.all("""SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass
        AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum""", (qualified,))]
    key = src.all("""SELECT a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)""",
                  (qualified,))
    return cols, [(str(n), str(t)) for n, t in key]


def both(src: Side, dst: Side, sql: str, params: tuple | list = ()) -> tuple[Any, Any]:
    """The one row of `sql` on each side, both at once: a digest is CPU-bound on each server, so
    the two scans overlap instead of adding up."""
    with ThreadPoolExecutor(1) as pool:
        theirs = pool.submit(dst.one, sql, params)
        try:
            ours = src.one(sql, params)
        finally:
            theirs_result = theirs.exception()  # (waits) the target's error, if any, comes second
        if theirs_result is not None:
            raise theirs_result
        return ours, theirs.result()


def row_hash(cols: list[str]) -> str:
    """A row's md5, of its columns' text hashed as UTF-8 bytes: a row's text is in its database's
    encoding (LATIN1 'é' is one byte)."""
    return f"md5(convert_to(ROW({', '.join(quote_ident(c) for c in cols)})::text, 'UTF8'))"


def verify_table(src: Side, dst: Side, schema: str, table: str, mode: str) -> TableResult:
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    res = TableResult(readable_name(schema, table))
    try:
        (res.target_rows,) = dst.one(f"SELECT count(*) FROM {qualified}")
    except psycopg2.Error as exc:
        (res.source_rows,) = src.one(f"SELECT count(*) FROM {qualified}")
        res.match = False
        res.differences.append(f"cannot read the target table: {first_line(exc)}")
        return res
    (res.source_rows,) = src.one(f"SELECT count(*) FROM {qualified}")
    if res.source_rows != res.target_rows:
        res.match = False
        res.differences.append(f"row count {res.source_rows} on the source, {res.target_rows} on the target")
    if mode == "count":
        return res
    cols, key = _columns(src, qualified)
    row = row_hash(cols)

    def digest(where: str = "", params: tuple = ()) -> tuple:
        sql = (f"SELECT count(*), coalesce(sum(('x' || left(h, 16))::bit(64)::bigint), 0), "
               f"coalesce(sum(('x' || right(h, 16))::bit(64)::bigint), 0) FROM (SELECT {row} AS h "
               f"FROM {qualified}{where}) s")
        return both(src, dst, sql, params)

    a, b = digest()
    if a == b:
        return res
    res.match = False
    if not key:
        res.keyed = False
        res.differences.append("content differs (table without primary key: hashed whole)")
        return res
    k = ", ".join(quote_ident(c) for c, _ in key)
    # chunk upper bounds from the source: every CHUNK-th key, as text, cast back by type
    bounds = src.all(f"SELECT {', '.join(f'{quote_ident(c)}::text' for c, _ in key)} FROM (SELECT {k}, "
                     f"row_number() OVER (ORDER BY {k}) AS rn FROM {qualified}) s WHERE rn %% %s = 0 ORDER BY rn",
                     (CHUNK,))
    lower: tuple | None = None
    for upper in [*bounds, None]:
        where, params = key_range(key, lower, upper)
        a, b = digest(where, tuple(params))
        if a != b:
            res.ranges.append((lower, upper))
            start = f"> {lower}" if lower else "from the start"
            span = f"({k}) {start} {f'to {upper}' if upper else 'to the end'}"
            res.differences.append(f"rows in key range {span} differ ({a[0]} source rows, {b[0]} target rows)")
            shown = ", ".join(c if c.isidentifier() and c == c.lower() else quote_ident(c) for c, _ in key)
            res.differences.extend(_rows_that_differ(src, dst, qualified, k, shown, row, where, tuple(params)))
        lower = upper
    return res


def key_range(key: list[tuple[str, str]], lower: tuple | None, upper: tuple | None) -> tuple[str, list]:
    """(` WHERE ...`, its parameters) for the rows whose key is above `lower` and at most `upper`
    (None: unbounded), the bounds as text cast back to the key's types."""
    k = ", ".join(quote_ident(c) for c, _ in key)
    typed = "(" + ", ".join(f"%s::{t}" for _, t in key) + ")"
    conds, params = [], []
    if lower is not None:
        conds.append(f"({k}) > {typed}")
        params += list(lower)
    if upper is not None:
        conds.append(f"({k}) <= {typed}")
        params += list(upper)
    return (" WHERE " + " AND ".join(conds) if conds else ""), params


def keys_among(key: list[tuple[str, str]]) -> str:
    """`(key) IN (...)`: the rows whose key is one of those given, as one text array parameter per
    key column (cast back to the key's types)."""
    k = ", ".join(quote_ident(c) for c, _ in key)
    typed = ", ".join(f"u.c{i}::{t}" for i, (_, t) in enumerate(key))
    aliases = ", ".join(f"c{i}" for i in range(len(key)))
    return f"({k}) IN (SELECT {typed} FROM unnest({', '.join('%s::text[]' for _ in key)}) AS u({aliases}))"


def _rows_that_differ(src: Side, dst: Side, qualified: str, k: str, shown: str, row: str, where: str,
                      params: tuple) -> list[str]:
    """Name the rows of one differing key range (at most CHUNK rows: a key and a hash each)."""
    sql = f"SELECT ROW({k})::text, {row} FROM {qualified}{where}"
    a, b = dict(src.all(sql, params)), dict(dst.all(sql, params))
    named = [f"row ({shown})={key}: " + ("missing on the target" if key not in b else "only on the target"
                                     if key not in a else "differs")
             for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return named[:ROWS_NAMED] + ([f"... and {len(named) - ROWS_NAMED} more rows"] if len(named) > ROWS_NAMED else [])


def verify(source: str, target: str, publication: str, tables: list[str] | None, mode: str) -> list[TableResult]:
    src, dst = connect(source, "source"), connect(target, "target")
    try:
        for c in (src, dst):
            cur = c.cursor()
            pgferry_session(cur)  # no timeouts for big tables' checksums; row security would hide rows
            cur.execute(_SETTINGS)
            c.commit()
        return [verify_table(Side(src), Side(dst), n, t, mode) for n, t in published_tables(src, publication, tables)]
    finally:
        src.close()
        dst.close()


def print_results(results: list[TableResult], as_json: bool, out: IO[str] = sys.stdout) -> int:
    """Print the comparison; the exit code is 1 when any table differs."""
    if as_json:
        out.write(msgspec.json.encode({"ok": all(r.match for r in results), "tables": [
            {"name": r.name, "source_rows": r.source_rows, "target_rows": r.target_rows, "match": r.match,
             "differences": r.differences} for r in results]}).decode() + "\n")
    else:
        for r in results:
            out.write(f"{r.name:<40} {r.source_rows:>10} {r.target_rows:>10}  {'ok' if r.match else 'DIFFERENT'}\n")
            for d in r.differences:
                out.write(f"    {d}\n")
        bad = sum(not r.match for r in results)
        out.write(f"{len(results)} tables compared, {bad} different\n")
    return 0 if all(r.match for r in results) else 1
