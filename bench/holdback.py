"""What holding back foreign keys costs the cutover: an owner-only target against a superuser one.

    python -m bench.holdback [--scale 10] [--repeats 3]

pgbench's tables with their foreign keys (`pgbench -i --foreign-keys`) on a PostgreSQL 15 source;
pgferry copies them (schema and data) into PostgreSQL 18, once with a target role that only owns
its database (the foreign keys are held back and created at cutover) and once as a superuser (they
are created after the copy and never fire: the replica role). Each then cuts over (`--verify
count`) and the receipts give the write downtime, the time to create what was held back (inside
the downtime) and to validate the foreign keys (after it, while the application may write).
Durable servers (fsync and full_page_writes on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.catchup import DURABLE, PGBENCH, _target_db, cli, start_streaming
from replicator.local.servers import LocalServer
from tests.pgplugin import new_db


def _one(src_server: LocalServer, tgt: LocalServer, scale: int, role: str, run: int) -> dict:
    src = new_db(src_server, "src")
    conn = ["--source", src.dsn, "--target", None, "--slot", f"hb_{role}_{run}"]  # slots are per cluster
    subprocess.run([PGBENCH, "-i", "-s", str(scale), "-q", "--foreign-keys", "-d", src.dsn], check=True,
                   capture_output=True)
    dst = _target_db(tgt, "dst", role)
    conn[3] = dst.dsn
    with tempfile.TemporaryDirectory() as tmp:
        d = start_streaming(conn, Path(tmp) / "daemon.log", 600)
        r = cli("cutover", "--verify", "count", *conn)
        d.wait(60)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        cli("cleanup", *conn, check=True)  # the slot would hold the next runs' WAL
    receipt = json.loads(r.stdout)
    return {"downtime": receipt["write_downtime_s"], "created": receipt.get("held_back_created_s", 0.0),
            "validated": receipt.get("constraints_validated_s", 0.0),
            "held": len(receipt.get("held_back", []))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"owner": [], "superuser": []}
    with LocalServer(15, name="hb-src-", settings=DURABLE) as s, LocalServer(18, name="hb-tgt-",
                                                                              settings=DURABLE) as t:
        for run in range(args.repeats):
            for role in runs:  # side by side, alternating
                runs[role].append(_one(s, t, args.scale, role, run))
    print(f"pgbench scale {args.scale} with foreign keys, 15 -> 18, cutover --verify count, {args.repeats} runs "
          "(medians; runs in brackets)")
    for role, rs in runs.items():
        cols = {k: [r[k] for r in rs] for k in ("downtime", "created", "validated")}
        print(f"  {role:9} held back {rs[0]['held']}: write downtime {statistics.median(cols['downtime']):.3f} s "
              f"[{' '.join(f'{v:.3f}' for v in cols['downtime'])}], creating them "
              f"{statistics.median(cols['created']):.3f} s, validating (after) "
              f"{statistics.median(cols['validated']):.3f} s")


if __name__ == "__main__":
    main()
