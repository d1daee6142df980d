"""`pgferry verify --online` on a big database under load: 0 differences, then the rows changed behind
pgferry's back named, and what the comparison costs the daemon.

    python -m bench.verify_online [--scale 50] [--rate 300]

A PostgreSQL 15 source with `pgbench -i -s SCALE`, migrated by pgferry into PostgreSQL 18 owned by
a non-superuser role, under a steady pgbench load (4 clients at --rate transactions per second).
Then `verify --online` twice at the default rate: once as it is, once after a row of
pgbench_accounts was changed, one deleted and one inserted on the target behind pgferry's back.
Prints each verify's time, how long the daemon was held, the daemon's largest lag meanwhile
(`status`, once a second) and the rows named. Durable servers (fsync and full_page_writes on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.catchup import DURABLE, PGBENCH, _target_db, cli, start_streaming
from replicator.local.servers import LocalServer
from tests.pgplugin import new_db


def _verify(conn: list[str]) -> tuple[dict, float, int]:
    lags: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            st = cli("status", "--json", *conn)
            if st.returncode == 0:
                lags.append(int(json.loads(st.stdout).get("lag_bytes") or 0))

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    started = time.monotonic()
    r = cli("verify", "--online", "--json", "--timeout", "300", *conn)
    took = time.monotonic() - started
    done.set()
    if r.returncode not in (0, 1):
        raise RuntimeError(r.stdout + r.stderr)
    return json.loads(r.stdout), took, max(lags, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=50)
    ap.add_argument("--rate", type=int, default=300)
    args = ap.parse_args()
    with LocalServer(15, name="vo-src-", settings=DURABLE) as s, LocalServer(18, name="vo-tgt-",
                                                                              settings=DURABLE) as t:
        src = new_db(s, "src")
        subprocess.run([PGBENCH, "-i", "-s", str(args.scale), "-q", "-d", src.dsn], check=True, capture_output=True)
        dst = _target_db(t, "dst", "owner")
        conn = ["--source", src.dsn, "--target", dst.dsn]
        with tempfile.TemporaryDirectory() as tmp:
            d = start_streaming(conn, Path(tmp) / "daemon.log", 3600)
            try:
                bench = subprocess.Popen([PGBENCH, "-c", "4", "-j", "2", "-R", str(args.rate), "-T", "3600", "-n",
                                          "-d", src.dsn], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
                try:
                    time.sleep(5)
                    res, took, lag = _verify(conn)
                    print(f"scale {args.scale}, {args.rate} tps: verify --online {took:.1f} s, ok {res['ok']}, the "
                          f"daemon held {res['held_s']} s, source snapshot {res['snapshot_age_s']} s, the daemon's "
                          f"lag at most {lag / 1e6:.1f} MB", flush=True)
                    top = args.scale * 100_000
                    dst.execute(f"UPDATE pgbench_accounts SET filler = 'behind its back' WHERE aid = {top}; "
                                f"DELETE FROM pgbench_accounts WHERE aid = {top - 1}; "
                                f"INSERT INTO pgbench_accounts VALUES ({top + 1}, 1, 0, '')")
                    res, took, lag = _verify(conn)
                    named = [line for tb in res["tables"] for line in tb["differences"] if line.startswith("row ")]
                    print(f"after 3 rows changed on the target: verify --online {took:.1f} s, ok {res['ok']}, the "
                          f"daemon's lag at most {lag / 1e6:.1f} MB; named: {named}", flush=True)
                finally:
                    bench.kill()
                    bench.wait()
            finally:
                d.terminate()
                d.wait(60)


if __name__ == "__main__":
    main()
