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
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg2
import psycopg2.extras

from decoder import UNCHANGED, Begin, Commit, Delete, Insert, LogicalMessage, Lsn, Relation, Truncate, Update
from decoder.pgoutput import PgOutputDecoder
from sink import ddl
from sink.ddl import PREFIX as DDL_PREFIX
from sink.state import HANDOFF_PREFIX, pgferry_session, quote_ident, readable_name

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn
from .verify import _SETTINGS, Side, TableResult, _columns, _rows_that_differ, keys_among, row_hash, verify_table

log = logging.getLogger("pgferry.verify")

LOOKUPS = "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
SCANS = "SET LOCAL enable_seqscan = on; SET LOCAL enable_hashjoin = on; SET LOCAL enable_mergejoin = on"
SPLIT_PREFIX = "pgferry-verify-split"  # the logical message that ends a window of changes
MAX_KEYS = 1_000_000  # keys remembered per table; past this the table is compared whole at the fence
FEEDBACK_EVERY = 1.0  # seconds between acknowledgements to the slot


@dataclass
class _Rel:
    schema: str
    table: str
    key_names: tuple[str, ...]
    key_at: tuple[int, ...]  # positions of the key columns in a tuple
    keyed: bool  # the replica identity is the key columns of a default identity (the primary key)


T = tuple[str, str]  # (schema, table)


@dataclass
class Changes:
    """The keys written on the source in a window of its stream (from `since`), per table, each
    with the commit LSN of the last transaction that wrote it."""

    since: str
    keys: dict[T, dict[tuple[Any, ...], int]] = field(default_factory=dict)
    key_names: dict[T, tuple[str, ...]] = field(default_factory=dict)
    whole: dict[T, str] = field(default_factory=dict)  # table -> why it is compared whole
    whole_at: dict[T, int] = field(default_factory=dict)  # ...and the last commit LSN that wrote it
    transactions: int = 0
    changes: int = 0
    compare_s: dict[str, float] = field(default_factory=dict)  # table -> seconds its comparison took

    def key_count(self) -> int:
        return sum(len(k) for k in self.keys.values())

    def tables(self) -> list[T]:
        return sorted(set(self.keys) | set(self.whole))

    def split(self, at: int) -> tuple[Changes, Changes]:
        """(what was last written before `at`, what after): a key written on both sides of `at`
        goes after, where its last state is compared."""
        before, after = Changes(since=self.since), Changes(since=str(Lsn(at)))
        before.transactions, before.changes = self.transactions, self.changes
        for t, ks in self.keys.items():
            for key, lsn in ks.items():
                side = before if lsn < at else after
                side.keys.setdefault(t, {})[key] = lsn
                side.key_names[t] = self.key_names[t]
        for t, why in self.whole.items():
            side = before if self.whole_at[t] < at else after
            side.whole[t], side.whole_at[t] = why, self.whole_at[t]
        return before, after


def _table_of(obj: ddl.DdlObject) -> T | None:
    """(schema, table) of a DDL command's object when it is a table (its identity is the quoted
    `schema.table`), or an index's table."""
    ident = obj.table if obj.type == "index" else obj.identity if obj.type == "table" else None
    if not ident or not obj.schema:
        return None
    for prefix in (obj.schema + ".", quote_ident(obj.schema) + "."):  # quoted where PostgreSQL must
        if ident.startswith(prefix):
            rest = ident[len(prefix):]
            break
    else:
        return None
    return obj.schema, rest[1:-1].replace('""', '"') if rest.startswith('"') else rest


class ChangeReader:
    """Reads a temporary slot's stream in a thread until closed, into `changes`: the window since
    the last `split` (or since the slot's start)."""

    def __init__(self, repl: Any, slot_name: str, publication: str, since: Lsn, source: str) -> None:
        self.repl, self.slot_name, self.source = repl, slot_name, source
        self.changes = Changes(since=str(since))
        self.error: str | None = None
        self.marker: str | None = None  # the cutover id whose handoff marker the stream reached
        self._rels: dict[int, _Rel] = {}
        self._lsn = 0  # the commit LSN of the transaction being read
        self._splits: dict[str, int] = {}  # a split asked for: its id -> at
        self._ready: dict[str, Changes] = {}
        self._stop = threading.Event()
        self._seen = threading.Condition(threading.Lock())
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
        except Exception as exc:  # reported to whoever waits: never a silent gap
            with self._seen:
                self.error = first_line(exc) if isinstance(exc, psycopg2.Error) else repr(exc)
                self._seen.notify_all()

    def _whole(self, t: T, why: str) -> None:
        c = self.changes
        c.whole[t], c.whole_at[t] = why, self._lsn
        c.keys.pop(t, None)

    def _take(self, m: Any) -> None:
        c = self.changes
        if isinstance(m, Begin):
            self._lsn = int(m.final_lsn)
            return
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
                c.whole_at[t] = self._lsn
                return
            if not rel.keyed:
                self._whole(t, "no primary key" if rel.key_at == () else "its replica identity is not the primary key")
                return
            rows = [m.new] if isinstance(m, Insert) else [m.old] if isinstance(m, Delete) else \
                [m.new] + ([m.old] if m.old is not None else [])
            seen = c.keys.setdefault(t, {})
            c.key_names[t] = rel.key_names
            for row in rows:
                assert row is not None
                key = tuple(row[i] for i in rel.key_at)
                if any(v is UNCHANGED or v is None or isinstance(v, bytes) for v in key):
                    self._whole(t, "a key value the stream did not carry")
                    return
                seen[key] = self._lsn
            if len(seen) > MAX_KEYS:
                self._whole(t, f"more than {MAX_KEYS:,} keys changed")
            return
        if isinstance(m, Truncate):
            for oid in m.relation_oids:
                rel = self._rels[oid]
                self._whole((rel.schema, rel.table), "truncated")
            return
        if isinstance(m, Commit):
            c.transactions += 1
            return
        if isinstance(m, LogicalMessage) and m.prefix == HANDOFF_PREFIX:
            with self._seen:
                self.marker = m.content.decode("utf-8", "replace")
                self._seen.notify_all()
        elif isinstance(m, LogicalMessage) and m.prefix == DDL_PREFIX:
            # a table altered (a rewrite, a default) or made since X: its rows changed without row
            # messages, or were never compared: the whole table
            try:
                cmd = ddl.parse(m.content)
            except (msgspec.DecodeError, ValueError):
                return
            for obj in cmd.objects:
                name = _table_of(obj)
                if name is not None:
                    self._whole(name, f"changed by DDL ({cmd.tag})")
        elif isinstance(m, LogicalMessage) and m.prefix == SPLIT_PREFIX:
            ident = m.content.decode("utf-8", "replace")
            with self._seen:
                if ident in self._splits:  # every commit before `at` has been read: they come in commit order
                    self._ready[ident], self.changes = c.split(self._splits.pop(ident))
                    self._seen.notify_all()

    # -- the cutover's side ----------------------------------------------------------------------
    def _wait(self, done: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not done():
                if self.error is not None:
                    raise PgferryError(f"reading the changes since {self.changes.since} from source "
                                       f"{describe_dsn(self.source)} failed: {self.error}")
                if not self._thread.is_alive():
                    raise PgferryError("the reader of the changes since the online verify stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PgferryError(f"the changes since {self.changes.since} were not read up to {what} within "
                                       f"{timeout:.0f} s")
                self._seen.wait(min(left, 0.5))

    def split(self, at: Lsn, timeout: float) -> Changes:
        """The window up to `at` (what was last written before it), once read; the reader goes on
        from `at`. A transactional message committed on the source now (after `at`) tells when
        every commit before `at` has been read."""
        ident = uuid.uuid4().hex
        with self._seen:
            self._splits[ident] = int(at)
        conn = connect(self.source, "source")
        try:
            with conn.cursor() as cur:
                cur.execute("SET default_transaction_read_only = off")
                cur.execute("SELECT pg_logical_emit_message(true, %s, %s)", (SPLIT_PREFIX, ident))
            conn.commit()
        finally:
            conn.close()
        try:
            self._wait(lambda: ident in self._ready, str(at), timeout)
        finally:
            with self._seen:
                self._splits.pop(ident, None)  # a split that came too late must not take keys away
        with self._seen:
            return self._ready.pop(ident)

    def check(self) -> None:
        """Raise if the reader has stopped (before the fence: nothing to undo yet)."""
        with self._seen:
            if self.error is not None:
                raise PgferryError(f"reading the changes since {self.changes.since} from source "
                                   f"{describe_dsn(self.source)} failed: {self.error}")
            if not self._thread.is_alive():
                raise PgferryError("the reader of the changes since the online verify stopped")

    def wait_for_marker(self, cutover_id: str, timeout: float) -> Changes:
        """Until the stream has reached the handoff marker of `cutover_id`: every change the
        source committed before the handoff is in `changes` then. Stops the reading."""
        self._wait(lambda: self.marker == cutover_id, "the handoff", timeout)
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
    changed in the window (and whole the tables that cannot be told by key)."""
    src, dst = connect(source, "source"), connect(target, "target")
    try:
        for c in (src, dst):
            cur = c.cursor()
            pgferry_session(cur)
            cur.execute(_SETTINGS)
            c.commit()
        return compare_sides(Side(src), Side(dst), changes, mode)
    finally:
        src.close()
        dst.close()


def compare_sides(s: Side, d: Side, changes: Changes, mode: str = "checksum") -> list[TableResult]:
    """`compare` on two sessions already open (pinned to snapshots, in a round before the fence)."""
    results = []
    with ThreadPoolExecutor(2) as pool:
        for t in changes.tables():
            began = time.monotonic()
            try:
                if t in changes.whole:
                    res = verify_table(s, d, t[0], t[1], mode)
                    res.differences.insert(0, f"compared whole: {changes.whole[t]}")
                    if res.match:
                        res.differences.clear()
                else:
                    res = _compare_keys(s, d, pool, t, changes.key_names[t], changes.keys[t])
            except psycopg2.Error as exc:  # e.g. dropped or renamed since: gone from both is no difference
                res = _gone(s, d, t, exc)
            results.append(res)
            changes.compare_s[readable_name(*t)] = round(time.monotonic() - began, 3)
    return results


def _gone(s: Side, d: Side, t: T, exc: psycopg2.Error) -> TableResult:
    res = TableResult(readable_name(*t))
    qualified = f"{quote_ident(t[0])}.{quote_ident(t[1])}"
    there = [side.one("SELECT to_regclass(%s) IS NOT NULL", (qualified,))[0] for side in (s, d)]
    if any(there):
        res.match = False
        res.differences.append(f"cannot compare it: {first_line(exc)}"
                               + ("" if all(there) else f" (it is only on the {'source' if there[0] else 'target'})"))
    return res


def _compare_keys(src: Side, dst: Side, pool: ThreadPoolExecutor, t: T, names: tuple[str, ...],
                  keys: dict[tuple[Any, ...], int]) -> TableResult:
    qualified = f"{quote_ident(t[0])}.{quote_ident(t[1])}"
    res = TableResult(readable_name(*t))
    cols, pk = _columns(src, qualified)
    if sorted(n for n, _ in pk) != sorted(names):  # the key changed meanwhile (DDL): whole, to be sure
        res = verify_table(src, dst, t[0], t[1], "checksum")
        res.differences.insert(0, "compared whole: its primary key is not the stream's key any more")
        if res.match:
            res.differences.clear()
        return res
    k = ", ".join(quote_ident(c) for c, _ in pk)
    # the stream lists the key columns in column order, the index in its own
    at = [names.index(n) for n, _ in pk]
    arrays = [[key[i] for key in keys] for i in at]
    if len(pk) == 1:  # one index scan over the sorted array
        where = f" WHERE {k} = ANY(%s::text[]::{pk[0][1]}[])"
    else:
        where = f" WHERE {keys_among(pk)}"
    row = row_hash(cols)
    # key look-ups, whatever the number of keys: a scan would grow with the table
    sql = (f"{LOOKUPS}SELECT count(*), coalesce(sum(('x' || left(h, 16))::bit(64)::bigint), 0), "
           f"coalesce(sum(('x' || right(h, 16))::bit(64)::bigint), 0) FROM (SELECT {row} AS h FROM {qualified}"
           f"{where}) s")
    params = tuple(arrays)

    def digest(side: Side) -> Any:
        try:
            return side.one(sql, params)
        finally:
            if side.pinned:  # SET LOCAL outlives the savepoint: the rest of the transaction may scan
                side.conn.cursor().execute(SCANS)

    fa, fb = pool.submit(digest, src), pool.submit(digest, dst)
    wait([fa, fb])  # both: a session still busy must not take the next table's queries
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
