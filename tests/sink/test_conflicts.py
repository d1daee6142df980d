"""Conflict policies, the dead-letter table, hooks and `pgferry skip`, with batching on.

Every test builds its backlog while the daemon is stopped, so the restarted daemon applies it in
large set-based batches (unless it says otherwise)."""

from __future__ import annotations

import re

import pytest

from tests.pgplugin import Daemon, Db, new_db, pgferry

pytestmark = pytest.mark.pg

BIG = ("--batch-rows", "100000", "--batch-ms", "5000")

SOURCE_ROWS = "INSERT INTO t VALUES (2, 'two', 1), (3, 'three', 1), (10, 'ten', 1)"
TARGET_ROWS = "INSERT INTO t VALUES (1, 'target', 5), (4, 'target', 9), (10, 'ten', 1)"
BACKLOG = [
    "INSERT INTO t VALUES (20, 'a', 1)",
    "INSERT INTO t VALUES (1, 'source', 7)",  # insert_exists: the target's row is older (ver 5)
    "INSERT INTO t VALUES (4, 'source', 1)",  # insert_exists: the target's row is newer (ver 9)
    "UPDATE t SET v = 'two-new', ver = 2 WHERE id = 2",  # update_missing
    "DELETE FROM t WHERE id = 3",  # delete_missing
    "INSERT INTO t VALUES (21, 'b', 1)",
    "UPDATE t SET v = 'ten-new' WHERE id = 10",
]


def _setup(src: Db, dst: Db, tmp_path, conflicts: str, *args: str, slot: str = "pgferry") -> Daemon:
    if not src.execute("SELECT 1 FROM pg_publication WHERE pubname = 'pgferry'"):
        src.execute("CREATE TABLE t (id int PRIMARY KEY, v text, ver int); CREATE PUBLICATION pgferry FOR ALL TABLES")
        src.execute(SOURCE_ROWS)
    dst.execute("CREATE TABLE t (id int PRIMARY KEY, v varchar(10), ver int)")
    dst.execute(TARGET_ROWS)
    cfg = tmp_path / f"{slot}.toml"
    cfg.write_text(conflicts)
    d = Daemon(src, dst, "--config", str(cfg), "--slot", slot, *args, ready=False)
    d.wait_ready(slot=slot)
    assert d.stop() == 0  # the slot exists: what follows is the backlog
    return d


def _rows(dst: Db) -> list[tuple]:
    return dst.execute("SELECT id, v, ver FROM t ORDER BY id")


def _dead(dst: Db) -> list[tuple]:
    return dst.execute("SELECT kind, key->>'id', resolution FROM pgferry.conflicts ORDER BY id")


def _write_backlog(src: Db) -> None:
    for sql in BACKLOG:
        src.execute(sql)


def _caught_up(src: Db, dst: Db, tmp_path, daemons: list, config: str) -> Daemon:
    """A daemon with `config` that has applied the whole BACKLOG."""
    d = _setup(src, dst, tmp_path, config, *BIG)
    daemons.append(d)
    _write_backlog(src)
    d.start().wait_ready()
    d.wait_caught_up()
    return d


def _lsn_of(out: str) -> str:
    m = re.search(r"pgferry skip --lsn (\S+?)[;.]? ", out)
    assert m, out
    return m.group(1)


def test_skip_policies_keep_the_target_and_record_every_conflict(pair, daemons, tmp_path):
    src, dst = pair
    _caught_up(src, dst, tmp_path, daemons, '[conflicts]\ninsert_exists = "skip"\n')
    assert _rows(dst) == [(1, "target", 5), (4, "target", 9), (10, "ten-new", 1), (20, "a", 1), (21, "b", 1)]
    # one row per conflict (within a batch, deletes are written before updates and inserts)
    assert sorted(_dead(dst)) == [("delete_missing", "3", "skipped"), ("insert_exists", "1", "kept the target row"),
                                  ("insert_exists", "4", "kept the target row"), ("update_missing", "2", "skipped")]
    row = dst.execute("SELECT old_row, new_row, target_row, lsn IS NOT NULL, xid IS NOT NULL FROM pgferry.conflicts "
                      "WHERE kind = 'insert_exists' AND key->>'id' = '1'")[0]
    assert row == (None, {"id": "1", "v": "source", "ver": "7"}, {"id": 1, "v": "target", "ver": 5}, True, True)
    st = pgferry("status", "--json", "--source", src.dsn, "--target", dst.dsn)
    assert '"conflicts":4' in st.stdout and '{"table":"public.t","kind":"insert_exists","count":2}' in st.stdout


def test_overwrite_and_keep_newer(pair, daemons, tmp_path):
    src, dst = pair
    other = new_db(dst.server, "dst2")
    try:
        d1 = _setup(src, dst, tmp_path, '[conflicts]\ninsert_exists = "overwrite"\nupdate_missing = "overwrite"\n',
                    *BIG)
        d2 = _setup(src, other, tmp_path, '[conflicts]\ninsert_exists = "keep-newer"\nnewer_column = "ver"\n',
                    *BIG, slot="second")
        daemons += [d1, d2]
        _write_backlog(src)
        for d in (d1, d2):
            d.start().wait_ready(slot=d.cmd[d.cmd.index("--slot") + 1])
        d1.wait_caught_up()
        d2.wait_caught_up(slot="second")
        assert _rows(dst) == [(1, "source", 7), (2, "two-new", 2), (4, "source", 1), (10, "ten-new", 1),
                              (20, "a", 1), (21, "b", 1)]
        assert ("update_missing", "2", "inserted the source row") in _dead(dst)
        assert _rows(other) == [(1, "source", 7), (4, "target", 9), (10, "ten-new", 1), (20, "a", 1), (21, "b", 1)]
        assert sorted(r for r in _dead(other) if r[0] == "insert_exists") == [
            ("insert_exists", "1", "overwrote the target row (ver newer on the source)"),
            ("insert_exists", "4", "kept the target row (ver not older on the target)")]
    finally:
        for d in daemons:
            d.close()
        other.drop()  # the source's slots go with the source database


def test_error_stops_at_the_transaction_and_skip_moves_past_it(pair, daemons, tmp_path):
    src, dst = pair
    d = _setup(src, dst, tmp_path, "", *BIG)  # defaults: insert_exists = error
    daemons.append(d)
    _write_backlog(src)
    d.start()
    assert d.wait_exit() == 1
    out = d.output()
    assert "conflict insert_exists on key {\"id\":\"1\"}" in out and "Traceback" not in out, out
    # the transaction before the failing one is committed, nothing after it
    assert _rows(dst) == [(1, "target", 5), (4, "target", 9), (10, "ten", 1), (20, "a", 1)]
    assert [r[:2] for r in _dead(dst)] == [("insert_exists", "1")]
    first = _lsn_of(out)
    r = pgferry("skip", "--lsn", first, "--target", dst.dsn)
    assert r.returncode == 0 and first in r.stdout, r.stderr
    d.start()
    assert d.wait_exit() == 1  # the next insert_exists (id 4) stops it again
    second = _lsn_of(d.output().split("skipping source transaction")[-1])
    assert second != first
    assert pgferry("skip", "--lsn", second, "--target", dst.dsn).returncode == 0
    d.start().wait_ready()
    d.wait_caught_up()
    assert _rows(dst) == [(1, "target", 5), (4, "target", 9), (10, "ten-new", 1), (20, "a", 1), (21, "b", 1)]
    assert sorted(r[:2] for r in _dead(dst)) == [("delete_missing", "3"), ("insert_exists", "1"),
                                                 ("insert_exists", "4"), ("update_missing", "2")]
    assert pgferry("skip", "--lsn", "not-an-lsn", "--target", dst.dsn).returncode == 2


def test_skipping_the_last_transaction_commits_its_mark(pair, daemons, tmp_path):
    """`pgferry skip` of a transaction nothing follows: its mark is done with the progress past it
    (it was written in a batch with no rows, which was rolled back with it)."""
    src, dst = pair
    d = _setup(src, dst, tmp_path, "", *BIG)
    daemons.append(d)
    src.execute("INSERT INTO t VALUES (1, 'source', 7)")  # insert_exists: the last change there is
    d.start()
    assert d.wait_exit() == 1
    lsn = _lsn_of(d.output())
    assert pgferry("skip", "--lsn", lsn, "--target", dst.dsn).returncode == 0
    d.start().wait_ready()
    d.wait_caught_up()
    assert dst.execute("SELECT done_at IS NOT NULL FROM pgferry.skip WHERE lsn = %s::pg_lsn", (lsn,)) == [(True,)]
    assert _rows(dst) == [(1, "target", 5), (4, "target", 9), (10, "ten", 1)]
    assert d.stop() == 0
    src.execute("INSERT INTO t VALUES (30, 'after', 1)")  # and a restart goes on past it, once
    d.start().wait_ready()
    d.wait_caught_up()
    assert _rows(dst)[-1] == (30, "after", 1) and d.output().count("skipping source transaction") == 1


def test_delete_missing_error_and_apply_error_skip(pair, daemons, tmp_path):
    src, dst = pair
    d = _setup(src, dst, tmp_path, '[conflicts]\ninsert_exists = "skip"\napply_error = "skip"\n'
                                   '[conflicts.tables."public.t"]\ndelete_missing = "error"\n', *BIG)
    daemons.append(d)
    src.execute("INSERT INTO t VALUES (30, 'a value far too long for the target', 1)")  # apply_error
    src.execute("INSERT INTO t VALUES (31, 'ok', 1)")
    src.execute("DELETE FROM t WHERE id = 3")  # delete_missing -> error (table policy)
    src.execute("INSERT INTO t VALUES (32, 'late', 1)")
    d.start()
    assert d.wait_exit() == 1
    out = d.output()
    assert "conflict delete_missing" in out, out
    assert _rows(dst) == [(1, "target", 5), (4, "target", 9), (10, "ten", 1), (31, "ok", 1)]
    dead = dst.execute("SELECT kind, resolution, detail FROM pgferry.conflicts ORDER BY id")
    assert dead[0][0] == "apply_error" and dead[0][1] == "skipped" and "value too long" in dead[0][2], dead
    assert dead[1][:2] == ("delete_missing", "stopped: policy error for delete_missing"), dead


def test_hook_decides_every_conflict_and_a_raising_hook_stops(pair, daemons, tmp_path):
    src, dst = pair
    d = _caught_up(src, dst, tmp_path, daemons, '[conflicts]\nhook = "tests.sink.conflict_hooks:resolve"\n')
    assert _rows(dst) == [(1, "source", 7), (2, "from-hook", 3), (4, "target", 9), (10, "ten-new", 1), (20, "a", 1),
                          (21, "b", 1)]
    assert sorted(_dead(dst)) == sorted([("insert_exists", "1", "overwrote the target row"),
                                         ("insert_exists", "4", "kept the target row"),
                                         ("update_missing", "2", "inserted the source row"),
                                         ("delete_missing", "3", "skipped")])
    assert d.stop() == 0
    cfg = tmp_path / "raising.toml"
    cfg.write_text('[conflicts]\nhook = "tests.sink.conflict_hooks:refuse"\n')
    d2 = Daemon(src, dst, "--config", str(cfg), ready=False)
    daemons.append(d2)
    dst.execute("INSERT INTO t VALUES (50, 'target', 1)")
    src.execute("INSERT INTO t VALUES (50, 'source', 1)")  # insert_exists: the hook raises
    assert d2.wait_exit() == 1
    assert "the conflict hook raised ValueError: nope: insert_exists" in d2.output(), d2.output()


def test_batching_does_not_change_outcomes(pair, daemons, tmp_path):
    src, dst = pair
    other = new_db(dst.server, "dst2")
    policy = '[conflicts]\ninsert_exists = "keep-newer"\nnewer_column = "ver"\nupdate_missing = "overwrite"\n'
    try:
        batched = _setup(src, dst, tmp_path, policy, *BIG)
        one_by_one = _setup(src, other, tmp_path, policy, "--batch-rows", "1", slot="single")
        daemons += [batched, one_by_one]
        _write_backlog(src)
        src.execute("BEGIN; UPDATE t SET ver = 8 WHERE id = 1; INSERT INTO t VALUES (40, 'x', 1); "
                    "UPDATE t SET v = 'y' WHERE id = 40; DELETE FROM t WHERE id = 21; COMMIT")
        batched.start().wait_ready()
        one_by_one.start().wait_ready(slot="single")
        batched.wait_caught_up()
        one_by_one.wait_caught_up(slot="single")
        assert _rows(dst) == _rows(other)
        assert sorted(_dead(dst)) == sorted(_dead(other))
    finally:
        for d in daemons:
            d.close()
        other.drop()  # the source's slots go with the source database


@pytest.mark.parametrize("how", ["policy", "hook"])
def test_update_missing_error_from_a_policy_or_a_hook(pair, daemons, tmp_path, how):
    src, dst = pair
    conflicts = ('[conflicts]\ninsert_exists = "skip"\nupdate_missing = "error"\n' if how == "policy" else
                 '[conflicts]\nhook = "tests.sink.conflict_hooks:refuse_updates"\n')
    d = _setup(src, dst, tmp_path, conflicts, *BIG)
    daemons.append(d)
    _write_backlog(src)
    d.start()
    assert d.wait_exit() == 1
    out = d.output()
    why = "policy error for update_missing" if how == "policy" else "updates must find their row"
    assert f'conflict update_missing on key {{"id":"2"}}: {why}' in out and "pgferry skip --lsn" in out, out
    # everything before the update's transaction is in (insert_exists skipped), nothing from it on
    assert _rows(dst) == [(1, "target", 5), (4, "target", 9), (10, "ten", 1), (20, "a", 1)]
    assert ("update_missing", "2", f"stopped: {why}") in _dead(dst)
