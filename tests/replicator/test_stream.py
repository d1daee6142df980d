"""`pgferry start` streaming into a target: exactly-once, in order, across restarts and crashes."""

from __future__ import annotations

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
