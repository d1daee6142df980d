"""The apply hot loop in process: decode + fold + batched writes, without the walsender.

    python -m bench.apply [--scenarios bulk,oltp,hot] [--scale 1.0] [--repeats 3] [--batch-rows 50000]

For each scenario of bench/catchup.py the backlog is written once on a PostgreSQL 18 server and
its pgoutput stream captured into memory. Then, `repeats` times, each into a fresh target database
on the same server, pgferry's stream-loop path runs over the captured messages in this process: the
C fold (`Sink.apply_raw`), the C parser, `Sink.begin/apply/commit` (folding, batch limits, the
background batch writer), and a final flush. Printed per run: wall time, this process's CPU (all threads) and the target
backend's CPU. The catch-up bench mixes in the walsender and the scheduler of a shared machine;
this one measures pgferry's own cost per change, which is what a change to the hot loop moves.
The target tables are compared with the source after every run.
"""

from __future__ import annotations

import argparse
import select
import statistics
import time
from pathlib import Path

import psycopg2
import psycopg2.extras

from bench.catchup import PUB, SCENARIOS, _prepare
from decoder import Begin, Commit, Delete, Insert, Lsn, PgOutputDecoder, Relation, Update
from replicator.local.servers import LocalServer
from replicator.source import max_protocol_version
from replicator.stream.session import CHANGE_TAGS, tune_gc
from sink.apply import BatchLimits, Sink
from tests.pgplugin import Db, new_db, table_digest


def capture(src: Db, slot: str, end: int) -> list[bytes]:
    """The slot's messages up to `end`, as raw pgoutput payloads."""
    conn = psycopg2.connect(src.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    proto = min(max_protocol_version(conn.server_version), 4)
    cur.start_replication(slot_name=slot, decode=False, options={
        "proto_version": str(proto), "publication_names": PUB, "messages": "true", "streaming": "on"})
    out: list[bytes] = []
    while True:
        msg = cur.read_message()
        if msg is None:
            if cur.wal_end >= end:
                break
            select.select([conn], [], [], 0.1)
            continue
        out.append(msg.payload)
        if msg.data_start >= end:
            break
    conn.close()
    return out


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def apply_all(payloads: list[bytes], dsn: str, limits: BatchLimits | None = None) -> dict[str, float]:
    """Run the stream loop's dispatch over `payloads` into a fresh Sink on `dsn`."""
    conn = psycopg2.connect(dsn)
    sink = Sink(conn, "bench", limits=limits)
    sink.open(initial=Lsn(1))
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    (backend,) = cur.fetchone()
    conn.rollback()
    decode = PgOutputDecoder().decode
    b0, c0, t0 = _cpu(backend), time.process_time(), time.perf_counter()
    raw = sink.apply_raw
    for p in payloads:
        if p[:1] in CHANGE_TAGS and raw(p):  # as Session.handle: the C fold first
            continue
        m = decode(p)
        t = type(m)
        if t is Insert or t is Update or t is Delete:
            sink.apply(m, len(p))  # type: ignore[arg-type]
        elif t is Begin:
            sink.begin(m.xid, m.final_lsn)  # type: ignore[union-attr]
        elif t is Commit:
            sink.commit(m.end_lsn, m.commit_time)  # type: ignore[union-attr]
        elif t is Relation:
            sink.relation(m)  # type: ignore[arg-type]
    sink.flush()
    res = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "target_cpu_s": _cpu(backend) - b0}
    conn.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default="bulk,oltp,hot")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=BatchLimits.rows, help="changes per batch (as pgferry's flag)")
    args = ap.parse_args()
    limits = BatchLimits(rows=args.batch_rows)
    tune_gc()  # as the daemon runs (its periodic collection: every 10 s, longer than a run here)
    print(f"{'scenario':8} {'messages':>9} {'changes':>9} {'wall s':>7} {'CPU s':>6} {'target CPU s':>12} "
          f"{'CPU us/change':>13}   runs (CPU s)")
    with LocalServer(18, name="bench-apply-") as server:
        for name in args.scenarios.split(","):
            sc = SCENARIOS[name]
            src = new_db(server, "src")
            _prepare(src, sc)
            src.execute(f"CREATE PUBLICATION {PUB} FOR ALL TABLES")
            src.execute("SELECT pg_create_logical_replication_slot('bench_capture', 'pgoutput')")
            changes = sc.backlog(src, args.scale)
            (end,) = src.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint")[0]
            payloads = capture(src, "bench_capture", int(end))
            runs = []
            for _ in range(args.repeats):
                dst = new_db(server, "dst")
                _prepare(dst, sc)
                dst.execute("CHECKPOINT")
                runs.append(apply_all(payloads, dst.dsn, limits))
                for table, cols in sc.tables.items():
                    if table_digest(src, table, cols) != table_digest(dst, table, cols):
                        raise SystemExit(f"MISMATCH: {table} differs after the apply")
                dst.drop()
            src.execute("SELECT pg_drop_replication_slot('bench_capture')")
            src.drop()
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{name:8} {len(payloads):>9,} {changes:>9,} {med['wall_s']:>7.2f} {med['cpu_s']:>6.2f} "
                  f"{med['target_cpu_s']:>12.2f} {med['cpu_s'] / changes * 1e6:>13.2f}   "
                  + "/".join(f"{r['cpu_s']:.2f}" for r in runs), flush=True)


if __name__ == "__main__":
    main()
