"""What changed on the source since an online verify's LSN X: `cutover --verify online`'s tail.

`verify --online` proves the target equal to the source as of X. For a cutover the comparison
under the fence then only has to cover what changed after X, and that must not be taken on the
daemon's word (a change it lost would go unseen). So the temporary slot the online verify made to
export its snapshot at X stays open, and a thread here reads its stream (our decoder, pgoutput
protocol 1: a transaction arrives whole at its commit): every key inserted, updated (old and new
key) or deleted after X, per table. It acknowledges as it goes, so the slot retains little WAL.

At the fence the cutover writes its handoff marker (a transactional logical message) after the
last write the fence let through; once this stream reaches the marker it has seen every change
the source committed before the handoff. `compare` then digests exactly those keys' rows on both
sides (index look-ups: the planner is told not to scan), names the rows that differ, and compares
whole (the existing checksum) each table whose rows cannot be told by key: no primary key, a
replica identity other than the primary key, a TRUNCATE, an unchanged TOASTed key, or more than
MAX_KEYS keys. The time under the fence grows with what was written since X, not with the size
of the database.

Not covered, and said in the receipt: a write on the target behind pgferry's back after X to a
row the source did not touch since (the online verify covered everything before X).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extras

from decoder import UNCHANGED, Commit, Delete, Insert, LogicalMessage, Lsn, Relation, Truncate, Update
from decoder.pgoutput import PgOutputDecoder
from sink.state import HANDOFF_PREFIX, pgferry_session, quote_ident, readable_name

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn
from .verify import _SETTINGS, Side, TableResult, _columns, _rows_that_differ, row_hash, verify_table

log = logging.getLogger("pgferry.verify")

LOOKUPS = "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
MAX_KEYS = 1_000_000  # keys remembered per table; past this the table is compared whole at the fence
FEEDBACK_EVERY = 1.0  # seconds between acknowledgements to the slot


@dataclass
class _Rel:
    schema: str
    table: str
    key_names: tuple[str, ...]
    key_at: tuple[int, ...]  # positions of the key columns in a tuple
    keyed: bool  # the replica identity is the key columns of a default identity (the primary key)


@dataclass
class Changes:
    """The keys written on the source since `since` (a stream read by a thread), per table."""

    since: str
    keys: dict[tuple[str, str], set[tuple[Any, ...]]] = field(default_factory=dict)
    key_names: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    whole: dict[tuple[str, str], str] = field(default_factory=dict)  # table -> why it is compared whole
    transactions: int = 0
    changes: int = 0
    error: str | None = None
    marker: str | None = None  # the cutover id whose handoff marker the stream reached
    compare_s: dict[str, float] = field(default_factory=dict)  # table -> seconds its comparison took

    def table_count(self) -> int:
        return len(set(self.keys) | set(self.whole))


class ChangeReader:
    """Reads a temporary slot's stream in a thread until closed, into a `Changes`."""

    def __init__(self, repl: Any, slot_name: str, publication: str, since: Lsn, source: str) -> None:
        self.repl, self.slot_name, self.source = repl, slot_name, source
        self.changes = Changes(since=str(since))
        self._rels: dict[int, _Rel] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        cur = repl.cursor()
        try:
            cur.start_replication(slot_name=slot_name, decode=False, start_lsn=int(since), options={
                "proto_version": "1", "publication_names": publication, "messages": "true"})
        except psycopg2.Error as exc:
            raise PgferryError(f"could not read the changes since {since} from source {describe_dsn(source)}: "
                               f"{first_line(exc)}") from None
        self._cur = cur
        self._thread = threading.Thread(target=self._run, name="pgferry-changed", daemon=True)
        self._thread.start()

    # -- the reading thread ----------------------------------------------------------------------
    def _run(self) -> None:
        decoder, cur = PgOutputDecoder(), self._cur
        acked, last = 0, time.monotonic()
        try:
            while not self._stop.is_set():
                msg = cur.read_message()
                if msg is None:
                    select.select([self.repl], [], [], 0.05)
                    continue
                m = decoder.decode(msg.payload)
                self._take(m)
                if isinstance(m, Commit):
                    acked = int(m.end_lsn)
                if acked and time.monotonic() - last > FEEDBACK_EVERY:
                    cur.send_feedback(flush_lsn=acked)
                    last = time.monotonic()
        except Exception as exc:  # reported by wait_for_marker: never a silent gap
            with self._seen:
                self.changes.error = first_line(exc) if isinstance(exc, psycopg2.Error) else repr(exc)
                self._seen.notify_all()

    def _take(self, m: Any) -> None:
        c = self.changes
        if isinstance(m, Relation):
            at = tuple(i for i, col in enumerate(m.columns) if col.is_key)
            self._rels[m.oid] = _Rel(m.namespace, m.name, tuple(m.columns[i].name for i in at), at,
                                     m.replica_identity == "d" and bool(at))
            return
        if isinstance(m, Insert | Update | Delete):
            rel = self._rels[m.relation_oid]
            t = (rel.schema, rel.table)
            c.changes += 1
            if t in c.whole:
                return
            if not rel.keyed:
                c.whole[t] = "no primary key" if rel.key_at == () else "its replica identity is not the primary key"
                c.keys.pop(t, None)
                return
            rows = [m.new] if isinstance(m, Insert) else [m.old] if isinstance(m, Delete) else \
                [m.new] + ([m.old] if m.old is not None else [])
            seen = c.keys.setdefault(t, set())
            c.key_names[t] = rel.key_names
            for row in rows:
                assert row is not None
                key = tuple(row[i] for i in rel.key_at)
                if any(v is UNCHANGED or v is None or isinstance(v, bytes) for v in key):
                    c.whole[t] = "a key value the stream did not carry"
                    c.keys.pop(t, None)
                    return
                seen.add(key)
            if len(seen) > MAX_KEYS:
                c.whole[t] = f"more than {MAX_KEYS:,} keys changed"
                c.keys.pop(t, None)
            return
        if isinstance(m, Truncate):
            for oid in m.relation_oids:
                rel = self._rels[oid]
                c.whole[(rel.schema, rel.table)] = "truncated"
                c.keys.pop((rel.schema, rel.table), None)
            return
        if isinstance(m, Commit):
            c.transactions += 1
            return
        if isinstance(m, LogicalMessage) and m.prefix == HANDOFF_PREFIX:
            with self._seen:
                c.marker = m.content.decode("utf-8", "replace")
                self._seen.notify_all()

    # -- the cutover's side ----------------------------------------------------------------------
    def wait_for_marker(self, cutover_id: str, timeout: float) -> Changes:
        """Until the stream has reached the handoff marker of `cutover_id`: every change the
        source committed before the handoff is in `changes` then. Stops the reading."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while self.changes.marker != cutover_id:
                if self.changes.error is not None:
                    raise PgferryError(f"reading the changes since {self.changes.since} from source "
                                       f"{describe_dsn(self.source)} failed: {self.changes.error}")
                if not self._thread.is_alive():
                    raise PgferryError("the reader of the changes since the online verify stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PgferryError(f"the changes since {self.changes.since} were not read up to the handoff "
                                       f"within {timeout:.0f} s")
                self._seen.wait(min(left, 0.5))
        self.close()
        return self.changes

    def close(self) -> None:
        """Stop reading; the temporary slot goes with its connection."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        try:
            self.repl.close()
        except psycopg2.Error:
            pass


def compare(source: str, target: str, changes: Changes, mode: str = "checksum") -> list[TableResult]:
    """Compare, with the source fenced and the target at the handoff, the rows of the keys that
    changed since X (and whole the tables that cannot be told by key)."""
    src, dst = connect(source, "source"), connect(target, "target")
    try:
        for c in (src, dst):
            cur = c.cursor()
            pgferry_session(cur)
            cur.execute(_SETTINGS)
            c.commit()
        s, d = Side(src), Side(dst)
        results = []
        with ThreadPoolExecutor(2) as pool:
            for t in sorted(set(changes.keys) | set(changes.whole)):
                began = time.monotonic()
                if t in changes.whole:
                    res = verify_table(s, d, t[0], t[1], mode)
                    res.differences.insert(0, f"compared whole: {changes.whole[t]}")
                    if res.match:
                        res.differences.clear()
                else:
                    res = _compare_keys(s, d, pool, t, changes.key_names[t], changes.keys[t])
                results.append(res)
                changes.compare_s[readable_name(*t)] = round(time.monotonic() - began, 3)
        return results
    finally:
        src.close()
        dst.close()


def _compare_keys(src: Side, dst: Side, pool: ThreadPoolExecutor, t: tuple[str, str], names: tuple[str, ...],
                  keys: set[tuple[Any, ...]]) -> TableResult:
    qualified = f"{quote_ident(t[0])}.{quote_ident(t[1])}"
    res = TableResult(readable_name(*t))
    cols, pk = _columns(src, qualified)
    if tuple(n for n, _ in pk) != names:  # the key changed meanwhile (DDL): whole, to be sure
        res = verify_table(src, dst, t[0], t[1], "checksum")
        return res
    k = ", ".join(quote_ident(c) for c, _ in pk)
    arrays = [[key[i] for key in keys] for i in range(len(pk))]
    unnest = ", ".join("%s::text[]" for _ in pk)
    typed = ", ".join(f"u.c{i}::{typ}" for i, (_, typ) in enumerate(pk))
    aliases = ", ".join(f"c{i}" for i in range(len(pk)))
    if len(pk) == 1:  # one index scan over the sorted array
        where = f" WHERE {k} = ANY(%s::text[]::{pk[0][1]}[])"
    else:
        where = f" WHERE ({k}) IN (SELECT {typed} FROM unnest({unnest}) AS u({aliases}))"
    row = row_hash(cols)
    # key look-ups, whatever the number of keys: a scan would grow with the table
    sql = (f"{LOOKUPS}SELECT count(*), coalesce(sum(('x' || left(h, 16))::bit(64)::bigint), 0), "
           f"coalesce(sum(('x' || right(h, 16))::bit(64)::bigint), 0) FROM (SELECT {row} AS h FROM {qualified}"
           f"{where}) s")
    params = tuple(arrays)
    fa, fb = pool.submit(src.one, sql, params), pool.submit(dst.one, sql, params)
    try:
        a, b = fa.result(), fb.result()
    except psycopg2.Error as exc:
        res.match = False
        res.differences.append(f"cannot compare the changed rows: {first_line(exc)}")
        return res
    res.source_rows, res.target_rows = int(a[0]), int(b[0])
    if a != b:
        res.match = False
        res.differences.append(f"of the {len(keys)} keys changed since the online verify, rows differ "
                               f"({a[0]} source rows, {b[0]} target rows)")
        shown = ", ".join(c if c.isidentifier() and c == c.lower() else quote_ident(c) for c, _ in pk)
        res.differences.extend(_rows_that_differ(src, dst, qualified, k, shown, row, where, params))
    return res
