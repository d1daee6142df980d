"""`pgferry preflight` on a badly and a well configured source, and the metrics endpoint."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from replicator.local.servers import LocalServer
from tests.pgplugin import Daemon, Db, new_db, pgferry, publish_same_table, wait_for

pytestmark = pytest.mark.pg


def test_preflight_names_each_problem_with_its_fix(pair):
    src, dst = pair
    with LocalServer(src.version, settings={"wal_level": "replica"}, name="preflight-") as server:
        bad = new_db(server, "bad")
        bad.execute("CREATE ROLE plain LOGIN PASSWORD 'pw'")
        bad.execute("CREATE TABLE keyless (a int, b text); INSERT INTO keyless VALUES (1, 'x'); "
                    "UPDATE keyless SET b = 'y'; GRANT SELECT ON keyless TO plain")
        bad.execute("SELECT pg_stat_force_next_flush()" if src.version >= 15 else "SELECT 1")
        dsn = f"host=127.0.0.1 port={server.port} dbname={bad.name} user=plain password=pw"
        wait_for(lambda: bad.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'keyless'")[0][0] > 0,
                 10, "table statistics")
        r = pgferry("preflight", "--json", "--source", dsn, "--target", dst.dsn)
        assert r.returncode == 1, r.stderr
        report = json.loads(r.stdout)
        assert not report["ok"] and "pw" not in r.stdout
        errors = {f["check"]: f for f in report["findings"] if f["severity"] == "error"}
        assert "wal_level = replica" in errors["wal_level"]["message"]
        assert "wal_level = logical" in errors["wal_level"]["fix"] and "restart" in errors["wal_level"]["fix"]
        assert "lacks the REPLICATION privilege" in errors["privileges"]["message"]
        assert errors["privileges"]["fix"] == "ALTER ROLE plain WITH REPLICATION;  -- as a superuser"
        assert "public.keyless" in errors["replica identity"]["message"]
        assert "REPLICA IDENTITY FULL" in errors["replica identity"]["fix"]
        assert "needs a superuser" in errors["publication"]["message"]
        # the human report says the same, one finding per line with its fix
        r = pgferry("preflight", "--source", dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "ERROR    source  wal_level" in r.stdout and "fix: ALTER ROLE plain" in r.stdout
        assert "preflight: 4 error(s)" in r.stdout, r.stdout
        # start runs the same checks and creates nothing
        r = pgferry("start", "--source", dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "wal_level = logical" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert dst.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'") == [(0,)]
    # a well configured pair is ready
    src.execute("CREATE TABLE ok (id int PRIMARY KEY)")
    r = pgferry("preflight", "--json", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and not [f for f in report["findings"] if f["severity"] == "error"], report
    assert {f["check"] for f in report["findings"]} >= {"version", "size"}
    r = pgferry("preflight", "--print-setup-sql")
    assert r.returncode == 0 and "CREATE ROLE pgferry WITH LOGIN REPLICATION" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _listening(port: int) -> list[str]:
    """The IPv4 addresses a socket listens on at `port` (/proc/net/tcp)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, _, p = local.partition(":")
        if state == "0A" and int(p, 16) == port:
            out.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


def test_a_metrics_address_the_machine_lacks_is_a_clear_error(pair):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY)")
    r = pgferry("start", "--no-copy", "--metrics-port", str(_free_port()), "--metrics-address", "192.0.2.1",
                "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 2 and "--metrics-address 192.0.2.1" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_metrics_endpoint_reports_progress_rows_and_batches(pair, daemons):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    port = _free_port()
    d = Daemon(src, dst, "--metrics-port", str(port), "--metrics-address", "127.0.0.1")
    daemons.append(d)
    assert _listening(port) == ["127.0.0.1"]  # this machine only, as asked
    src.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 300) g")
    src.execute("UPDATE t SET v = 'y' WHERE id <= 100")
    src.execute("DELETE FROM t WHERE id > 250")
    d.wait_caught_up()
    m = _metrics(port)
    assert m['pgferry_rows_applied_total{op="insert",table="public.t"}'] == 300
    assert m['pgferry_rows_applied_total{op="update",table="public.t"}'] == 100
    assert m['pgferry_rows_applied_total{op="delete",table="public.t"}'] == 50
    assert m['pgferry_phase{phase="streaming"}'] == 1 and m['pgferry_phase{phase="copy"}'] == 0
    assert m["pgferry_applied_lsn"] == d.progress()
    assert m["pgferry_source_lsn"] >= m["pgferry_applied_lsn"] and m["pgferry_lag_bytes"] >= 0
    assert m["pgferry_batch_rows_count"] >= 1 and m["pgferry_batch_rows_sum"] >= 450
    assert not [k for k in m if k.startswith("pgferry_conflicts_total{")]  # none yet
    assert m["pgferry_slot_retained_wal_bytes"] > 0
    assert d.stop() == 0


def test_the_daemon_runs_below_the_servers_cpu_priority(pair, daemons):
    """Every thread at nice 10 by default; the session's autogroup too when pgferry leads its session
    (from a shell it shares the shell's, which it leaves alone); --nice 0 keeps what it started with."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY)")
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    # the test's own autogroup, or None where autogroups are not in effect: not Linux, configured
    # out, or the tests run in a CPU cgroup (then /proc/PID/autogroup reads empty)
    autogroups = _autogroup(os.getpid())
    # (flags, own session, every thread's nice, the session autogroup's nice: a new one starts at 0)
    runs = [([], False, max(mine, 10), None), (["--nice", "7"], True, max(mine, 7), 7),
            (["--nice", "0"], True, mine, 0)]
    for i, (args, session, nice, group_nice) in enumerate(runs):
        # the metrics server's thread starts after the priority is set, the batch writer's later still
        d = Daemon(src, dst, "--metrics-port", str(_free_port()), *args, session=session)
        daemons.append(d)
        src.execute("INSERT INTO t VALUES (%s)", (i,))
        d.wait_caught_up()
        assert d.proc is not None
        threads = _thread_nice_values(d.proc.pid)
        assert len(threads) >= 3 and set(threads.values()) == {nice}, (args, threads)
        if autogroups:
            group = _autogroup(d.proc.pid)
            assert group is not None, args
            if session:
                assert group[0] != autogroups[0] and group[1] == group_nice, (args, group)
            else:
                assert group == autogroups
        assert d.stop() == 0, d.output()
    assert [r[0] for r in src.execute("SELECT id FROM t ORDER BY id")] == [0, 1, 2]


def _thread_nice_values(pid: int) -> dict[int, int]:
    """Thread id -> nice value, from /proc/PID/task/TID/stat (field 19), of the threads alive
    while it reads (a short-lived thread may end between the listing and the read)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:
            continue
    return out


def _autogroup(pid: int) -> tuple[str, int] | None:
    """('/autogroup-123', nice) of the process's session; None where it has no autogroup."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) != 3:  # empty: the process is in a CPU cgroup, where autogroups do not apply
        return None
    return fields[0], int(fields[2])


def test_status_watch_redraws_a_live_view(pair, daemons):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE w (id int PRIMARY KEY)")
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("INSERT INTO w SELECT generate_series(1, 1000)")
    d.wait_caught_up()
    r = pgferry("status", "--source", src.dsn, "--target", dst.dsn, "--watch", "0.2", "--iterations", "3")
    assert r.returncode == 0, r.stderr
    assert "streaming (daemon running)" in r.stdout and "rows applied" in r.stdout and "1,000" in r.stdout, r.stdout
    assert "/s)" in r.stdout, r.stdout  # the rate, from the second refresh on


def test_preflight_names_tables_that_force_row_security_on_the_target_role(pair):
    """pg_dump recreates FORCE ROW LEVEL SECURITY on the target, where pgferry's role owns the
    tables: the policies then apply to it, and the apply would stop at the first change."""
    src, dst = pair
    role = f"mig_{dst.name}"
    src.psql("""CREATE TABLE forced (id int PRIMARY KEY, owner text);
        ALTER TABLE forced ENABLE ROW LEVEL SECURITY; ALTER TABLE forced FORCE ROW LEVEL SECURITY;
        CREATE POLICY only_a ON forced USING (owner = 'a'); CREATE TABLE plain (id int PRIMARY KEY)""")
    dst.psql(f"CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {dst.name} TO {role}")
    target = dst.server.dsn(dst.name, user=role)
    try:
        r = pgferry("preflight", "--json", "--source", src.dsn, "--target", target)
        assert r.returncode == 1, r.stdout + r.stderr
        (finding,) = [f for f in json.loads(r.stdout)["findings"] if f["check"] == "row security"]
        assert finding["side"] == "target" and "public.forced force row-level security" in finding["message"]
        assert "plain" not in finding["message"]
        assert finding["fix"] == f"ALTER ROLE {role} BYPASSRLS;  -- as a superuser"
        dst.execute(f"ALTER ROLE {role} BYPASSRLS")
        r = pgferry("preflight", "--json", "--source", src.dsn, "--target", target)
        assert not [f for f in json.loads(r.stdout)["findings"] if f["check"] == "row security"], r.stdout
    finally:
        dst.psql(f"REVOKE CREATE ON DATABASE {dst.name} FROM {role}")
        Db(dst.server, "postgres").execute(f"DROP ROLE {role}")
