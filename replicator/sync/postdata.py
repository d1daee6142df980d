"""Post-data (indexes, constraints, triggers...) as the tables are copied: `jobs` tables at a time, resumable.

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

A big table's group starts as soon as the table is copied, beside the copy of the others
(`PostDataRun.table_copied`): the group only touches its own table, committed by then.

A crash therefore leaves each group created and recorded, or untouched; the next start runs the
groups not recorded. Before, post-data was one transaction on one connection: index builds of
different tables ran one after the other, and a crash near its end started it all over.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from sink import failpoints
from sink.state import quote_ident

from ..errors import PostDataError, first_line
from ..source import ThreadConnections, completed_or_cancel, connect, describe_dsn
from . import holdback
from .holdback import POST_DATA_TYPES, Held, from_post_data, unquote
from .pgtools import drop_unknown_settings

log = logging.getLogger("pgferry.sync")

HEADER = re.compile(r"^-- Name: (?P<name>.*); Type: (?P<type>[A-Z ]+); Schema: .*; Owner: .*$")
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


@dataclass
class PostData:
    preamble: str  # pg_dump's SETs: every session runs them first
    groups: dict[str, list[str]] = field(default_factory=dict)  # table as pg_dump prints it -> statements
    rest: list[str] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)  # recorded with the rest instead of created (holdback.py)


def _statement(lines: list[str]) -> str:
    """An object's SQL: its lines after the header, without the comment lines around it."""
    while lines and (lines[0].startswith("--") or not lines[0].strip()):
        lines = lines[1:]
    while lines and (lines[-1].startswith("--") or not lines[-1].strip()):
        lines = lines[:-1]
    return "\n".join(lines)


def split_post_data(sql: str, hold: bool = False) -> PostData:
    """pg_dump's post-data section -> the preamble, per-table groups and the rest, in dump order.
    `hold`: foreign keys, triggers and rules go to `held` instead of the rest."""
    lines = sql.splitlines()
    heads = [(i, m.group("type"), m.group("name")) for i, line in enumerate(lines) if (m := HEADER.match(line))]
    out = PostData(preamble="\n".join(lines[:heads[0][0]] if heads else lines))
    for n, (i, kind, name) in enumerate(heads):
        stmt = _statement(lines[i + 1:heads[n + 1][0] if n + 1 < len(heads) else len(lines)])
        if not stmt:
            continue
        if hold and kind in POST_DATA_TYPES:
            out.held.append(from_post_data(kind, stmt, name))
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


def table_key(name: str) -> tuple[str, str] | None:
    """(schema, table) of a table name as pg_dump prints it (`public.t`, `"My S"."T"`), or None."""
    m = re.fullmatch(rf"({_IDENT})\.({_IDENT})", name)
    if m is None:
        return None
    return (unquote(m.group(1)), unquote(m.group(2)))




class PostDataRun:
    """Creates what pg_dump's post-data holds on the target (`sql()` gives it), skipping the groups
    recorded as done, `jobs` groups at a time, and marks post-data done in `<state>.sync` with
    the last group.

    A big table's group starts as soon as the copy reports it copied (`table_copied`), while the
    other tables are still copying: its index builds no longer wait for the whole copy (nor the
    copy's own wrap-up). Small tables' groups, the ones not reported and the rest wait for `finish`.
    Everything up to the first group (pg_restore's output, the first connection, the groups
    already done) is prepared in the background, beside the copy's start."""

    def __init__(self, target: str, state_schema: str, slot: str, sql: Callable[[], str], jobs: int,
                 hold: bool = False) -> None:
        """`hold`: hold back foreign keys, triggers and rules even where the target role may set
        session_replication_role (without it, they are held back anyway)."""
        self.target, self.slot, self.jobs, self.hold = target, slot, max(1, jobs), hold
        self.state_schema = state_schema
        self.s = quote_ident(state_schema)
        # Index builds sort whole tables: memory instead of temp files, shared by the builds at once.
        self.memory = f"SET maintenance_work_mem = '{max(64, 1024 // self.jobs)}MB'"
        self.conns = ThreadConnections()
        self.submitted: set[str] = set()
        self.futures: list[Future[None]] = []
        self.pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="post-data")
        self._ready = self.pool.submit(self._prepare, sql)

    def __enter__(self) -> PostDataRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prepare(self, sql: Callable[[], str]) -> None:
        first = self.conns.keep(connect(self.target, "target"))
        hold = self.hold or not holdback.replica_role_allowed(first)
        self.pd = split_post_data(sql(), hold)
        self.by_table = {key: name for name in self.pd.groups if (key := table_key(name)) is not None}
        self.preamble = drop_unknown_settings(first.cursor(), self.pd.preamble)
        cur = self._session(first).cursor()
        cur.execute(f"SELECT item FROM {self.s}.post_data WHERE slot_name = %s", (self.slot,))
        self.done = {r[0] for r in cur.fetchall()}
        first.commit()

    def _session(self, conn: Any = None) -> Any:
        """This thread's target connection (`conn`, or a new one), set up as pg_dump's output expects."""
        if self.conns.mine.__dict__.get("conn") is None:
            conn = self.conns.mine.conn = conn or self.conns.keep(connect(self.target, "target"))
            cur = conn.cursor()
            cur.execute(self.preamble)
            cur.execute(self.memory)
            conn.commit()
        return self.conns.mine.conn

    def _create(self, names: list[str], mark_sync: bool = False) -> None:
        """The groups `names` (or REST), created and recorded in one transaction."""
        self._ready.result()
        statements = self.pd.rest if names == [REST] else [q for t in names for q in self.pd.groups[t]]
        conn = self._session()
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
            raise PostDataError(f"creating {what} on target {describe_dsn(self.target)} failed: {first_line(exc)}. "
                                "If the target already has them, pass --no-schema") from None
        cur.execute(f"INSERT INTO {self.s}.post_data (slot_name, item) SELECT %s, unnest(%s::text[])",
                    (self.slot, names))
        if names == [REST]:
            holdback.record(cur, self.state_schema, self.slot, self.pd.held)
        if mark_sync:
            cur.execute(f"UPDATE {self.s}.sync SET post_data_done = true WHERE slot_name = %s", (self.slot,))
        conn.commit()

    def table_copied(self, schema: str, table: str, size: int) -> None:
        """`schema.table` is copied (committed): a big table's group starts now."""
        self._ready.result()
        name = self.by_table.get((schema, table))
        if name is None or name in self.done or name in self.submitted or size < SMALL_TABLE_BYTES:
            return
        self.submitted.add(name)
        self.futures.append(self.pool.submit(self._create, [name]))

    def finish(self) -> None:
        """Every group left (small tables packed together, biggest first), then the rest."""
        finishing = time.monotonic()
        self._ready.result()
        todo = [t for t in self.pd.groups if t not in self.done and t not in self.submitted]
        size: dict[str, int] = {}
        if todo:  # biggest first: the longest build starts at once
            size = self.pool.submit(self._sizes, todo).result()  # on a connection set up already
            todo.sort(key=lambda t: -size.get(t, 0))
        if self.done:
            log.info("post-data: %d of %d tables' indexes and constraints were created before",
                     len(self.done - {REST}), len(self.pd.groups))
        self.futures += [self.pool.submit(self._create, unit) for unit in pack_small_groups(todo, size, self.pd.groups)]
        for _ in completed_or_cancel(self.futures):
            failpoints.hit("mid_post_data")
        if REST not in self.done:  # else post_data_done was set with it
            self.pool.submit(self._create, [REST], True).result()
        log.info("schema: created the indexes and constraints of %d tables (%d at a time) and %d other objects on "
                 "the target, %.1f s after the copy", len(todo) + len(self.submitted), self.jobs, len(self.pd.rest),
                 time.monotonic() - finishing)
        if self.pd.held and REST not in self.done:
            log.info("schema: %d foreign key(s), trigger(s) and rule(s) held back until cutover (they would fire "
                     "during apply): %s", len(self.pd.held),
                     ", ".join(f"{h.kind} {h.name} on {h.table}" for h in self.pd.held))

    def _sizes(self, tables: list[str]) -> dict[str, int]:
        conn = self._session()
        cur = conn.cursor()
        cur.execute("SELECT t, coalesce(pg_table_size(to_regclass(t)), 0) FROM unnest(%s::text[]) t", (tables,))
        size = dict(cur.fetchall())
        conn.commit()
        return size

    def close(self) -> None:
        """Cancel the groups not started, wait for the running ones, close the connections."""
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True)
        self.conns.close()

