"""The write downtime of a cutover as the database grows: `--verify online` against `--verify checksum`.

    python -m bench.cutover_verify [--scales 5,50] [--rate 300]

For each scale, one PostgreSQL 15 source with `pgbench -i -s SCALE`, migrated twice into fresh
PostgreSQL 18 databases owned by a non-superuser role (pgferry start: copy, then stream), each time
under a steady pgbench load (4 clients, --rate transactions per second: the same traffic whatever
the size) and then cut over: once with `--verify online` (every row compared while streaming, only
the rows changed since compared under the fence), once with `--verify checksum` (every row compared
under the fence). The receipts give the write downtime (fence to the end) and its steps. Between
the two runs `pgferry cleanup` lifts the fence and drops the slot. Durable servers (fsync and
full_page_writes on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.catchup import DURABLE, PGBENCH, _target_db, cli, start_streaming
from replicator.local.servers import LocalServer
from tests.pgplugin import Db, new_db


def _one(src: Db, tgt: LocalServer, mode: str, rate: int, run: str) -> dict:
    dst = _target_db(tgt, "dst", "owner")
    conn = ["--source", src.dsn, "--target", dst.dsn, "--slot", f"cv_{run}"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "daemon.log"
        d = start_streaming(conn, log, 1800)
        bench = subprocess.Popen([PGBENCH, "-c", "4", "-j", "2", "-R", str(rate), "-T", "3600", "-n", "-d", src.dsn],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        lags: list[int] = []
        done = threading.Event()

        def watch() -> None:  # the daemon's lag while the cutover (and its online comparison) runs
            while not done.wait(1.0):
                st = cli("status", "--json", *conn)
                if st.returncode == 0:
                    lags.append(int(json.loads(st.stdout).get("lag_bytes") or 0))

        try:
            time.sleep(5)  # the load settles (the daemon streams it meanwhile)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            r = cli("cutover", "--verify", mode, "--timeout", "600", *conn)
        finally:
            done.set()
            bench.kill()
            bench.wait()
        d.wait(120)
        if r.returncode != 0:
            raise RuntimeError(r.stdout[-2000:] + r.stderr[-3000:] + log.read_text()[-2000:])
        cli("cleanup", *conn, check=True)  # the fence goes, and the slot: the next run starts afresh
    receipt = json.loads(r.stdout)
    steps = receipt.get("steps_s", {})
    return {"downtime": receipt["write_downtime_s"],
            "verify": round(sum(v for k, v in steps.items() if "verif" in k or "reading the changes" in k), 3),
            "online": (receipt.get("online_verify") or {}).get("took_s"),
            "keys": (receipt.get("changes_verified") or {}).get("keys"), "steps": steps,
            "compare_s": (receipt.get("changes_verified") or {}).get("compare_s"),
            "max_lag": max(lags, default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", default="5,50")
    ap.add_argument("--rate", type=int, default=300, help="pgbench transactions per second during each run")
    ap.add_argument("--repeats", type=int, default=1, help="runs of --verify online per scale (medians)")
    args = ap.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    results: dict[tuple[int, str], list[dict]] = {}
    with LocalServer(15, name="cv-src-", settings=DURABLE) as s, LocalServer(18, name="cv-tgt-",
                                                                              settings=DURABLE) as t:
        sources = {}
        for scale in scales:
            sources[scale] = src = new_db(s, "src")
            subprocess.run([PGBENCH, "-i", "-s", str(scale), "-q", "-d", src.dsn], check=True, capture_output=True)
        runs = [(scale, "checksum") for scale in scales] + [(scale, "online") for _ in range(args.repeats)
                                                             for scale in scales]  # the scales side by side
        for i, (scale, mode) in enumerate(runs):
            started = time.monotonic()
            res = _one(sources[scale], t, mode, args.rate, f"{scale}_{mode}_{i}")
            results.setdefault((scale, mode), []).append(res)
            print(f"scale {scale:>3} --verify {mode:8}: write downtime {res['downtime']:.3f} s, of which "
                  f"verify {res['verify']:.3f} s; online comparison {res['online']} s, changed keys "
                  f"{res['keys']}; the daemon's lag at most {res['max_lag'] / 1e6:.1f} MB (run "
                  f"{time.monotonic() - started:.0f} s); steps {res['steps']}; tables "
                  f"{res['compare_s']}", flush=True)

    def med(scale: int, mode: str, k: str) -> float:
        return statistics.median(r[k] for r in results[(scale, mode)])

    print(f"\npgbench 15 -> 18, owner-only target, load {args.rate} tps (4 clients), durable servers; "
          f"medians of {args.repeats} online run(s)")
    print(f"{'scale':>6} {'online: downtime':>17} {'verify':>8} {'max lag':>8} {'checksum: downtime':>19} "
          f"{'verify':>8}")
    for scale in scales:
        print(f"{scale:>6} {med(scale, 'online', 'downtime'):>15.3f} s {med(scale, 'online', 'verify'):>6.3f} s "
              f"{med(scale, 'online', 'max_lag') / 1e6:>5.1f} MB {med(scale, 'checksum', 'downtime'):>17.3f} s "
              f"{med(scale, 'checksum', 'verify'):>6.3f} s")
    if len(scales) >= 2:
        a, b = med(scales[0], "online", "downtime"), med(scales[-1], "online", "downtime")
        print(f"online: scale {scales[-1]} / scale {scales[0]} write downtime = {b / a:.2f}")


if __name__ == "__main__":
    main()
