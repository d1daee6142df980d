"""`pgferry repair`: copy again the key ranges an online verify found different, then verify again.

1. `verify --online` (online.py) over the tables asked for: the differing key ranges of each
   table (CHUNK rows of the key order each, verify.py) are listed. Without `--apply` that is all
   (a dry run: what would be copied, exit 1 when anything differs).
2. `--apply`: new snapshots at an LSN Y, taken the online verify's way (a temporary slot exports
   the source's; the daemon holds exactly before Y), but the daemon is kept holding while, in one
   target transaction, each range's rows are deleted and the source's rows of that range as of Y
   copied in (COPY out of the source snapshot, COPY into the target). The target then holds the
   source's state as of Y in those ranges, and everywhere else it already did (the daemon had
   applied everything before Y): when the daemon goes on from Y, nothing is lost or applied twice.
   The hold lasts as long as the copy (short: a few ranges of at most CHUNK rows).
3. The repaired tables are verified online again; the exit code says whether they are equal now.

A table without a primary key is compared whole and cannot be repaired by range: `pgferry resync`
copies it again whole. A table unreadable on the target is named, not touched.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO

import msgspec
import psycopg2

from sink.state import pgferry_session, quote_ident, readable_name

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn, published_tables
from ..stream import pause
from .online import BY, _replication, take_snapshots, verify_online
from .verify import _SETTINGS, Side, TableResult, _columns, key_range, keys_among

log = logging.getLogger("pgferry.repair")


class RangeMismatch(PgferryError):
    pass


@dataclass
class Plan:
    table: tuple[str, str]
    ranges: list[tuple[tuple | None, tuple | None]]


@dataclass
class RepairResult:
    found: list[TableResult]  # the first comparison's tables
    plans: list[Plan] = field(default_factory=list)
    not_repairable: dict[str, str] = field(default_factory=dict)  # table -> why
    applied_at: str | None = None  # the LSN the ranges were copied as of
    rows_copied: int = 0
    rows_deleted: int = 0
    daemon_held_s: float = 0.0
    after: list[TableResult] = field(default_factory=list)  # the verify after the repair


def plan(source: str, publication: str, results: list[TableResult]) -> tuple[list[Plan], dict[str, str]]:
    conn = connect(source, "source")
    try:
        names = {readable_name(n, t): (n, t) for n, t in published_tables(conn, publication)}
    finally:
        conn.close()
    plans, refused = [], {}
    for r in results:
        if r.match:
            continue
        if not r.keyed:
            refused[r.name] = f"no primary key: copy it again whole with `pgferry resync {r.name}`"
        elif not r.ranges:
            refused[r.name] = "; ".join(r.differences) or "it differs, but no key range was found"
        elif r.name not in names:
            refused[r.name] = "no longer published"
        else:
            plans.append(Plan(names[r.name], r.ranges))
    return plans, refused


def run_repair(source: str, target: str, publication: str, slot: str, schema: str, tables: list[str] | None,
               apply: bool, timeout: float, max_rate: float | None, as_json: bool,
               out: IO[str] = sys.stdout) -> int:
    found = verify_online(source, target, publication, slot, schema, tables, "checksum", timeout, max_rate,
                          progress=sys.stderr)
    res = RepairResult(found.tables)
    res.plans, res.not_repairable = plan(source, publication, found.tables)
    if apply and res.plans:
        _apply(res, source, target, slot, schema, timeout)
        again = [readable_name(*p.table) for p in res.plans]
        res.after = verify_online(source, target, publication, slot, schema, again, "checksum", timeout, max_rate,
                                  progress=sys.stderr).tables
    return _print(res, apply, as_json, out)


def _apply(res: RepairResult, source: str, target: str, slot: str, schema: str, timeout: float) -> None:
    repl, src, dst = _replication(source), connect(source, "source"), connect(target, "target")
    writer = connect(target, "target")
    held = False
    try:
        snaps = take_snapshots(source, target, slot, schema, repl, src, dst, f"pgferry_repair_{os.getpid()}",
                               timeout, release=False)
        held = True
        started = time.monotonic()
        repl.close()  # the slot only gave the snapshot
        res.applied_at = str(snaps.at)
        cur = writer.cursor()
        pgferry_session(cur)
        cur.execute(_SETTINGS)
        try:  # nothing of the target's own fires while rows are put back (where the role may)
            cur.execute("SAVEPOINT r; SET LOCAL session_replication_role = replica; RELEASE SAVEPOINT r")
        except psycopg2.Error:
            cur.execute("ROLLBACK TO SAVEPOINT r")
        for p in res.plans:
            qualified = f"{quote_ident(p.table[0])}.{quote_ident(p.table[1])}"
            cols, key = _columns(snaps.source, qualified)
            listed = ", ".join(quote_ident(c) for c in cols)
            as_text = ", ".join(f"{quote_ident(c)}::text" for c, _ in key)
            for lower, upper in p.ranges:
                where, params = key_range(key, lower, upper)
                cur.execute(f"DELETE FROM {qualified}{where} RETURNING {as_text}", params)
                deleted = set(cur.fetchall())
                res.rows_deleted += len(deleted)
                # Each server puts a text key in a range by its own collation: a row the target
                # deletes must be one the source copies back, or not on the source at all.
                extra = deleted - set(snaps.source.all(f"SELECT {as_text} FROM {qualified}{where}", params))
                if extra and _on_source(snaps.source, qualified, key, extra):
                    raise RangeMismatch(f"{readable_name(*p.table)}: the servers' collations put different keys in "
                                        "the same key range; nothing changed. Copy the table again whole with "
                                        f"`pgferry resync {readable_name(*p.table)}`")
                buf = io.BytesIO()
                scur = snaps.source.conn.cursor()
                scur.copy_expert(scur.mogrify(f"COPY (SELECT {listed} FROM {qualified}{where}) TO STDOUT", params)
                                 .decode(), buf)
                buf.seek(0)
                cur.copy_expert(f"COPY {qualified} ({listed}) FROM STDIN", buf)
                res.rows_copied += cur.rowcount
        try:
            writer.commit()
        except psycopg2.Error as exc:
            raise PgferryError(f"repair: the commit on target {describe_dsn(target)} failed ({first_line(exc)}); it "
                               "may or may not have taken effect: run `pgferry repair` again to see") from None
        res.daemon_held_s = round(snaps.held_s + time.monotonic() - started, 3)
        log.info("repair: %d rows copied again as of %s (%d deleted first); the daemon held %.3f s",
                 res.rows_copied, snaps.at, res.rows_deleted, res.daemon_held_s)
    except psycopg2.Error as exc:
        raise PgferryError(f"repair failed, nothing changed on target {describe_dsn(target)}: {first_line(exc)}") \
            from None
    finally:
        for c in (writer, repl, src, dst):  # the writer first: its locks go before the daemon goes on
            if not c.closed:
                c.close()  # (an open transaction rolls back)
        if held:
            pause.release(target, schema, slot, BY)


def _on_source(src: Side, qualified: str, key: list[tuple[str, str]], keys: set[tuple]) -> bool:
    """Whether any of `keys` (as text) is a row of the source snapshot."""
    arrays = tuple([row[i] for row in keys] for i in range(len(key)))
    return bool(src.all(f"SELECT 1 FROM {qualified} WHERE {keys_among(key)} LIMIT 1", arrays))


def _print(res: RepairResult, apply: bool, as_json: bool, out: IO[str]) -> int:
    differing = [t for t in res.found if not t.match]
    ok = not differing or (apply and not res.not_repairable and all(t.match for t in res.after))
    ranges = {readable_name(*p.table): [{"above": lo, "up_to": up} for lo, up in p.ranges] for p in res.plans}
    if as_json:
        out.write(msgspec.json.encode({
            "ok": ok, "applied": apply and bool(res.plans), "applied_at_lsn": res.applied_at,
            "different": [{"name": t.name, "differences": t.differences} for t in differing],
            "ranges": ranges, "not_repairable": res.not_repairable, "rows_deleted": res.rows_deleted,
            "rows_copied": res.rows_copied, "daemon_held_s": res.daemon_held_s,
            "after": [{"name": t.name, "match": t.match, "differences": t.differences} for t in res.after],
        }).decode() + "\n")
        return 0 if ok else 1
    if not differing:
        out.write(f"{len(res.found)} tables compared: all equal, nothing to repair\n")
        return 0
    for name, rs in ranges.items():
        out.write(f"{name}: {len(rs)} key range(s) {'copied again' if apply else 'to copy again'}\n")
        for r in rs:
            out.write(f"    above {r['above'] or 'the start'} up to {r['up_to'] or 'the end'}\n")
    for name, why in res.not_repairable.items():
        out.write(f"{name}: not repaired: {why}\n")
    if not apply:
        out.write("dry run: nothing changed; `pgferry repair --apply` copies those ranges again\n")
        return 1
    out.write(f"{res.rows_copied} rows copied as of {res.applied_at} ({res.rows_deleted} deleted first); "
              f"the daemon held {res.daemon_held_s} s. Verified again:\n")
    print_online_tables(res.after, out)
    return 0 if ok else 1


def print_online_tables(tables: list[TableResult], out: IO[str]) -> None:
    for r in tables:
        out.write(f"    {r.name:<40} {'ok' if r.match else 'DIFFERENT'}\n")
        for d in r.differences:
            out.write(f"        {d}\n")

