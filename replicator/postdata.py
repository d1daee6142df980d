"""Post-data after the copy (indexes, constraints, triggers...): `jobs` tables at a time, resumable.

pg_dump's plain post-data output is split at its object headers (`-- Name: a a_pkey; Type:
CONSTRAINT; Schema: public; Owner: -`). A table's indexes and its constraints other than foreign
keys form that table's group: creating them locks only that table, so groups run side by side
(biggest table first), each in ONE target transaction that also records it in
`<state>.post_data`. Everything else runs last, in pg_dump's order, in one transaction that also
marks post-data done: foreign keys (they need the other table's unique index), partition index
attachments (they need both indexes), triggers, rules, statistics and any type not named here.

Small tables' groups (under SMALL_TABLE_BYTES) share transactions, up to SMALL_STATEMENTS_PER_TXN
statements each: one transaction per tiny table cost more than its index builds (1,000 tables of
100 rows, one primary key each: the whole sync 4.11 -> 3.61 s). The bound keeps the locks one
transaction holds (about two per index or constraint) far below a small server's lock table
(`max_locks_per_transaction` x `max_connections`, shared by the `jobs` transactions at once).

A crash therefore leaves each group created and recorded, or untouched; the next start runs the
groups not recorded. Before, post-data was one transaction on one connection: index builds of
different tables ran one after the other, and a crash near its end started it all over.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from sink import failpoints
from sink.state import quote_ident

from .errors import PgferryError, first_line
from .pgtools import drop_unknown_settings
from .source import ThreadConnections, completed_or_cancel, connect, describe_dsn

log = logging.getLogger("pgferry.sync")

HEADER = re.compile(r"^-- Name: .*; Type: (?P<type>[A-Z ]+); Schema: .*; Owner: .*$")
_IDENT = r'(?:"(?:[^"]|"")+"|[^\s."]+)'  # as pg_dump prints a name: quoted when it must be
_TABLE = rf"(?P<table>{_IDENT}(?:\.{_IDENT})?)"
_ALTER_TABLE = re.compile(rf"ALTER TABLE (?:ONLY )?{_TABLE}\s+ADD CONSTRAINT ")
# the object types created by one statement on one table, and how to find that table
ON_ONE_TABLE = {
    "CONSTRAINT": _ALTER_TABLE,  # primary key, unique, exclusion (FK CONSTRAINT is another type)
    "CHECK CONSTRAINT": _ALTER_TABLE,  # NOT VALID checks
    "INDEX": re.compile(rf"CREATE (?:UNIQUE )?INDEX {_IDENT} ON (?:ONLY )?{_TABLE} USING "),
}
REST = "(foreign keys, triggers and the rest)"  # the last group's name in <state>.post_data
SMALL_TABLE_BYTES = 8 << 20  # tables below this: their groups are created together...
SMALL_STATEMENTS_PER_TXN = 50  # ...up to this many statements per target transaction


class PostDataError(PgferryError):
    """Creating post-data objects on the target failed (exit 1)."""


@dataclass
class PostData:
    preamble: str  # pg_dump's SETs: every session runs them first
    groups: dict[str, list[str]] = field(default_factory=dict)  # table as pg_dump prints it -> statements
    rest: list[str] = field(default_factory=list)


def _statement(lines: list[str]) -> str:
    """An object's SQL: its lines after the header, without the comment lines around it."""
    while lines and (lines[0].startswith("--") or not lines[0].strip()):
        lines = lines[1:]
    while lines and (lines[-1].startswith("--") or not lines[-1].strip()):
        lines = lines[:-1]
    return "\n".join(lines)


def split_post_data(sql: str) -> PostData:
    """pg_dump's post-data section -> the preamble, per-table groups and the rest, in dump order."""
    lines = sql.splitlines()
    heads = [(i, m.group("type")) for i, line in enumerate(lines) if (m := HEADER.match(line))]
    out = PostData(preamble="\n".join(lines[:heads[0][0]] if heads else lines))
    for n, (i, kind) in enumerate(heads):
        stmt = _statement(lines[i + 1:heads[n + 1][0] if n + 1 < len(heads) else len(lines)])
        if not stmt:
            continue
        pattern = ON_ONE_TABLE.get(kind)
        m = pattern.match(stmt) if pattern is not None else None
        if m is not None:
            out.groups.setdefault(m.group("table"), []).append(stmt)
        else:
            out.rest.append(stmt)
    return out


def pack_small_groups(tables: list[str], size: dict[str, int], groups: dict[str, list[str]]) -> list[list[str]]:
    """`tables` (biggest first) as units of work: a big table alone, small ones packed together up
    to SMALL_STATEMENTS_PER_TXN statements (a small table with more is a unit of its own)."""
    units: list[list[str]] = []
    packed: list[str] = []
    count = 0
    for t in tables:
        n = len(groups[t])
        if size.get(t, 0) >= SMALL_TABLE_BYTES or n >= SMALL_STATEMENTS_PER_TXN:
            units.append([t])
            continue
        if count + n > SMALL_STATEMENTS_PER_TXN:
            units.append(packed)
            packed, count = [], 0
        packed.append(t)
        count += n
    if packed:
        units.append(packed)
    return units


def run_post_data(target: str, state_schema: str, slot: str, sql: str, jobs: int) -> None:
    """Create what `sql` (pg_dump's post-data) holds on the target, skipping the groups recorded
    as done, and mark post-data done in `<state>.sync` with the last group."""
    pd = split_post_data(sql)
    s = quote_ident(state_schema)
    # Index builds sort whole tables: memory instead of temp files, shared by the builds at once.
    memory = f"SET maintenance_work_mem = '{max(64, 1024 // max(jobs, 1))}MB'"
    conns = ThreadConnections()
    preamble = ""  # pg_dump's SETs that the target knows (set once the first connection has asked)

    def session(conn: Any = None) -> Any:
        """This thread's target connection (`conn`, or a new one), set up as pg_dump's output expects."""
        if conns.mine.__dict__.get("conn") is None:
            conn = conns.mine.conn = conn or conns.keep(connect(target, "target"))
            cur = conn.cursor()
            cur.execute(preamble)
            cur.execute(memory)
            conn.commit()
        return conns.mine.conn

    def create(names: list[str], statements: list[str], mark_sync: bool) -> None:
        """The groups `names` (or REST), created and recorded in one transaction."""
        conn = session()
        cur = conn.cursor()
        try:
            if statements:
                cur.execute("\n".join(statements))
        except psycopg2.Error as exc:
            try:
                conn.rollback()
            except psycopg2.Error:  # the connection is gone: the error below says why
                pass
            what = ("the rest of the post-data" if names == [REST] else "the indexes and constraints of "
                    + (names[0] if len(names) == 1 else f"one of {len(names)} tables ({', '.join(names[:3])}...)"))
            raise PostDataError(f"creating {what} on target {describe_dsn(target)} failed: {first_line(exc)}. "
                                "If the target already has them, pass --no-schema") from None
        cur.execute(f"INSERT INTO {s}.post_data (slot_name, item) SELECT %s, unnest(%s::text[])", (slot, names))
        if mark_sync:
            cur.execute(f"UPDATE {s}.sync SET post_data_done = true WHERE slot_name = %s", (slot,))
        conn.commit()

    started = time.monotonic()
    try:
        first = conns.keep(connect(target, "target"))
        cur = first.cursor()
        preamble = drop_unknown_settings(cur, pd.preamble)
        conn = session(first)
        cur.execute(f"SELECT item FROM {s}.post_data WHERE slot_name = %s", (slot,))
        done = {r[0] for r in cur.fetchall()}
        todo = [t for t in pd.groups if t not in done]
        size: dict[str, int] = {}
        if todo:  # biggest first: the longest build starts at once
            cur.execute("SELECT t, coalesce(pg_table_size(to_regclass(t)), 0) FROM unnest(%s::text[]) t", (todo,))
            size = dict(cur.fetchall())
            todo.sort(key=lambda t: -size.get(t, 0))
        conn.commit()
        units = pack_small_groups(todo, size, pd.groups)
        if done:
            log.info("post-data: %d of %d tables' indexes and constraints were created before", len(done - {REST}),
                     len(pd.groups))
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="post-data") as pool:
            futures = [pool.submit(create, unit, [q for t in unit for q in pd.groups[t]], False) for unit in units]
            for _ in completed_or_cancel(futures):
                failpoints.hit("mid_post_data")
        if REST not in done:  # else post_data_done was set with it
            create([REST], pd.rest, True)
    finally:
        conns.close()
    log.info("schema: created the indexes and constraints of %d tables (%d at a time) and %d other objects on the "
             "target in %.1f s", len(todo), max(1, jobs), len(pd.rest), time.monotonic() - started)
