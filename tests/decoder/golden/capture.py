"""Capture the golden byte streams from real PostgreSQL servers.

    python -m tests.decoder.golden.capture            # PostgreSQL 15 and 18

Writes tests/decoder/golden/data/pg<major>-<scenario>-<read>.bin.gz: the gzipped CopyData payloads of one
START_REPLICATION, each as a 4-byte big-endian length and the bytes, exactly as received
(XLogData envelopes and keepalives included); and a .json beside it with the server version,
the pgoutput options and the end LSN. The slot is never confirmed, so each read of a scenario
replays the same WAL with other options.
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
from pathlib import Path

from decoder import Lsn
from replicator.local.servers import LocalServer
from tests.decoder.golden.scenarios import SCENARIOS, read_options
from tests.rawrepl import RawReplication

DATA = Path(__file__).parent / "data"


def capture(version: int) -> None:
    with LocalServer(version, settings={"logical_decoding_work_mem": "64kB"}) as server:
        for scenario, (setup, workload) in SCENARIOS.items():
            db = f"golden_{scenario}"
            server.psql(f"CREATE DATABASE {db}")
            server.psql(setup, db)
            repl = RawReplication(server.host, server.port, server.user, db)
            opts = " (TWO_PHASE)" if scenario == "twophase" else ""
            repl.query(f"CREATE_REPLICATION_SLOT golden_{scenario} LOGICAL pgoutput{opts}")
            for batch in workload:
                server.psql(batch, db)
            until = Lsn.parse(server.psql("SELECT pg_logical_emit_message(false, 'capture-end', '')", db).strip())
            num = int(server.psql("SHOW server_version_num", db).strip())
            for name, options in read_options(version, scenario):
                frames = repl.stream(f"golden_{scenario}", options, until)
                repl.close()
                repl = RawReplication(server.host, server.port, server.user, db)
                stem = DATA / f"pg{version}-{scenario}-{name}"
                packed = b"".join(struct.pack(">I", len(f)) + f for f in frames)
                stem.with_suffix(".bin.gz").write_bytes(gzip.compress(packed, 9, mtime=0))
                stem.with_suffix(".json").write_text(json.dumps(
                    {"server_version_num": num, "scenario": scenario, "options": options, "until": str(until)},
                    indent=1) + "\n")
                print(f"{stem.name}: {len(frames)} frames", flush=True)
            repl.close()


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for v in [int(a) for a in sys.argv[1:]] or [15, 18]:
        capture(v)


if __name__ == "__main__":
    main()
