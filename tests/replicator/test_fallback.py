"""A way back after the cutover (replicator/cutover/fallback.py): `cutover --fallback` keeps the old
source in sync from the new server, `rollback` hands back at one LSN, `fallback stop` ends it."""

from __future__ import annotations

import collections
import json
import subprocess

import psycopg2.errors
import pytest

from replicator.local.servers import LocalServer
from tests.pgplugin import Daemon, Db, new_db, pgferry, wait_for
from tests.replicator.test_switchover import _entry, _start_streaming, _status, _target_conninfo, pgbench_processed
from tests.replicator.test_sync import PGBENCH

pytestmark = pytest.mark.pg

HISTORY = "SELECT tid, bid, aid, delta, mtime FROM pgbench_history"


def _reverse_pair(src: Db, dst: Db) -> None:
    if (src.version, dst.version) == (15, 15):
        pytest.skip("runs on 15 <-> 18 and 18 <-> 18")
    if dst.user is not None:  # the target's owner must open the reverse stream
        Db(dst.server, "postgres").execute(f"ALTER ROLE {dst.user} REPLICATION")


def _cut_over_with_fallback(src: Db, dst: Db, d: Daemon) -> None:
    """`cutover --fallback` (no PgBouncer), then the daemon turns around and streams back."""
    r = pgferry("cutover", "--fallback", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    wait_for(lambda: "streaming back" in d.output() or not d.running(), 60, "the daemon to turn around")
    assert d.running(), d.output()


def _conninfo(db: Db) -> str:
    return _target_conninfo(db)


def test_rollback_under_pgbench_hands_back_every_write(owner_pair, daemons, pgbouncer, tmp_path):
    """pgbench (8 clients) through PgBouncer all along: the cutover with --fallback moves it to the
    target, the daemon turns around and streams the target's writes into the fenced old source,
    `rollback` moves it back. No transaction fails, every one is on the old source exactly once, the
    old source equals the target at the rollback's handoff, sequences are ahead of every value used."""
    src, dst = owner_pair
    _reverse_pair(src, dst)
    subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-d", src.dsn], check=True, capture_output=True)
    src.execute("CREATE SEQUENCE ticket; SELECT setval('ticket', 100)")
    d = _start_streaming(src, dst, daemons)
    b = pgbouncer(src, pool_size=8)
    bench = subprocess.Popen([PGBENCH, "-c", "8", "-j", "2", "-T", "40", "-n", "-M", "simple", "-d", b.dsn(src.name)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_for(lambda: src.execute("SELECT count(*) FROM pgbench_history")[0][0] > 300 or bench.poll() is not None,
                 60, "pgbench writing through PgBouncer")
        r = pgferry("cutover", "--fallback", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60",
                    "--pgbouncer", b.admin_dsn, "--pgbouncer-target", _conninfo(dst))
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        receipt = json.loads(r.stdout)
        assert receipt["ok"] and receipt["fallback"]["state"] == "active", receipt
        assert receipt["fallback"]["forward_slot_dropped"], receipt
        # the daemon turned around: it streams the target into the old source
        wait_for(lambda: "streaming back" in d.output() or not d.running(), 60, "the daemon to turn around")
        assert d.running(), d.output()
        handed_off = dst.execute("SELECT count(*) FROM pgbench_history")[0][0]
        wait_for(lambda: dst.execute("SELECT count(*) FROM pgbench_history")[0][0] > handed_off + 300
                 or bench.poll() is not None, 60, "pgbench writing on the target")
        dst.execute("SELECT nextval('ticket') FROM generate_series(1, 50)")  # the application's, on the new server
        st = _status(src, dst)
        assert st["direction"] == "reverse" and st["fallback"]["state"] == "active", st
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            src.execute("INSERT INTO pgbench_history (tid, bid, aid, delta) VALUES (1, 1, 1, 0)")  # still fenced
        r = pgferry("rollback", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60",
                    "--pgbouncer", b.admin_dsn, "--pgbouncer-target", _conninfo(src))
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        back = json.loads(r.stdout)
        assert d.wait_exit(timeout=30) == 0, d.output()
        out, err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
    processed = pgbench_processed(bench.returncode, out, err)
    assert back["ok"] and back["direction"] == "reverse" and back["old_source_fence_lifted"] > 0, back
    assert back["refused_writes"] == 0 and not back["client_errors"], back
    # every transaction pgbench counted is on the old source once: before the cutover, streamed back
    # from the target, and written there again after the rollback
    on_source = collections.Counter(src.execute(HISTORY))
    assert sum(on_source.values()) == processed, (sum(on_source.values()), processed)
    assert max(on_source.values()) == 1
    # the target stopped at the rollback's handoff: all of it is on the old source
    on_target = collections.Counter(dst.execute(HISTORY))
    assert not on_target - on_source and sum(on_target.values()) > handed_off
    (sums,) = src.execute("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM "
                          "pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(delta) FROM "
                          "pgbench_history)")
    assert len(set(sums)) == 1, sums
    assert src.execute("SELECT last_value FROM ticket") == [(150,)]
    # the application is back on the old source; the target is fenced now
    assert _entry(b, src.name)["port"] == src.server.port and not _entry(b, src.name)["paused"]
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction, match="is fenced"):
        dst.execute("INSERT INTO pgbench_history (tid, bid, aid, delta) VALUES (1, 1, 1, 0)")
    st = _status(src, dst)
    assert st["fallback"]["state"] == "rolled_back", st
    # the reverse slot would hold WAL on the new server for nothing
    assert "slot pgferry_fallback" in back["fallback_dropped"], back
    assert dst.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry_fallback'") == [(0,)]
    print(f"rollback under pgbench: {processed} transactions, 0 failed; write downtime {back['write_downtime_s']} s, "
          f"clients paused {back['client_pause_s']} s ({back['clients_waiting']} waiting); steps {back['steps_s']}")
    r = pgferry("rollback", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "rolled back" in r.stderr, r.stderr


def test_fallback_survives_a_killed_reverse_daemon_and_stops_cleanly(pair, daemons):
    """The reverse daemon killed (SIGKILL) mid-stream: `pgferry start` with the forward settings resumes
    the reverse direction exactly once. `fallback stop` drops the reverse slot and publication, keeps
    the old source fenced, and `start` then streams nothing."""
    src, dst = pair
    _reverse_pair(src, dst)
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text); "
                "INSERT INTO w SELECT g, 'v' FROM generate_series(1, 100) g")
    d = _start_streaming(src, dst, daemons)
    _cut_over_with_fallback(src, dst, d)
    dst.execute("INSERT INTO w SELECT g, 'new' FROM generate_series(101, 2000) g")
    dst.execute("UPDATE w SET v = 'changed' WHERE id <= 50")
    wait_for(lambda: src.execute("SELECT count(*) FROM w")[0][0] == 2000, 60, "the reverse stream")
    d.kill()
    dst.execute("DELETE FROM w WHERE id BETWEEN 60 AND 80; INSERT INTO w VALUES (5000, 'after the kill')")
    again = Daemon(src, dst, ready=False)
    daemons.append(again)
    wait_for(lambda: src.execute("SELECT count(*) FROM w WHERE id = 5000")[0][0] == 1 or not again.running(), 60,
             "the reverse stream after a restart")
    assert again.running(), again.output()
    assert src.execute("SELECT * FROM w ORDER BY id") == dst.execute("SELECT * FROM w ORDER BY id")
    r = pgferry("cleanup", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "a fallback is active" in r.stderr, r.stderr  # it would lift the old source's fence
    r = pgferry("fallback", "stop", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "in use" in r.stderr, r.stderr  # the reverse daemon still streams
    assert again.stop() == 0
    r = pgferry("fallback", "stop", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    stopped = json.loads(r.stdout)
    assert stopped["fallback"] == "stopped" and "slot pgferry_fallback" in stopped["dropped"], stopped
    assert dst.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry_fallback'") == [(0,)]
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        src.execute("INSERT INTO w VALUES (9999, 'x')")  # the old source stays fenced
    done = Daemon(src, dst, ready=False)
    daemons.append(done)
    assert done.wait_exit(timeout=60) == 1 and "migration is done" in done.output(), done.output()


def test_fallback_is_refused_before_anything_changes_when_the_target_cannot_stream(owner_pair, daemons):
    src, dst = owner_pair
    if (src.version, dst.version) != (15, 18):
        pytest.skip("runs on 15 -> 18")
    src.execute("CREATE TABLE w (id int PRIMARY KEY)")
    d = _start_streaming(src, dst, daemons)
    pre = pgferry("preflight", "--json", "--source", src.dsn, "--target", dst.dsn)
    found = [f for f in json.loads(pre.stdout)["findings"] if f["check"] == "fallback"]
    assert found and found[0]["severity"] == "info" and "REPLICATION" in found[0]["fix"], pre.stdout
    r = pgferry("cutover", "--fallback", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "--fallback refused before anything changed" in r.stderr, r.stderr
    assert f"ALTER ROLE {dst.user} REPLICATION" in r.stderr, r.stderr
    src.execute("INSERT INTO w VALUES (1)")  # not fenced
    d.wait_caught_up()
    assert d.running() and dst.execute("SELECT id FROM w") == [(1,)]


def _rows(db: Db) -> list[tuple]:
    return db.execute("SELECT * FROM w ORDER BY id")


def test_rollback_is_exact_after_restarts_of_both_servers_and_a_killed_reverse_daemon(pair, daemons):
    """While streaming back: the new server crash-restarted, the old source restarted, the reverse
    daemon SIGKILLed and started again; then `rollback` (no PgBouncer): the old source equals the new
    server row by row at the handoff, takes writes again, and the new server is fenced."""
    src0, dst0 = pair
    if (src0.version, dst0.version) != (15, 18):
        pytest.skip("runs on 15 <-> 18")
    old_server = LocalServer(src0.version, name="fallback-old-").start()
    new_server = LocalServer(dst0.version, name="fallback-new-").start()
    try:
        src, dst = new_db(old_server, "src"), new_db(new_server, "dst")
        src.execute("CREATE TABLE w (id int PRIMARY KEY, v text, n int); CREATE SEQUENCE s; "
                    "INSERT INTO w SELECT g, 'v', 0 FROM generate_series(1, 500) g")
        d = _start_streaming(src, dst, daemons)
        _cut_over_with_fallback(src, dst, d)
        n = [500]

        def write(k: int) -> None:
            dst.execute(f"INSERT INTO w SELECT g, 'new', 1 FROM generate_series({n[0] + 1}, {n[0] + k}) g; "
                        f"UPDATE w SET n = n + 1 WHERE id % 7 = 0; DELETE FROM w WHERE id % 97 = 0; "
                        "SELECT nextval('s')")
            n[0] += k

        def caught_up() -> bool:
            try:
                return _rows(src) == _rows(dst)
            except psycopg2.Error:
                return False

        write(300)
        wait_for(caught_up, 60, "the reverse stream")
        for fault in (lambda: new_server.restart("immediate"), lambda: old_server.restart("fast")):
            before = d.output().count("reconnected after")
            fault()
            write(200)
            wait_for(lambda b=before: (d.output().count("reconnected after") > b and caught_up()) or not d.running(),
                     90, "the reverse daemon to reconnect and catch up")
            assert d.running(), d.output()
        d.kill()
        write(200)
        again = Daemon(src, dst, ready=False)
        daemons.append(again)
        wait_for(lambda: caught_up() or not again.running(), 60, "the restarted reverse daemon")
        assert again.running(), again.output()
        write(100)
        r = pgferry("rollback", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr + again.output()
        back = json.loads(r.stdout)
        assert back["ok"] and back["direction"] == "reverse", back
        assert again.wait_exit(timeout=30) == 0, again.output()
        assert _rows(src) == _rows(dst) and len(_rows(src)) > 1000
        assert src.execute("SELECT last_value FROM s") == dst.execute("SELECT last_value FROM s")
        src.execute("INSERT INTO w VALUES (-1, 'back on the old source', 0)")  # writable again
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            dst.execute("INSERT INTO w VALUES (-1, 'x', 0)")
        out = d.output() + again.output()
        assert "Traceback" not in out, out
    finally:
        for x in daemons:
            x.close()
        old_server.cleanup()
        new_server.cleanup()


def test_a_forgotten_fallback_is_dropped_past_fallback_max_wal(pair, daemons, tcp_proxy):
    """The old source becomes unreachable while streaming back (as when the old server is shut
    down): the reverse slot keeps the new server's WAL; past fallback_max_wal the daemon drops it,
    says so and exits 1, and status shows the fallback dropped."""
    src, dst = pair
    if (src.version, dst.version) != (15, 18):
        pytest.skip("runs on 15 <-> 18")
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    proxy = tcp_proxy(src)
    d = _start_streaming(src, dst, daemons, source_dsn=proxy.dsn_for(src.dsn),
                         env={"PGFERRY_FALLBACK_MAX_WAL": str(4 << 20)})
    _cut_over_with_fallback(src, dst, d)
    dst.execute("INSERT INTO w VALUES (1, 'before')")
    wait_for(lambda: src.execute("SELECT count(*) FROM w") == [(1,)], 60, "the reverse stream")
    proxy.close()  # the old source is gone for the daemon
    for i in range(8):  # ~8 MB of WAL on the new server
        dst.execute(f"INSERT INTO w SELECT g, repeat('x', 1000) FROM generate_series({i * 1000 + 2}, "
                    f"{i * 1000 + 1001}) g")
        if not d.running():
            break
    assert d.wait_exit(timeout=90) == 1, d.output()
    assert "fallback_max_wal" in d.output() and "the way back is gone" in d.output(), d.output()
    assert dst.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry_fallback'") == [(0,)]
    st = _status(src, dst)
    assert st["fallback"]["state"] == "dropped" and "fallback_max_wal" in st["fallback"]["why"], st


def test_a_column_added_on_the_new_server_streams_back(pair, daemons):
    """Schema changes on the new server after the cutover are not captured there, but what the
    stream shows is followed: a column added to a migrated table (and its values) reaches the old
    source, through its fence, and a rollback hands it back with the rows."""
    src, dst = pair
    _reverse_pair(src, dst)
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    d = _start_streaming(src, dst, daemons)
    _cut_over_with_fallback(src, dst, d)
    dst.execute("ALTER TABLE w ADD COLUMN extra int")
    dst.execute("INSERT INTO w VALUES (1, 'a', 10), (2, 'b', NULL)")
    wait_for(lambda: src.execute("SELECT count(*) FROM w")[0][0] == 2 or not d.running(), 60, "the reverse stream")
    assert d.running(), d.output()
    assert src.execute("SELECT id, v, extra FROM w ORDER BY id") == [(1, "a", 10), (2, "b", None)]
    r = pgferry("rollback", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    assert json.loads(r.stdout)["ok"]


def test_a_cutover_that_fails_after_making_the_fallback_drops_it(pair, daemons):
    """The switch command fails after the reverse slot was made: the undo drops the slot and the
    publication (they would keep the target's WAL), lifts the fence, and the daemon that waited to
    turn around exits; `start` streams forward again."""
    src, dst = pair
    _reverse_pair(src, dst)
    if (src.version, dst.version) != (15, 18):
        pytest.skip("runs on 15 -> 18")
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    d = _start_streaming(src, dst, daemons)
    r = pgferry("cutover", "--fallback", "--source", src.dsn, "--target", dst.dsn, "--switch-command", "exit 3")
    assert r.returncode == 1 and "switch command failed" in r.stderr, r.stderr
    assert "dropped the fallback's slot pgferry_fallback" in r.stderr, r.stderr
    assert dst.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgferry_fallback'") == [(0,)]
    assert dst.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'pgferry_fallback'") == [(0,)]
    assert d.wait_exit(timeout=30) == 0, d.output()
    assert "streaming back" not in d.output()
    src.execute("INSERT INTO w VALUES (1, 'writable again')")
    d.start()
    d.wait_caught_up()
    assert dst.execute("SELECT v FROM w") == [("writable again",)]
