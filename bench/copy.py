"""Initial copy: pgferry's copy against the usual recipe (`pg_dump | psql`), same data, one run.

    python -m bench.copy [--scale 20] [--repeats 2]

Starts a PostgreSQL 15 source and an 18 target (the main real-world case), loads `pgbench -i -s
SCALE` plus a table of many types, then alternates, each into a fresh target database:

* pgferry: `InitialSync` — schema pre-data, the parallel COPY source -> target (binary where the
  types allow), sequences, post-data (indexes and constraints after the data);
* recipe: `pg_dump -d SOURCE | psql -d TARGET` (plain format: schema, data via COPY text, then
  indexes and constraints), which is what `pg_dump --schema-only` + `--data-only` amounts to.

Prints both times and the ratio. Both include creating the indexes.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import time

from replicator.servers import LocalServer, find_bindir
from replicator.sync import InitialSync, SyncConfig, find_pg_dump
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


def recipe_copy(src: Db, dst: Db, jobs: int) -> float:  # one stream: that is the recipe
    psql = str(dst.server.client_bindir / "psql")
    t = time.perf_counter()
    dump = subprocess.Popen([find_pg_dump(), "--no-owner", "--no-privileges", "-d", src.dsn], stdout=subprocess.PIPE)
    subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dst.dsn], stdin=dump.stdout, check=True,
                   stdout=subprocess.DEVNULL)
    assert dump.wait() == 0
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    with LocalServer(15, name="bench-src-") as s, LocalServer(18, name="bench-dst-") as t:
        src = new_db(s, "src")
        subprocess.run([str(find_bindir(18) / "pgbench"), "-i", "-s", str(args.scale), "-q", "-d", src.dsn],
                       check=True, capture_output=True)
        src.psql(TYPED)
        (size,) = src.execute("SELECT pg_database_size(current_database())")[0]
        ours, theirs = [], []
        for _ in range(args.repeats):
            # each run starts from a clean checkpoint, so no run pays for the previous one's WAL
            for run, dst, into in ((pgferry_copy, new_db(t, "ours"), ours), (recipe_copy, new_db(t, "recipe"), theirs)):
                src.execute("CHECKPOINT")
                dst.execute("CHECKPOINT")
                into.append(run(src, dst, args.jobs))
        a, b = min(ours), min(theirs)
        print(f"source: pgbench scale {args.scale} + typed table, {size / 1e6:.0f} MB; PG15 -> PG18; "
              f"best of {args.repeats} alternating runs")
        print(f"  pgferry initial sync (--jobs {args.jobs})  {a:7.2f} s  {size / 1e6 / a:7.1f} MB/s")
        print(f"  pg_dump | psql                   {b:7.2f} s  {size / 1e6 / b:7.1f} MB/s")
        print(f"ratio recipe / pgferry time: {b / a:.2f}x")


if __name__ == "__main__":
    main()
