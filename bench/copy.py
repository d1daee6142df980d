"""Initial copy: pgferry's copy against the usual recipe (`pg_dump | psql`), same data, one run.

    python -m bench.copy [--scale 20] [--repeats 2] [--jobs 4]
    python -m bench.copy --tables 1000 [--repeats 2]     # many small tables instead of pgbench
    python -m bench.copy --indexed 4 [--repeats 3]       # tables with secondary indexes instead

Starts a PostgreSQL 15 source and an 18 target (the main real-world case), loads `pgbench -i -s
SCALE` plus a table of many types, then alternates (the order rotating from round to round), each
into a fresh target database:

* pgferry: `InitialSync` — schema pre-data, the parallel COPY source -> target (binary where the
  types allow), sequences, post-data (each table's indexes and constraints once it is copied, `jobs`
  at once);
* the usual recipe, as the issue names it: `pg_dump --schema-only | psql` (the target gets the whole
  schema, indexes included, as a logical-replication set-up does), then `pg_dump --data-only | psql`;
* a stronger baseline: one plain `pg_dump | psql` (schema, data via COPY text, then indexes and
  constraints: pg_dump orders the index builds after the data).

Prints the three times and both ratios. All include creating the schema and the indexes, so each
ends with the same target.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import time

from replicator.local.servers import LocalServer, find_bindir
from replicator.sync import InitialSync, SyncConfig
from replicator.sync.pgtools import find_pg_dump
from tests.pgplugin import Db, new_db
from tests.replicator.test_sync import TYPED


def pgferry_copy(src: Db, dst: Db, jobs: int) -> float:
    t = time.perf_counter()
    InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="bench", schema="pgferry",
                           jobs=jobs)).run()
    took = time.perf_counter() - t
    src.execute("SELECT pg_drop_replication_slot('bench')")
    src.execute("DROP PUBLICATION pgferry")
    return took


def _dump_into(src: Db, dst: Db, *options: str) -> None:
    psql = str(dst.server.client_bindir / "psql")
    dump = subprocess.Popen([find_pg_dump(), "--no-owner", "--no-privileges", *options, "-d", src.dsn],
                            stdout=subprocess.PIPE)
    subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dst.dsn], stdin=dump.stdout, check=True,
                   stdout=subprocess.DEVNULL)
    assert dump.wait() == 0


def recipe_copy(src: Db, dst: Db, jobs: int) -> float:
    """The issue's recipe: schema first (indexes included), then `pg_dump --data-only | psql`."""
    t = time.perf_counter()
    _dump_into(src, dst, "--schema-only")
    _dump_into(src, dst, "--data-only")
    return time.perf_counter() - t


def full_dump_copy(src: Db, dst: Db, jobs: int) -> float:  # one stream, indexes after the data
    t = time.perf_counter()
    _dump_into(src, dst)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--tables", type=int, default=0,
                    help="instead of pgbench: this many small tables (100 rows each), a schema-heavy database")
    ap.add_argument("--indexed", type=int, default=0,
                    help="instead of pgbench: this many tables of 600,000 rows, each with a primary key and two "
                         "secondary indexes (an integer and an md5 text), as application tables have")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    with LocalServer(15, name="bench-src-") as s, LocalServer(18, name="bench-dst-") as t:
        src = new_db(s, "src")
        if args.tables:
            src.psql("".join(f"CREATE TABLE t{i} (id int PRIMARY KEY, v text, ts timestamptz DEFAULT now()); "
                             f"INSERT INTO t{i} (id, v) SELECT g, 'x' || g FROM generate_series(1, 100) g;"
                             for i in range(args.tables)))
            what = f"{args.tables} tables of 100 rows"
        elif args.indexed:
            src.psql("".join(f"CREATE TABLE w{i} (id int PRIMARY KEY, a int, b text, c timestamptz DEFAULT now()); "
                             f"INSERT INTO w{i} (id, a, b) SELECT g, (g::bigint * 7919) % 100003, md5(g::text) "
                             f"FROM generate_series(1, 600000) g; "
                             f"CREATE INDEX w{i}_a ON w{i} (a); CREATE INDEX w{i}_b ON w{i} (b);"
                             for i in range(args.indexed)))
            what = f"{args.indexed} tables of 600,000 rows with 3 indexes each"
        else:
            subprocess.run([str(find_bindir(18) / "pgbench"), "-i", "-s", str(args.scale), "-q", "-d", src.dsn],
                           check=True, capture_output=True)
            src.psql(TYPED)
            what = f"pgbench scale {args.scale} + typed table"
        (size,) = src.execute("SELECT pg_database_size(current_database())")[0]
        runs: dict[str, list[float]] = {"ours": [], "recipe": [], "full": []}
        ways = [(pgferry_copy, "ours"), (recipe_copy, "recipe"), (full_dump_copy, "full")]
        for repeat in range(args.repeats):
            # each run starts from a clean checkpoint, so no run pays for the previous one's WAL; the
            # order rotates, since the first of a round ran ~0.04 s slower (bench/README.md)
            for run, name in ways[repeat % 3:] + ways[:repeat % 3]:
                dst = new_db(t, name)
                src.execute("CHECKPOINT")
                dst.execute("CHECKPOINT")
                runs[name].append(run(src, dst, args.jobs))
                # Every run starts from the same target server: without the drop, the copies pile up
                # (330 MB each at scale 20), and on this VM later runs of the same copy took up to
                # twice as long (see bench/README.md, "Each run into the same empty server").
                dst.drop()
        a, b, c = (statistics.median(runs[k]) for k in ("ours", "recipe", "full"))
        print(f"source: {what}, {size / 1e6:.0f} MB; PG15 -> PG18; "
              f"medians of {args.repeats} alternating runs")
        for label, name, took in ((f"pgferry initial sync (--jobs {args.jobs})", "ours", a),
                                  ("pg_dump --schema-only | psql; pg_dump --data-only | psql", "recipe", b),
                                  ("pg_dump | psql (indexes after the data)", "full", c)):
            each = " ".join(f"{x:.2f}" for x in runs[name])
            print(f"  {label:58} {took:6.2f} s {size / 1e6 / took:7.1f} MB/s   runs: {each}")
        print(f"ratio recipe (--data-only into the schema) / pgferry: {b / a:.2f}x   (goal 1.5x)")
        print(f"ratio plain pg_dump | psql / pgferry:                 {c / a:.2f}x")


if __name__ == "__main__":
    main()
