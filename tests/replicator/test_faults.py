"""Reliability scenarios beyond crashes and cuts: locks, aborted streams, the copy/stream seam,
a source without logical WAL, and a soak with random kills and network cuts under pgbench."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import psycopg2
import pytest

from replicator.local.servers import LocalServer
from tests.pgplugin import ROOT, Daemon, assert_same_tables, main_pair_only, new_db, pgferry, wait_for
from tests.replicator import workload as wl
from tests.replicator.test_sync import PGBENCH, TABLES, TYPED

pytestmark = pytest.mark.pg


def test_a_locked_target_table_makes_pgferry_wait_not_fail(pair, daemons):
    src, dst = pair
    main_pair_only(src, dst)
    wl.setup(src, dst)
    d = Daemon(src, dst, "--network-timeout", "2")  # the lock outlasts it: the watchdog must not give up
    daemons.append(d)
    locker = psycopg2.connect(dst.dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE acct IN ACCESS EXCLUSIVE MODE")
        wl.write(src, 100, seed=12)
        # pgferry is blocked on the lock: its session waits (wait_event_type Lock), nothing fails
        wait_for(lambda: dst.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgferry' "
                                     "AND wait_event_type = 'Lock'")[0][0] == 1, 30, "pgferry to wait on the lock")
        wait_for(lambda: "keeps waiting" in d.output(), 30, "the watchdog to find the target alive")
    finally:
        locker.rollback()
        locker.close()
    d.wait_caught_up()
    assert_same_tables(src, dst, wl.TABLES)
    out = d.output()
    assert "retrying" not in out and "error" not in out.lower() and "presumed dead" not in out, out


def test_a_full_target_disk_makes_pgferry_wait_then_finish(pair, daemons):
    src, dst = pair
    main_pair_only(src, dst)
    owner = dst.server.os_user
    if os.geteuid() != 0 or owner is None:
        pytest.skip("needs root to mount a small tmpfs for the target's tablespace")
    space = tempfile.mkdtemp(prefix="pgferry-small-")  # not under pytest's tmp: the server's user must reach it
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(space)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["chown", owner, str(space)], check=True)
        ddl = "CREATE TABLE big (id int PRIMARY KEY, pad text)"
        src.execute(ddl + "; CREATE PUBLICATION pgferry FOR ALL TABLES")
        dst.execute(f"CREATE TABLESPACE small LOCATION '{space}'")
        dst.execute(ddl + " TABLESPACE small")
        d = Daemon(src, dst, "--batch-rows", "2000")
        daemons.append(d)
        # ~12 MB of incompressible rows into a 6 MB tablespace
        src.execute("INSERT INTO big SELECT g, (SELECT string_agg(md5(random()::text || i || g), '') "
                    "FROM generate_series(1, 20) x(i)) FROM generate_series(1, 20000) g")
        wait_for(lambda: "No space left on device" in d.output(), 60, "the target to run out of space")
        time.sleep(3)  # pgferry waits with backoff: still running, a handful of attempts
        assert d.running(), d.output()
        # logged once per incident, not per attempt; a new incident when a batch got through meanwhile
        # (autovacuum frees the space of the aborted attempts' rows), or a file name changed in the message
        assert d.output().count("No space left on device") <= 6, d.output()
        subprocess.run(["mount", "-o", "remount,size=64M", str(space)], check=True)
        d.wait_caught_up(timeout=120)
        assert_same_tables(src, dst, {"big": ["id", "pad"]})
        assert d.stop() == 0
        dst.execute("DROP TABLE big")
        dst.execute("DROP TABLESPACE small")
    finally:
        subprocess.run(["umount", "-l", str(space)], check=False)
        os.rmdir(space)


def test_a_streamed_transaction_cut_off_at_the_source_is_discarded(pair, daemons, tmp_path):
    """A large transaction streamed while in progress, whose backend is terminated mid-way: the
    source aborts it, pgferry drops what it spooled, and nothing of it reaches the target."""
    src, dst = pair
    main_pair_only(src, dst)
    wl.setup(src, dst)
    d = Daemon(src, dst, "--spool-dir", str(tmp_path),
               source_dsn=src.dsn + " options='-c logical_decoding_work_mem=64kB'")
    daemons.append(d)
    conn = psycopg2.connect(src.dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()

    def big() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO nokey SELECT g, 'doomed', NULL FROM generate_series(1, 2000000) g")
        except psycopg2.Error:
            pass

    th = threading.Thread(target=big, daemon=True)
    th.start()
    wait_for(lambda: any(f.stat().st_size > 0 for f in tmp_path.glob("pgferry-spool-*/*.spool")), 60,
             "pgferry to spool part of it", interval=0.1)
    src.execute("SELECT pg_terminate_backend(%s)", (pid,))
    th.join(30)
    wl.write(src, 50, seed=13)
    d.wait_caught_up()
    assert_same_tables(src, dst, wl.TABLES)
    assert dst.execute("SELECT count(*) FROM nokey WHERE b = 'doomed'") == [(0,)]


def _start_under_pgbench_until(src, dst, daemons, failpoint: str, seconds: int) -> tuple[Daemon, subprocess.Popen]:
    """pgbench data and the typed table on the source, pgbench writing for `seconds`, and a copying
    `pgferry start` that exits abruptly at `failpoint`."""
    main_pair_only(src, dst)
    subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-d", src.dsn], check=True, capture_output=True)
    src.psql(TYPED)
    bench = subprocess.Popen([PGBENCH, "-c", "2", "-T", str(seconds), "-n", "-d", src.dsn], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    d = Daemon(src, dst, copy=True, ready=False, env={"PGFERRY_FAILPOINT": failpoint})
    daemons.append(d)
    assert d.wait_exit(timeout=120) == 99, d.output()
    return d, bench


def test_restart_between_copy_and_stream(pair, daemons, tmp_path):
    src, dst = pair
    d, bench = _start_under_pgbench_until(src, dst, daemons, "before_stream", 15)
    d.env.pop("PGFERRY_FAILPOINT")
    d.start()
    bench.wait(timeout=60)
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, TABLES)


def test_killed_between_creating_the_slot_and_recording_it_starts_over(pair, daemons, tmp_path):
    src, dst = pair
    d, bench = _start_under_pgbench_until(src, dst, daemons, "after_slot_created", 10)
    # the slot exists, but its consistent point never reached the target
    assert src.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry'") == [(1,)]
    assert dst.execute("SELECT consistent_lsn::text FROM pgferry.sync") == [("0/0",)]
    d.env.pop("PGFERRY_FAILPOINT")
    d.start()
    bench.wait(timeout=60)
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, TABLES)
    out = d.output()
    assert "dropped slot pgferry, left by the interrupted start" in out, out
    (lsn,) = dst.execute("SELECT consistent_lsn::text FROM pgferry.sync")[0]
    assert lsn != "0/0"


def test_source_without_logical_wal_is_refused_clearly(pair):
    _, dst = pair
    with LocalServer(pair[0].version, settings={"wal_level": "replica"}, name="replica-") as server:
        src = new_db(server, "src")
        r = subprocess.run([sys.executable, "-m", "replicator.cli", "start", "--source", src.dsn, "--target", dst.dsn],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert r.returncode == 1 and "wal_level = replica" in r.stderr and "wal_level = logical" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_soak_pgbench_with_random_kills_and_network_cuts(pair, daemons, tcp_proxy):
    """PGFERRY_SOAK_SECONDS (default 20 in CI) of pgbench while pgferry is killed every few seconds
    and its source connection cut now and then; afterwards, zero differences."""
    src, dst = pair
    main_pair_only(src, dst)
    seconds = int(os.environ.get("PGFERRY_SOAK_SECONDS", "20"))
    subprocess.run([PGBENCH, "-i", "-s", "2", "-q", "-d", src.dsn], check=True, capture_output=True)
    src.psql(TYPED)
    proxy = tcp_proxy(src)
    bench = subprocess.Popen([PGBENCH, "-c", "3", "-T", str(seconds), "-n", "-d", src.dsn],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = Daemon(src, dst, "--batch-rows", "200", copy=True, ready=False, source_dsn=proxy.dsn_for(src.dsn))
    daemons.append(d)
    rnd = random.Random(42)
    kills = cuts = 0
    while bench.poll() is None:
        time.sleep(rnd.uniform(1.0, 4.0))  # the moment of the next fault
        if rnd.random() < 0.3:
            cuts += proxy.cut() > 0
        else:
            d.kill()
            kills += 1
            d.start()
    assert kills >= 2
    d.wait_caught_up(timeout=300)
    assert_same_tables(src, dst, TABLES)
    print(f"soak: {seconds} s of pgbench, {kills} kills, {cuts} network cuts, no differences")


def test_wrong_password_is_one_clear_line_and_exit_1(pair):
    _, dst = pair
    with LocalServer(pair[0].version, name="auth-") as server:
        src = new_db(server, "src")
        src.execute("CREATE ROLE pw LOGIN PASSWORD 'right'")
        hba = server.datadir / "pg_hba.conf"
        hba.write_text("host all pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        src.execute("SELECT pg_reload_conf()")
        wait_for(lambda: src.execute("SELECT count(*) FROM pg_hba_file_rules WHERE user_name = '{pw}'")[0][0] == 1,
                 10, "pg_hba to reload")
        r = pgferry("start", "--source", server.dsn(src.name, user="pw") + " password=wrong-secret",
                    "--target", dst.dsn)
    assert r.returncode == 1, r.stderr  # operational, as from every command (ConnectError)
    assert "password authentication failed" in r.stderr and "PGPASSWORD" in r.stderr, r.stderr
    assert "wrong-secret" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_privileges_on_source_and_target_are_named_and_nothing_is_created(pair):
    src, dst = pair
    main_pair_only(src, dst)
    src.execute("CREATE TABLE t (id int PRIMARY KEY)")
    role = f"weak_{src.name}"
    src.execute(f"CREATE ROLE {role} LOGIN")
    dst.execute(f"CREATE ROLE {role}_t LOGIN")
    try:
        r = pgferry("start", "--source", src.server.dsn(src.name, user=role), "--target", dst.dsn)
        assert r.returncode == 1 and "lacks the REPLICATION privilege" in r.stderr, r.stderr
        assert f"ALTER ROLE {role} WITH REPLICATION" in r.stderr and "Traceback" not in r.stderr
        dst.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; REVOKE CREATE ON DATABASE {dst.name} FROM PUBLIC")
        r = pgferry("start", "--source", src.dsn, "--target", dst.server.dsn(dst.name, user=f"{role}_t"))
        assert r.returncode == 1 and "needs CREATE on the target database" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        # nothing half-done on the source
        assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgferry'")
    finally:
        src.execute(f"DROP ROLE {role}")
        dst.execute(f"DROP ROLE {role}_t")
