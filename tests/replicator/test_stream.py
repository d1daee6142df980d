"""`pgferry start` streaming into a target: exactly-once, in order, across restarts and crashes."""

from __future__ import annotations

import random
import threading
import time

import pytest

from replicator.local.servers import LocalServer
from tests.pgplugin import (
    Daemon,
    assert_same_tables,
    hold_flags,
    main_pair_only,
    new_db,
    publish_same_table,
    slow_inserts_under_a_timeout,
    wait_for,
)
from tests.replicator import workload as wl

pytestmark = pytest.mark.pg

SMALL_WORK_MEM = " options='-c logical_decoding_work_mem=64kB'"


def test_randomized_workload_arrives_exactly_once(role_pair, daemons):
    src, dst = role_pair
    wl.setup(src, dst)
    d = Daemon(src, dst, *hold_flags(dst), source_dsn=src.dsn + SMALL_WORK_MEM)
    daemons.append(d)
    wl.write(src, 300, big_every=100, seed=1)
    d.wait_caught_up()
    assert_same_tables(src, dst, wl.TABLES)
    assert d.stop() == 0, d.output()
    out = d.output()
    assert "Traceback" not in out and "not found on the target" not in out, out
    assert out.count("applying streamed transaction") == 3, out  # the big transactions came streamed
    # the feedback moved the slot as far as the target's progress
    (confirmed,) = src.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots "
                               "WHERE slot_name = 'pgferry'")[0]
    assert int(confirmed) >= d.progress() > 0


def _run_in_thread(fn, *args, **kwargs):
    errors: list[BaseException] = []

    def target():
        try:
            fn(*args, **kwargs)
        except BaseException as exc:  # surfaced by join()
            errors.append(exc)

    th = threading.Thread(target=target, daemon=True)
    th.start()

    def join(timeout: float = 60, db=None) -> None:
        th.join(timeout)
        if th.is_alive() and db is not None:
            activity = db.execute("SELECT pid, backend_type, state, wait_event_type, wait_event, left(query, 80) "
                                  "FROM pg_stat_activity WHERE datname = current_database()")
            raise AssertionError(f"workload did not finish; source sessions: {activity}")
        assert not th.is_alive(), "workload did not finish"
        if errors:
            raise errors[0]
    return th, join


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(role_pair, daemons):
    src, dst = role_pair
    wl.setup(src, dst)
    dsn = src.dsn + SMALL_WORK_MEM
    d = Daemon(src, dst, "--batch-rows", "50", *hold_flags(dst), source_dsn=dsn)
    daemons.append(d)
    w = wl.Workload(src, seed=2)
    stop = threading.Event()
    th, join = _run_in_thread(w.run, 100_000, 400, stop=stop)
    rnd = random.Random(7)
    kills = 0
    try:
        while th.is_alive() and kills < 6 and d.running():
            time.sleep(rnd.uniform(0.2, 0.9))  # the moment of the kill, not a wait for a condition
            d.kill()
            kills += 1
            d.start()
        stop.set()
        join(db=src)
    finally:
        w.close()
    assert kills == 6
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, wl.TABLES)
    assert d.stop() == 0


@pytest.mark.parametrize("side", ["source", "target"])
def test_network_cuts_mid_stream_recover_without_loss(pair, daemons, tcp_proxy, side):
    src, dst = pair
    wl.setup(src, dst)
    proxy = tcp_proxy(src if side == "source" else dst)
    dsns = {"source_dsn": src.dsn + SMALL_WORK_MEM, "target_dsn": dst.dsn}
    key = "source_dsn" if side == "source" else "target_dsn"
    dsns[key] = proxy.dsn_for(dsns[key])
    d = Daemon(src, dst, "--batch-rows", "50", **dsns)
    daemons.append(d)
    w = wl.Workload(src, seed=3)
    stop = threading.Event()
    th, join = _run_in_thread(w.run, 100_000, 400, stop=stop)
    cuts = 0
    try:
        while th.is_alive() and cuts < 4 and d.running():
            time.sleep(0.4)  # the moment of the cut
            made = proxy.connections_made
            if proxy.cut():
                cuts += 1
                # the next cut only once pgferry has reconnected
                wait_for(lambda m=made: proxy.connections_made > m or not d.running(), 30, "pgferry to reconnect")
        stop.set()
        join(db=src)
    finally:
        w.close()
    assert cuts == 4, d.output()
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, wl.TABLES)
    assert d.stop() == 0
    out = d.output()
    assert "retrying" in out and "reconnected after" in out and "Traceback" not in out, out


def test_walsender_and_target_session_terminated_then_servers_restarted(pair, daemons):
    """Each fault mid-workload: the walsender killed, pgferry's target session killed, the source
    restarted, the target crash-restarted. pgferry retries and the tables end up equal."""
    src0, dst0 = pair
    src_server = LocalServer(src0.version, name="restart-src-").start()
    dst_server = LocalServer(dst0.version, name="restart-dst-").start()
    try:
        src, dst = new_db(src_server, "src"), new_db(dst_server, "dst")
        wl.setup(src, dst)
        d = Daemon(src, dst, "--batch-rows", "50", source_dsn=src.dsn + SMALL_WORK_MEM)
        daemons.append(d)
        w = wl.Workload(src, seed=4)
        faults = [
            lambda: src.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                                "WHERE slot_name = 'pgferry' AND active_pid IS NOT NULL"),
            lambda: dst.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = 'pgferry' AND pid <> pg_backend_pid()"),
            lambda: src_server.restart("fast"),
            lambda: dst_server.restart("immediate"),
        ]
        try:
            for fault in faults:
                w.run(150)
                before = d.output().count("reconnected after")
                fault()
                if fault is faults[2]:
                    w.close()  # the workload's own session died with the server
                    w = wl.Workload(src, seed=5)
                    w.ids, w.next_id = wl.current_ids(src)


                def reconnected(b: int = before, w: wl.Workload = w) -> bool:
                    w.run(3)  # keep writing: an idle pgferry notices a dead target session only when it writes
                    return d.output().count("reconnected after") > b or not d.running()
                wait_for(reconnected, 60, "pgferry to reconnect")
            w.run(150)
        finally:
            w.close()
        d.wait_caught_up(timeout=120)
        assert_same_tables(src, dst, wl.TABLES)
        assert d.stop() == 0
        assert "Traceback" not in d.output()
    finally:
        for x in daemons:
            x.close()
        src_server.cleanup()
        dst_server.cleanup()


def test_keepalives_answered_while_a_long_streamed_transaction_is_applied(pair, daemons):
    """wal_sender_timeout of 2 s: replaying a large streamed transaction takes longer than that,
    so pgferry must keep answering the walsender, or the connection would be cut and retried forever."""
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    d = Daemon(src, dst, source_dsn=src.dsn + " options='-c logical_decoding_work_mem=64kB -c wal_sender_timeout=2s'")
    daemons.append(d)
    src.execute("INSERT INTO t SELECT g, repeat('v', 50) FROM generate_series(1, 60000) g")
    d.wait_caught_up(timeout=180)
    assert_same_tables(src, dst, {"t": ["id", "v"]})
    out = d.output()
    assert "applying streamed transaction" in out and "retrying" not in out, out


def test_the_targets_statement_timeout_does_not_cancel_the_apply(pair, daemons):
    """A target whose statement_timeout (meant for its applications) is shorter than one apply
    statement: pgferry's session turns it off, as native apply is not cancelled by it either; the
    batch would otherwise be cancelled and retried forever. A trigger enabled ALWAYS (it fires under
    session_replication_role = replica too) makes the insert slow."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    slow_inserts_under_a_timeout(dst, "t", always=True)
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    d.wait_caught_up(timeout=30)
    assert_same_tables(src, dst, {"t": ["id", "v"]})
    out = d.output()
    assert "statement timeout" not in out and "retrying" not in out, out


def test_the_sources_timeouts_do_not_end_the_stream(pair, daemons):
    """A walsender runs transactions too: decoding a big transaction looks up the catalog in one.
    A source database with short timeouts for its applications (transaction_timeout on 17+ ended
    the stream at every retry of that transaction, forever) must not stop pgferry's stream."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    settings = ["statement_timeout", "idle_in_transaction_session_timeout"]
    settings += ["transaction_timeout"] if src.server.version >= 17 else []
    for setting in settings:
        src.execute(f"ALTER DATABASE {src.name} SET {setting} = '100ms'")
    d = Daemon(src, dst)
    daemons.append(d)
    # the application's big transaction, its own session exempt
    src.execute("; ".join(f"SET {setting} = 0" for setting in settings) +
                "; INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 300000) g")
    d.wait_caught_up(timeout=120)
    src.execute(f"ALTER DATABASE {src.name} RESET ALL")
    assert_same_tables(src, dst, {"t": ["id", "v"]})
    out = d.output()
    assert "timeout" not in out and "retrying" not in out, out


def test_the_targets_idle_session_timeout_does_not_drop_the_apply_connection(pair, daemons):
    """A target that ends idle sessions (idle_session_timeout, 14+): the apply's connection idles
    whenever the source is quiet, and was ended and reopened each time ("connection lost")."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY)")
    dst.execute(f"ALTER DATABASE {dst.name} SET idle_session_timeout = '300ms'")
    d = Daemon(src, dst)
    daemons.append(d)
    for i in range(3):
        src.execute("INSERT INTO t VALUES (%s)", (i,))
        d.wait_caught_up()
        time.sleep(1)  # quiet source: the apply's connection idles past the target's limit
    src.execute("INSERT INTO t VALUES (3)")
    d.wait_caught_up()
    dst.execute(f"ALTER DATABASE {dst.name} RESET idle_session_timeout")
    assert dst.execute("SELECT count(*) FROM t") == [(4,)]
    out = d.output()
    assert "idle-session timeout" not in out and "retrying" not in out, out


def _write_through_a_black_hole(src, d, proxy, n: int, seed: int, notice: str) -> None:
    """n workload transactions, the path black-holed, n more (pgferry must log `notice`), the path
    back, n more; then wait until pgferry has applied everything."""
    w = wl.Workload(src, seed=seed)
    try:
        w.run(n)
        d.wait_caught_up()
        proxy.blackhole(True)
        w.run(n)  # written while the path is dead: pgferry's next reads or statements go nowhere
        wait_for(lambda: notice in d.output(), 30, f"pgferry to log {notice!r}")
        proxy.blackhole(False)
        w.run(n)
    finally:
        w.close()
    d.wait_caught_up(timeout=120)


def test_black_holed_source_connection_is_noticed_and_reopened(pair, daemons, tcp_proxy):
    """The proxy stops forwarding without closing anything: no RST, no error, just silence.
    pgferry must notice within --network-timeout, not hang, and resume once the path is back."""
    src, dst = pair
    wl.setup(src, dst)
    proxy = tcp_proxy(src)
    d = Daemon(src, dst, "--network-timeout", "4", source_dsn=proxy.dsn_for(src.dsn))
    daemons.append(d)
    _write_through_a_black_hole(src, d, proxy, 100, seed=8, notice="no message from the source")
    assert_same_tables(src, dst, wl.TABLES)
    assert d.stop() == 0
    assert "reconnected after" in d.output()


def test_black_holed_target_connection_is_noticed_and_reopened(pair, daemons, tcp_proxy):
    """Same on the target side: a statement sent into the silence would wait forever. pgferry's
    watchdog sees it waiting for --network-timeout, finds that a new connection fails too, and
    reconnects; once the path is back everything is applied."""
    src, dst = pair
    main_pair_only(src, dst)
    wl.setup(src, dst)
    proxy = tcp_proxy(dst)
    d = Daemon(src, dst, "--network-timeout", "3", target_dsn=proxy.dsn_for(dst.dsn))
    daemons.append(d)
    _write_through_a_black_hole(src, d, proxy, 50, seed=9, notice="presumed dead")
    assert_same_tables(src, dst, wl.TABLES)
    assert d.stop() == 0
    out = d.output()
    assert "no answer from the target for" in out and "reconnected after" in out and "Traceback" not in out, out


@pytest.mark.parametrize("failpoint", ["after_apply_before_commit", "after_commit_before_feedback", "during_spool"])
def test_failpoints_exit_abruptly_and_restart_loses_nothing(pair, daemons, failpoint, tmp_path):
    src, dst = pair
    main_pair_only(src, dst, "the failpoint scenarios run on 15 -> 18 (the main case); the SIGKILL test covers "
                             "all pairs")
    wl.setup(src, dst)
    d = Daemon(src, dst, "--batch-rows", "50", "--spool-dir", str(tmp_path), source_dsn=src.dsn + SMALL_WORK_MEM,
               env={"PGFERRY_FAILPOINT": failpoint})
    daemons.append(d)
    w = wl.Workload(src, seed=9)
    try:
        w.run(200, big_every=100)
        assert d.wait_exit(timeout=60) == 99, d.output()
        assert f"failpoint {failpoint} reached" in d.output()
        # the process that died could not remove its spool directory; the next start does
        (left,) = tmp_path.glob("pgferry-spool-*")
        if failpoint == "during_spool":
            assert [f.stat().st_size > 0 for f in left.glob("*.spool")] == [True], list(left.iterdir())
        w.run(100, big_every=50)  # more while it is down
        d.env.pop("PGFERRY_FAILPOINT")
        d.start()
        w.run(100)
    finally:
        w.close()
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, wl.TABLES)
    assert not left.exists() and len(list(tmp_path.glob("pgferry-spool-*"))) == 1  # the running daemon's
    assert d.stop() == 0
    assert not list(tmp_path.iterdir())
