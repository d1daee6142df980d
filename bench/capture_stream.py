"""Capture the decoder benchmark's stream: >100,000 changes (inserts, updates, deletes of three
tables, in transactions of 1 to 1,000 rows) from a real PostgreSQL 18 server, text mode.

    python -m bench.capture_stream     # writes bench/data/stream-pg18.bin.gz
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from decoder import Lsn
from replicator.local.servers import LocalServer
from tests.rawrepl import RawReplication

OUT = Path(__file__).parent / "data" / "stream-pg18.bin.gz"

SETUP = """
CREATE TABLE accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
CREATE TABLE history (hid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tid int, bid int, aid int,
                      delta int, mtime timestamptz, filler char(22));
CREATE TABLE items (id uuid PRIMARY KEY, name text, price numeric(10, 2), tags text[], data jsonb);
CREATE PUBLICATION bench_pub FOR ALL TABLES;
"""

WORKLOAD = [
    # 40,000 inserts in 40 transactions of 1,000
    *[f"INSERT INTO accounts SELECT g, g % 10, 0, '' FROM generate_series({i * 1000 + 1}, {(i + 1) * 1000}) g;"
      for i in range(40)],
    # 10,000 single-row transactions touching two tables (OLTP-like): 20,000 changes
    """DO $$ BEGIN FOR i IN 1..10000 LOOP
         UPDATE accounts SET abalance = abalance + i WHERE aid = i;
         INSERT INTO history (tid, bid, aid, delta, mtime) VALUES (i % 10, i % 10, i, i, now());
         COMMIT; END LOOP; END $$;""",
    "INSERT INTO items SELECT gen_random_uuid(), 'item ' || g, g / 7.0, ARRAY['a', 'b'], "
    "jsonb_build_object('n', g) FROM generate_series(1, 20000) g;",
    "UPDATE accounts SET abalance = abalance - 1 WHERE aid <= 20000;",
    "DELETE FROM history WHERE hid % 2 = 0;",
    "DELETE FROM items WHERE price > 2000;",
]


def main() -> None:
    with LocalServer(18) as server:
        server.psql("CREATE DATABASE bench")
        server.psql(SETUP, "bench")
        repl = RawReplication(server.host, server.port, server.user, "bench")
        repl.query("CREATE_REPLICATION_SLOT bench LOGICAL pgoutput")
        for sql in WORKLOAD:
            server.psql(sql, "bench")
        until = Lsn.parse(server.psql("SELECT pg_logical_emit_message(false, 'end', '')", "bench").strip())
        frames = repl.stream("bench", {"proto_version": "4", "publication_names": "bench_pub",
                                       "messages": "true"}, until, timeout=300)
        repl.close()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_bytes(gzip.compress(b"".join(struct.pack(">I", len(f)) + f for f in frames), 9, mtime=0))
    print(f"{OUT}: {len(frames)} frames")


if __name__ == "__main__":
    main()
