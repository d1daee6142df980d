"""Catch-up: pgferry against native `CREATE SUBSCRIPTION` on the same backlog, side by side.

    python -m bench.catchup [--pairs 15-18,18-18] [--scenarios bulk,oltp,hot] [--scale 1.0] [--repeats 3]
                            [--target-role owner,superuser] [--delay-ms 1] [--no-durable]

For each source -> target pair and scenario:

1. the same tables and starting rows on the source and on two target databases;
2. three slots created at the same moment: one for a native subscription (created disabled on
   the first target database), one for pgferry (the second), one for a reader that discards;
3. the backlog is written on the source (not timed) and its end LSN taken;
4. one at a time, each consumer is started and timed until its slot's `confirmed_flush_lsn`
   reaches the end LSN (native: `ALTER SUBSCRIPTION ... ENABLE`; pgferry: `pgferry start
   --no-copy` as a subprocess, its peak RSS read from /proc; ceiling: a psycopg2 loop that reads
   the slot and drops every message, confirming at the end);
5. both targets are compared with the source (ordered per-row checksums).

Scenarios (`--scale` multiplies the sizes):
* bulk: 1,000,000 rows inserted in 100 transactions;
* oltp: pgbench tpcb-like at pgbench scale 10, 100,000 transactions (4 clients); oltp1: the same at
  scale 1, where every transaction updates the same branch row (it folds far better than real
  traffic);
* hot: 20,000 rows, each updated 25 times, one row per transaction (500,000 transactions);
* full: 50,000 one-row updates of a REPLICA IDENTITY FULL table (20,000 rows, an index on id):
  what pgferry applies change by change.

The servers run as production does (fsync and full_page_writes on; `--no-durable` turns them off).
`--target-role`: pgferry's target role, `owner` (owns the target database only: no superuser, no
SET on session_replication_role, as on a managed service) or `superuser`; a list times each on the
same backlog. Native apply always runs as a superuser (CREATE SUBSCRIPTION). `--delay-ms D`: a
proxy delays every byte D ms each way between pgferry and the target, and between native's apply
worker and the source (bench/delayproxy.py): each consumer gets the same link to its remote server.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extras

from bench.delayproxy import DelayProxy
from replicator.local.servers import LocalServer, find_bindir
from replicator.source import max_protocol_version
from tests.pgplugin import Db, new_db, table_digest

ROOT = Path(__file__).resolve().parent.parent
PGBENCH = str(find_bindir(18) / "pgbench")
PUB = "bench_pub"
# The discarding reader's pause when the socket drains. pgferry pauses no more (at its default
# nice 10, replicator/stream/session.py); a reader that does nothing gets the most from the walsender when it lets the
# socket fill up (hot backlog: 3.5 s with 0.5 ms, 4.1-5.1 s with 0.1 ms).
CEILING_PAUSE = 0.0005
DURABLE = {"fsync": "on", "full_page_writes": "on"}  # as production runs (the test servers turn them off)


@dataclass
class Scenario:
    name: str
    schema: str  # DDL + starting rows, run on the source and both targets
    tables: dict[str, list[str]]  # for the comparison
    backlog: Callable[[Db, float], int]  # writes the backlog; returns its row changes


# The backlog is written with asynchronous commits: the same WAL, without one flush per source
# transaction (500,000 of them would take many minutes on a durable server). Not timed.
QUICK_COMMITS = "PERFORM set_config('synchronous_commit', 'off', false);"


def _bulk_backlog(src: Db, scale: float) -> int:
    txns, per = max(1, int(100 * scale)), 10_000
    src.execute(f"""DO $$ BEGIN {QUICK_COMMITS} FOR k IN 0..{txns - 1} LOOP
        INSERT INTO bulk SELECT g, g % 1000, md5(g::text), '2026-01-01'::timestamptz + g * interval '1 s'
        FROM generate_series(k * {per} + 1, (k + 1) * {per}) g; COMMIT; END LOOP; END $$""")
    return txns * per


def _hot_backlog(src: Db, scale: float) -> int:
    n = max(1, int(500_000 * scale))
    src.execute(f"DO $$ BEGIN {QUICK_COMMITS} FOR i IN 0..{n - 1} LOOP UPDATE hot SET v = v + 1, t = 'u' || i "
                f"WHERE id = i % 20000 + 1; COMMIT; END LOOP; END $$")
    return n


def _full_backlog(src: Db, scale: float) -> int:
    n = max(1, int(50_000 * scale))
    src.execute(f"DO $$ BEGIN {QUICK_COMMITS} FOR i IN 0..{n - 1} LOOP UPDATE fullid SET v = v + 1, t = 'u' || i "
                f"WHERE id = i % 20000 + 1; COMMIT; END LOOP; END $$")
    return n


def _oltp_backlog(src: Db, scale: float) -> int:
    per_client = max(1, int(25_000 * scale))
    subprocess.run([PGBENCH, "-n", "-c", "4", "-j", "2", "-t", str(per_client), "-b", "tpcb-like", "-d", src.dsn],
                   check=True, capture_output=True, env={**os.environ, "PGOPTIONS": "-c synchronous_commit=off"})
    return 4 * per_client * 4  # 3 updates and 1 insert per transaction


PGBENCH_TABLES = {"pgbench_accounts": ["aid", "bid", "abalance", "filler"],
                  "pgbench_branches": ["bid", "bbalance", "filler"],
                  "pgbench_tellers": ["tid", "bid", "tbalance", "filler"],
                  "pgbench_history": ["tid", "bid", "aid", "delta", "mtime", "filler"]}
SCENARIOS = {
    "bulk": Scenario("bulk", "CREATE TABLE bulk (id bigint PRIMARY KEY, a int, b text, c timestamptz)",
                     {"bulk": ["id", "a", "b", "c"]}, _bulk_backlog),
    "oltp": Scenario("oltp", "10", PGBENCH_TABLES, _oltp_backlog),  # schema: pgbench's scale
    "oltp1": Scenario("oltp1", "1", PGBENCH_TABLES, _oltp_backlog),
    "hot": Scenario("hot", "CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL, t text);"
                           "INSERT INTO hot SELECT g, 0, 'start' FROM generate_series(1, 20000) g",
                    {"hot": ["id", "v", "t"]}, _hot_backlog),
    "full": Scenario("full", "CREATE TABLE fullid (id int NOT NULL, v int NOT NULL, t text);"
                             "CREATE INDEX ON fullid (id); ALTER TABLE fullid REPLICA IDENTITY FULL;"
                             "INSERT INTO fullid SELECT g, 0, 'start' FROM generate_series(1, 20000) g",
                     {"fullid": ["id", "v", "t"]}, _full_backlog),
}


def _prepare(db: Db, sc: Scenario) -> None:
    if sc.name.startswith("oltp"):  # pgbench's initial data is deterministic: the same on every side
        subprocess.run([PGBENCH, "-i", "-s", sc.schema, "-q", "-d", db.dsn], check=True, capture_output=True)
        db.execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
    else:
        db.psql(sc.schema)


def _target_db(server: LocalServer, prefix: str, role: str) -> Db:
    """A fresh target database; `role` owner: pgferry's role owns it and nothing else."""
    db = new_db(server, prefix)
    if role == "superuser":
        return db
    name = f"owner_{db.name}"
    admin = Db(server, "postgres")
    admin.execute(f"CREATE ROLE {name} LOGIN")
    admin.execute(f"ALTER DATABASE {db.name} OWNER TO {name}")
    return Db(server, db.name, user=name)


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """This checkout's `pgferry ARGS`, its output captured."""
    return subprocess.run([sys.executable, "-m", "replicator.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check)


def start_streaming(conn: list[str], log: Path, timeout: float) -> subprocess.Popen:
    """`pgferry start CONN` (its output into `log`), once `status` says it streams."""
    out = open(log, "w")
    d = subprocess.Popen([sys.executable, "-m", "replicator.cli", "start", *conn], cwd=ROOT, stdout=out, stderr=out)
    deadline = time.monotonic() + timeout
    while True:
        r = cli("status", "--json", *conn)
        if r.returncode == 0 and json.loads(r.stdout)["phase"] == "streaming":
            return d
        if d.poll() is not None or time.monotonic() > deadline:
            d.kill()
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.2)


def _confirmed(src: Db, slot: str) -> int:
    (lsn,) = src.execute("SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots "
                         "WHERE slot_name = %s", (slot,))[0]
    return int(lsn)


def _wait_confirmed(src: Db, slot: str, end: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> float:
    started = time.perf_counter()
    while _confirmed(src, slot) < end:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"slot {slot} did not reach the end LSN within {timeout:.0f} s")
        if not alive():
            raise RuntimeError(f"the consumer of slot {slot} exited")
        time.sleep(0.02)
    return time.perf_counter()


WALSENDER: dict[str, float] = {}  # slot -> CPU s of its walsender when the run ended


def run_native(src: Db, dst: Db, end: int, timeout: float, slot: str = "bench_native") -> float:
    """(`dst` holds the subscription: its connection to the source, through a delay proxy or not.)"""
    t = time.perf_counter()
    dst.execute("ALTER SUBSCRIPTION bench_sub ENABLE")
    done = _wait_confirmed(src, slot, end, timeout)
    WALSENDER[slot] = _walsender_cpu(src, slot)
    dst.execute("ALTER SUBSCRIPTION bench_sub DISABLE")
    return done - t


def run_pgferry(src: Db, dst: Db, end: int, timeout: float, extra: list[str],
                profile: Path | None = None, slot: str = "bench_pgferry",
                link: DelayProxy | None = None) -> tuple[float, int, float]:
    target = link.dsn_for(dst.dsn) if link is not None else dst.dsn
    cmd = [sys.executable, "-m", "replicator.cli", "start", "--source", src.dsn, "--target", target, "--no-copy",
           "--slot", slot, "--publication", PUB, *extra]
    if profile is not None:
        cmd = ["py-spy", "record", "--rate", "250", "--format", "raw", "--output", str(profile), "--", *cmd]
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        # in its own session, as a service runs: its nice value then counts against the servers'
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            done = _wait_confirmed(src, slot, end, timeout, lambda: proc.poll() is None)
            daemon = _daemon_pid(proc.pid) if profile is not None else proc.pid
            rss = _peak_rss_kb(daemon)
            cpu = _cpu_seconds(daemon)
            WALSENDER[slot] = _walsender_cpu(src, slot)
        except RuntimeError:
            proc.kill()
            err.seek(0)
            print(err.read()[-3000:], file=sys.stderr)
            raise
        os.kill(daemon, signal.SIGTERM)  # under py-spy: it writes the profile when the daemon exits
        proc.wait(timeout=60)
    return done - t, rss, cpu


def _walsender_cpu(src: Db, slot: str) -> float:
    """CPU seconds of the walsender serving `slot` so far (its consumer is still connected)."""
    rows = src.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    if not rows or rows[0][0] is None:
        return float("nan")
    try:
        return _cpu_seconds(int(rows[0][0]))
    except OSError:
        return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_pid(pid: int) -> int:
    """The pgferry process under py-spy (py-spy's child)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def top_costs(profile: Path, n: int = 15) -> list[tuple[float, str]]:
    """Self time per function from a py-spy raw (collapsed stacks) profile, biggest first."""
    own: dict[str, int] = {}
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + int(count)
        total += int(count)
    return [(c / max(total, 1), f) for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_ceiling(src: Db, end: int, timeout: float, slot: str = "bench_ceiling") -> float:
    """Read the backlog from the slot and discard it: what the source can send at most. Same
    options as pgferry's loop; a short pause when the socket drains (CEILING_PAUSE)."""
    t = time.perf_counter()
    conn = psycopg2.connect(src.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = conn.cursor()
    proto = min(max_protocol_version(conn.server_version), 4)
    cur.start_replication(slot_name=slot, decode=False,
                          options={"proto_version": str(proto), "publication_names": PUB, "messages": "true",
                                   "streaming": "on"})
    read = cur.read_message
    while True:
        msg = read()
        if msg is None:
            if cur.wal_end >= end:
                break
            if time.perf_counter() - t > timeout:
                raise RuntimeError("the discarding reader did not reach the end LSN")
            time.sleep(CEILING_PAUSE)
            if read() is None:
                select.select([conn], [], [], 0.1)
            continue
        if msg.data_start >= end:
            break
    took = time.perf_counter() - t
    WALSENDER[slot] = _walsender_cpu(src, slot)
    cur.send_feedback(flush_lsn=end, force=True)
    conn.close()
    return took


def run_scenario(s: LocalServer, tgt: LocalServer, sc: Scenario, scale: float, extra: list[str],
                 profile: Path | None = None, repeats: int = 1, also: list[list[str]] | None = None,
                 roles: tuple[str, ...] = ("owner",), delay_ms: float = 0.0) -> dict:
    """Time native, pgferry and the ceiling on one backlog, `repeats` times each, alternating
    (each run has its own slot, all created before the backlog, and its own target database).
    `also`: more pgferry flag sets, timed the same way (consumers "also1", "also2"...); `roles`:
    pgferry's target role (the first), then more roles timed the same way ("as_superuser"...);
    `delay_ms`: one-way delay on each consumer's link to its remote server."""
    also = also or []
    variants = {f"also{n + 1}": (flags, roles[0]) for n, flags in enumerate(also)}
    variants.update({f"as_{role}": (extra, role) for role in roles[1:]})
    src = new_db(s, "src")
    _prepare(src, sc)
    src.execute(f"CREATE PUBLICATION {PUB} FOR ALL TABLES")
    to_source = DelayProxy(s.host, s.port, delay_ms) if delay_ms else None
    to_target = DelayProxy(tgt.host, tgt.port, delay_ms) if delay_ms else None
    natives, ours = [], []
    theirs: dict[tuple[str, int], Db] = {}
    for i in range(repeats):
        for kind in ("native", "pgferry", "ceiling", *variants):
            src.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"bench_{kind}{i}",))
        native, mine = new_db(tgt, "native"), _target_db(tgt, "ours", roles[0])
        for kind, (_, role) in variants.items():
            theirs[kind, i] = _target_db(tgt, kind, role)
            _prepare(theirs[kind, i], sc)
        for db in (native, mine):
            _prepare(db, sc)
        conninfo = to_source.dsn_for(src.dsn) if to_source is not None else src.dsn
        native.execute(f"CREATE SUBSCRIPTION bench_sub CONNECTION '{conninfo}' PUBLICATION {PUB} WITH ("
                       f"enabled = false, create_slot = false, slot_name = 'bench_native{i}', copy_data = false)")
        natives.append(native)
        ours.append(mine)
    t = time.perf_counter()
    changes = sc.backlog(src, scale)
    (end,) = src.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint")[0]
    gen = time.perf_counter() - t
    (wal,) = src.execute("SELECT pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn) FROM pg_replication_slots "
                         "WHERE slot_name = 'bench_native0'")[0]
    timeout = 600
    times: dict[str, list[float]] = {"native": [], "pgferry": [], "ceiling": [], **{k: [] for k in variants}}
    rss, cpu = [], []
    for i in range(repeats):
        for db in (src, natives[i], ours[i]):
            db.as_superuser.execute("CHECKPOINT")
        times["native"].append(run_native(src, natives[i], end, timeout, f"bench_native{i}"))
        took, kb, secs = run_pgferry(src, ours[i], end, timeout, extra, profile if i == 0 else None,
                                     f"bench_pgferry{i}", to_target)
        times["pgferry"].append(took)
        rss.append(kb)
        cpu.append(secs)
        times["ceiling"].append(run_ceiling(src, end, timeout, f"bench_ceiling{i}"))
        for kind, (flags, _) in variants.items():
            theirs[kind, i].as_superuser.execute("CHECKPOINT")
            times[kind].append(run_pgferry(src, theirs[kind, i], end, timeout, flags, None, f"bench_{kind}{i}",
                                           to_target)[0])
    same = all(table_digest(src, name, cols) == table_digest(db, name, cols)
               for name, cols in sc.tables.items() for db in (*natives, *ours, *theirs.values()))
    for i in range(repeats):
        natives[i].execute("DROP SUBSCRIPTION bench_sub")
        for kind in ("pgferry", "ceiling", *variants):
            src.execute("SELECT pg_drop_replication_slot(%s)", (f"bench_{kind}{i}",))
    for proxy in (to_source, to_target):
        if proxy is not None:
            proxy.close()
    res = {"scenario": sc.name, "changes": changes, "wal": wal, "generate_s": gen, "repeats": repeats,
           "role": roles[0], "delay_ms": delay_ms,
           "also": {kind: " ".join(flags) + f" (target role {role})" for kind, (flags, role) in variants.items()},
           "rss_mb": max(rss) / 1024, "cpu_s": statistics.median(cpu), "same": same, "times": times,
           "walsender": {kind: statistics.median(WALSENDER.get(f"bench_{kind}{i}", float("nan"))
                                                 for i in range(repeats)) for kind in times}}
    for kind, values in times.items():
        res[f"{kind}_s"] = statistics.median(values)
    return res


def run_steady(s: LocalServer, tgt: LocalServer, rate: int, seconds: int, extra: list[str]) -> dict:
    """pgbench at a fixed rate with native and pgferry both subscribed (same load, same time):
    the lag of each slot, sampled every 0.5 s. Keeping up = the lag stays bounded."""
    sc = SCENARIOS["oltp"]
    src, native, ours = new_db(s, "src"), new_db(tgt, "native"), new_db(tgt, "ours")
    for db in (src, native, ours):
        _prepare(db, sc)
    src.execute(f"CREATE PUBLICATION {PUB} FOR ALL TABLES")
    for slot in ("bench_native", "bench_pgferry"):
        src.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    native.execute(f"CREATE SUBSCRIPTION bench_sub CONNECTION '{src.dsn}' PUBLICATION {PUB} WITH (create_slot = false, "
                   "slot_name = 'bench_native', copy_data = false)")
    proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", "start", "--source", src.dsn, "--target", ours.dsn,
                             "--no-copy", "--slot", "bench_pgferry", "--publication", PUB, *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lag_sql = ("SELECT slot_name, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots "
               "WHERE slot_name IN ('bench_native', 'bench_pgferry')")
    try:
        (start,) = src.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint")[0]
        for slot in ("bench_native", "bench_pgferry"):
            _wait_confirmed(src, slot, int(start), 60, lambda: proc.poll() is None)
        bench = subprocess.Popen([PGBENCH, "-n", "-c", "4", "-j", "2", "-R", str(rate), "-T", str(seconds),
                                  "-b", "tpcb-like", "-d", src.dsn], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        samples: dict[str, list[int]] = {"bench_native": [], "bench_pgferry": []}
        while bench.poll() is None:
            for slot, lag in src.execute(lag_sql):
                samples[slot].append(int(lag))
            time.sleep(0.5)
        out = bench.communicate()[0]
        (end,) = src.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint")[0]
        t = time.perf_counter()
        drained = {slot: _wait_confirmed(src, slot, int(end), 120, lambda: proc.poll() is None) - t
                   for slot in samples}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    native.execute("DROP SUBSCRIPTION bench_sub")
    src.execute("SELECT pg_drop_replication_slot('bench_pgferry')")
    tps = next((line.split("=")[1].split()[0] for line in out.splitlines() if line.startswith("tps")), "?")
    same = all(table_digest(src, n, c) == table_digest(native, n, c) == table_digest(ours, n, c)
               for n, c in sc.tables.items())
    res = {"tps": tps, "same": same}
    for slot, name in (("bench_native", "native"), ("bench_pgferry", "pgferry")):
        lags = samples[slot]
        tail = lags[len(lags) * 3 // 4:] or [0]
        res[name] = {"max_kb": max(lags or [0]) / 1024, "mean_kb": sum(lags) / max(len(lags), 1) / 1024,
                     "last_quarter_max_kb": max(tail) / 1024, "drain_s": drained[slot]}
    return res


def compile_pgferry() -> None:
    """Byte-compile pgferry's packages once, as `pip install` does: each timed run then starts like an
    installed pgferry. This checkout is imported from source, and with PYTHONDONTWRITEBYTECODE set
    (the dev machine sets it) every run compiled its modules again: 0.08 of its 0.23 s start-up."""
    for package in ("decoder", "sink", "replicator"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="15-18,18-18")
    ap.add_argument("--scenarios", default="bulk,oltp,hot")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every backlog's size")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each consumer this many times on the same backlog, alternating; report medians")
    ap.add_argument("--pgferry-args", default="", help="extra flags for pgferry start, e.g. '--batch-rows 20000'")
    ap.add_argument("--also", action="append", default=[], metavar="FLAGS",
                    help="time pgferry with these flags too, on the same backlogs, alternating (repeatable), "
                         "e.g. --also '--nice 0'")
    ap.add_argument("--steady", type=int, metavar="TPS",
                    help="instead of the backlogs: pgbench at TPS for --seconds with native and pgferry both "
                         "subscribed; prints each one's lag")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--profile", type=Path, help="run pgferry under py-spy; write profiles here and print top costs")
    ap.add_argument("--target-role", default="owner",
                    help="pgferry's target role: owner (owns the target database only) or superuser; a list "
                         "(owner,superuser) times each on the same backlogs")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="one-way delay on pgferry's link to the target and native apply's link to the source")
    ap.add_argument("--no-durable", action="store_true",
                    help="servers with fsync and full_page_writes off (default: on, as production)")
    args = ap.parse_args()
    roles = tuple(r.strip() for r in args.target_role.split(","))
    if not roles or any(r not in ("owner", "superuser") for r in roles):
        ap.error("--target-role: owner, superuser or both (comma-separated)")
    durable = {} if args.no_durable else DURABLE
    pairs = [tuple(int(v) for v in p.split("-")) for p in args.pairs.split(",")]
    compile_pgferry()
    results = []
    if args.steady:
        _main_steady(pairs, args)
        return
    with LocalServer(18, name="bench-tgt-", settings=durable) as tgt:
        for sv, tv in pairs:
            assert tv == 18, "the target is PostgreSQL 18"
            with LocalServer(sv, name=f"bench-src{sv}-", settings=durable) as s:
                for name in args.scenarios.split(","):
                    profile = None
                    if args.profile is not None:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        profile = args.profile / f"{sv}-{tv}-{name}.txt"
                    r = run_scenario(s, tgt, SCENARIOS[name], args.scale, args.pgferry_args.split(), profile,
                                     args.repeats, [a.split() for a in args.also], roles, args.delay_ms)
                    r["pair"] = f"{sv}->{tv}"
                    results.append(r)
                    _print_row(r, header=len(results) == 1)
                    if profile is not None:
                        for share, frame in top_costs(profile):
                            print(f"    {share:6.1%}  {frame}")
    if not all(r["same"] for r in results):
        print("MISMATCH: a target differs from the source", file=sys.stderr)
        sys.exit(1)


def _main_steady(pairs: list[tuple[int, ...]], args: argparse.Namespace) -> None:
    ok = True
    with LocalServer(18, name="bench-tgt-") as tgt:
        for sv, tv in pairs:
            with LocalServer(sv, name=f"bench-src{sv}-") as s:
                r = run_steady(s, tgt, args.steady, args.seconds, args.pgferry_args.split())
            ok = ok and r["same"]
            print(f"{sv}->{tv} pgbench tpcb-like at {args.steady} tps for {args.seconds} s (got {r['tps']} tps):")
            for name in ("native", "pgferry"):
                x = r[name]
                print(f"  {name:8} lag max {x['max_kb']:8.0f} kB  mean {x['mean_kb']:8.0f} kB  last quarter max "
                      f"{x['last_quarter_max_kb']:8.0f} kB  caught up {x['drain_s']:.2f} s after the load stopped")
    if not ok:
        print("MISMATCH: a target differs from the source", file=sys.stderr)
        sys.exit(1)


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"target role {r['role']}, link delay {r['delay_ms']:g} ms each way")
        print(f"{'pair':7} {'scenario':8} {'changes':>9} {'WAL':>8} {'native s':>9} {'pgferry s':>9} "
              f"{'ceiling s':>9} {'pgferry/native':>14} {'ceiling/pgferry':>15} {'rows/s':>9} {'RSS MB':>7} "
              f"{'CPU s':>6}")
    print(f"{r['pair']:7} {r['scenario']:8} {r['changes']:>9,} {r['wal']:>8} {r['native_s']:>9.2f} "
          f"{r['pgferry_s']:>9.2f} {r['ceiling_s']:>9.2f} {r['native_s'] / r['pgferry_s']:>13.2f}x "
          f"{r['ceiling_s'] / r['pgferry_s']:>14.2f} {r['changes'] / r['pgferry_s']:>9,.0f} {r['rss_mb']:>7.0f} "
          f"{r['cpu_s']:>6.2f}",
          flush=True)
    if r.get("repeats", 1) > 1:
        spread = "  ".join(f"{k} " + "/".join(f"{v:.2f}" for v in vals) for k, vals in r["times"].items())
        print(f"{'':17}runs: {spread}", flush=True)
    ws = "  ".join(f"{k} {v:.2f}" for k, v in r.get("walsender", {}).items())
    print(f"{'':17}walsender CPU s: {ws}", flush=True)
    for kind, flags in r.get("also", {}).items():
        took = r[f"{kind}_s"]
        print(f"{'':17}{kind} = pgferry {flags}: {took:.2f} s, pgferry/native {r['native_s'] / took:.2f}x "
              f"(pgferry as configured above: {r['native_s'] / r['pgferry_s']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
