"""`pgferry start` streaming into a target: exactly-once, in order, across restarts and crashes."""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.pgplugin import Daemon, assert_same_tables, wait_for
from tests.replicator import workload as wl

pytestmark = pytest.mark.pg

SMALL_WORK_MEM = " options='-c logical_decoding_work_mem=64kB'"


def test_randomized_workload_arrives_exactly_once(pair, daemons):
    src, dst = pair
    wl.setup(src, dst)
    d = Daemon(src, dst, source_dsn=src.dsn + SMALL_WORK_MEM)
    daemons.append(d)
    w = wl.Workload(src, seed=1)
    try:
        w.run(300, big_every=100)
    finally:
        w.close()
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


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(pair, daemons):
    src, dst = pair
    wl.setup(src, dst)
    dsn = src.dsn + SMALL_WORK_MEM
    d = Daemon(src, dst, "--batch-rows", "50", source_dsn=dsn)
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
