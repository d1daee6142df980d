"""`pgferry pause` / `resume` (replicator/stream/pause.py) and `verify --online`
(replicator/cutover/online.py): the daemon held at a point while it keeps its slot and connection."""

from __future__ import annotations

import json
import subprocess
import threading

import psycopg2
import pytest

from tests.pgplugin import Db, assert_same_tables, pgferry, wait_for
from tests.replicator.test_switchover import _start_streaming, _status
from tests.replicator.test_sync import PGBENCH

pytestmark = pytest.mark.pg

W = {"w": ["id", "v"]}


class Load(threading.Thread):
    """Single-row transactions into w on the source until stopped; counts its commits."""

    def __init__(self, db: Db, start: int = 100_000) -> None:
        super().__init__(daemon=True)
        self.db, self.n, self.stop, self.errors = db, start, threading.Event(), []

    def run(self) -> None:
        conn = psycopg2.connect(self.db.dsn)
        conn.autocommit = True
        try:
            while not self.stop.is_set():
                self.n += 1
                conn.cursor().execute("INSERT INTO w VALUES (%s, 'load')", (self.n,))
        except psycopg2.Error as exc:
            self.errors.append(str(exc))
        finally:
            conn.close()


def test_pause_holds_the_position_across_walsender_timeouts_and_resume_catches_up(owner_pair, daemons):
    src, dst = owner_pair
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text); "
                "INSERT INTO w SELECT g, 'v' FROM generate_series(1, 100) g")
    d = _start_streaming(src, dst, daemons, source_dsn=src.dsn + " options='-c wal_sender_timeout=2s'")
    load = Load(src)
    load.start()
    try:
        wait_for(lambda: dst.execute("SELECT count(*) FROM w")[0][0] > 200, 30, "the load on the target")
        r = pgferry("pause", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 0 and "paused at" in r.stderr, r.stderr
        st = _status(src, dst)
        assert st["phase"] == "paused" and st["pause"]["paused_lsn"], st
        held = dst.execute("SELECT count(*) FROM w")[0][0]
        applied = st["applied_lsn"]
        # three wal_sender_timeouts' worth of source writes while nothing is applied
        first = load.n
        wait_for(lambda: load.n > first + 3000 and src.execute(
            "SELECT now() - backend_start > interval '7 seconds' FROM pg_stat_replication "
            "WHERE application_name = 'pgferry'") == [(True,)], 60, "time to pass under load")
        assert dst.execute("SELECT count(*) FROM w")[0][0] == held
        st = _status(src, dst)
        assert st["phase"] == "paused" and st["applied_lsn"] == applied and st["lag_bytes"] > 0, st
        assert st["slot_retained_wal_bytes"] and st["daemon_running"], st
        r = pgferry("status", "--source", src.dsn, "--target", dst.dsn, "--watch", "0.2", "--iterations", "2")
        assert "paused (daemon running)" in r.stdout and "asked by pgferry pause: holding at" in r.stdout, r.stdout
        assert "not shrinking" in r.stdout, r.stdout  # the catch-up ETA, while nothing is applied
        # neither an online verify nor a cutover undoes an operator's pause
        r = pgferry("verify", "--online", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "the daemon is paused (pgferry pause" in r.stderr, r.stderr
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "`pgferry resume` first" in r.stderr, r.stderr
        assert _status(src, dst)["phase"] == "paused" and not src.execute(
            "SELECT 1 FROM pg_trigger WHERE tgname = 'pgferry_fence'")  # refused before the fence
        r = pgferry("resume", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 0 and "applies again" in r.stderr, r.stderr
    finally:
        load.stop.set()
        load.join(30)
    assert not load.errors, load.errors
    d.wait_caught_up(timeout=60)
    assert_same_tables(src, dst, W)
    out = d.output()
    # the walsender never timed out: one session all along
    assert "paused at" in out and "resumed at" in out and "retrying" not in out, out
    assert _status(src, dst)["phase"] == "streaming"


def test_verify_online_under_load_finds_nothing_then_names_the_rows_changed_behind_its_back(owner_pair, daemons,
                                                                                         tmp_path):
    src, dst = owner_pair
    subprocess.run([PGBENCH, "-i", "-s", "2", "-q", "-d", src.dsn], check=True, capture_output=True)
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text); "
                "INSERT INTO w SELECT g, 'v' FROM generate_series(1, 1000) g")
    d = _start_streaming(src, dst, daemons)
    bench = subprocess.Popen([PGBENCH, "-c", "4", "-j", "2", "-T", "60", "-n", "-d", src.dsn], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_for(lambda: src.execute("SELECT count(*) FROM pgbench_history")[0][0] > 500, 60, "pgbench")
        r = pgferry("verify", "--online", "--json", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        res = json.loads(r.stdout)
        assert res["ok"] and res["online"] and res["lsn"] and res["held_s"] < 5, res
        assert {t["name"] for t in res["tables"]} >= {"public.pgbench_accounts", "public.w"}
        # behind pgferry's back, on a table the load does not touch
        dst.execute("UPDATE w SET v = 'changed' WHERE id = 17; DELETE FROM w WHERE id = 33; "
                    "INSERT INTO w VALUES (5000, 'extra')")
        r = pgferry("verify", "--online", "--json", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1, r.stdout + r.stderr
        tables = {t["name"]: t for t in json.loads(r.stdout)["tables"]}
        diffs = tables["public.w"]["differences"]
        assert "row (id)=(17): differs" in diffs and "row (id)=(33): missing on the target" in diffs, diffs
        assert "row (id)=(5000): only on the target" in diffs, diffs
        assert all(t["match"] for n, t in tables.items() if n != "public.w"), tables
        assert d.running(), d.output()
    finally:
        bench.kill()
        bench.wait()
    assert dst.execute("SELECT count(*) FROM pgferry.pause") == [(0,)]  # the daemon went on
    d.wait_caught_up(timeout=60)


def test_verify_online_without_a_daemon_says_so_and_compares_nothing(pair, daemons):
    src, dst = pair
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    d = _start_streaming(src, dst, daemons)
    assert d.stop() == 0
    r = pgferry("verify", "--online", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "no `pgferry start` streams this slot" in r.stderr, r.stderr
    assert "tables compared" not in r.stdout
    assert dst.execute("SELECT count(*) FROM pgferry.pause") == [(0,)]  # the request does not linger


def test_verify_online_gives_up_on_a_long_source_transaction_and_lets_the_daemon_go(pair, daemons):
    """The source snapshot waits for the transactions running there; one held open longer than
    --timeout: the verify stops with a clear message, and the daemon, held meanwhile, goes on."""
    src, dst = pair
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    d = _start_streaming(src, dst, daemons)
    open_tx = psycopg2.connect(src.dsn)
    try:
        open_tx.cursor().execute("INSERT INTO w VALUES (1, 'open')")  # an xid, not committed
        r = pgferry("verify", "--online", "--timeout", "3", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "did not finish within 3 s" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert dst.execute("SELECT count(*) FROM pgferry.pause") == [(0,)]
    finally:
        open_tx.rollback()
        open_tx.close()
    src.execute("INSERT INTO w VALUES (2, 'after')")
    d.wait_caught_up()
    assert dst.execute("SELECT id FROM w") == [(2,)]
