"""Set-based apply of folded batches on real servers: the result equals one-by-one apply.

Each test builds a backlog while the daemon is stopped, so the restarted daemon applies it in
large batches where many changes hit the same rows."""

from __future__ import annotations

import pytest

from tests.pgplugin import Daemon, assert_same_tables, hold_flags, publish_same_table
from tests.replicator import workload as wl

pytestmark = pytest.mark.pg

BIG_BATCHES = ("--batch-rows", "100000", "--batch-ms", "5000")


def test_a_folded_backlog_equals_the_source(role_pair, daemons):
    src, dst = role_pair
    wl.setup(src, dst)
    d = Daemon(src, dst, *BIG_BATCHES, *hold_flags(dst))
    daemons.append(d)
    assert d.stop() == 0
    wl.write(src, 400, big_every=0, seed=7)
    d.start().wait_ready()
    d.wait_caught_up()
    assert_same_tables(src, dst, wl.TABLES)
    assert d.stop() == 0
    out = d.output()
    assert "Traceback" not in out and "not found on the target" not in out, out


def test_a_unique_swap_that_fails_set_based_is_reapplied_in_source_order(role_pair, daemons):
    src, dst = role_pair
    ddl = "CREATE TABLE u (id int PRIMARY KEY, email text UNIQUE, n int)"
    publish_same_table(src, dst, ddl)
    src.execute("INSERT INTO u VALUES (1, 'a', 0), (2, 'b', 0)")
    dst.execute("INSERT INTO u VALUES (1, 'a', 0), (2, 'b', 0)")
    d = Daemon(src, dst, *BIG_BATCHES)
    daemons.append(d)
    assert d.stop() == 0
    for sql in ("UPDATE u SET email = 'tmp' WHERE id = 1", "UPDATE u SET email = 'a' WHERE id = 2",
                "UPDATE u SET email = 'b' WHERE id = 1", "INSERT INTO u VALUES (3, 'c', 1)",
                "UPDATE u SET n = n + 1"):
        src.execute(sql)
    d.start().wait_ready()
    d.wait_caught_up()
    assert dst.execute("SELECT id, email, n FROM u ORDER BY id") == [(1, "b", 1), (2, "a", 1), (3, "c", 2)]
    assert d.stop() == 0
    out = d.output()
    assert "applying one transaction per batch" in out and "Traceback" not in out, out


def test_a_rejected_change_in_a_folded_batch_is_pinned_to_its_transaction(role_pair, daemons):
    src, dst = role_pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute("CREATE TABLE t (id int PRIMARY KEY, v varchar(5))")
    d = Daemon(src, dst, *BIG_BATCHES)
    daemons.append(d)
    assert d.stop() == 0
    for i in range(1, 51):
        src.execute("INSERT INTO t VALUES (%s, 'ok')", (i,))
        src.execute("UPDATE t SET v = 'ok2' WHERE id = %s", (i,))
    (xid,) = src.execute("INSERT INTO t VALUES (51, 'far too long') RETURNING txid_current()")[0]
    src.execute("INSERT INTO t VALUES (52, 'late')")
    d.start()
    assert d.wait_exit() == 1
    out = d.output()
    assert "value too long" in out and f"xid {xid}" in out and "Traceback" not in out, out
    # everything before the failing transaction is in, nothing after it
    assert dst.execute("SELECT count(*), min(v), max(v), max(id) FROM t") == [(50, "ok2", "ok2", 50)]


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_memory_stays_bounded_for_a_transaction_far_larger_than_a_batch(pair, daemons):
    src, dst = pair
    ddl = "CREATE TABLE wide (id int PRIMARY KEY, pad text)"
    publish_same_table(src, dst, ddl)
    d = Daemon(src, dst)
    daemons.append(d)
    # 200,000 rows of 1 kB in ONE transaction (~220 MB): streamed, spooled, then applied
    src.execute("INSERT INTO wide SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, 200000) g")
    src.execute("UPDATE wide SET pad = 'x' || pad WHERE id % 2 = 0")
    d.wait_caught_up(timeout=240)
    assert dst.execute("SELECT count(*), count(*) FILTER (WHERE pad LIKE 'x%') FROM wide") == [(200000, 100000)]
    assert_same_tables(src, dst, {"wide": ["id", "pad"]})
    assert d.proc is not None
    peak = _peak_rss_mb(d.proc.pid)
    assert peak < 300, f"pgferry's peak RSS was {peak:.0f} MB for a 220 MB transaction (bound: 300 MB)"
