"""The change-by-change path in one round trip per many statements (state.APPLY_EACH): updates
and deletes of a REPLICA IDENTITY FULL table, in order, with rows not found and a rejected change
named exactly as one statement per round trip names them."""

from __future__ import annotations

import pytest

from tests.pgplugin import Daemon, assert_same_tables

pytestmark = pytest.mark.pg

BIG_BATCHES = ("--batch-rows", "100000", "--batch-ms", "5000")


def _setup(src, dst, target_v: str = "text") -> None:
    src.execute("CREATE TABLE f (id int, v text); ALTER TABLE f REPLICA IDENTITY FULL; "
                "CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute(f"CREATE TABLE f (id int, v {target_v})")
    for db in (src, dst):
        db.execute("INSERT INTO f SELECT g, 'start' FROM generate_series(1, 300) g")


def test_full_identity_updates_and_deletes_in_order_with_rows_not_found(role_pair, daemons):
    src, dst = role_pair
    _setup(src, dst)
    dst.execute("DELETE FROM f WHERE id IN (7, 8)")  # the target lost two rows: their changes find nothing
    d = Daemon(src, dst, *BIG_BATCHES)
    daemons.append(d)
    assert d.stop() == 0
    src.execute("UPDATE f SET v = 'a' WHERE id <= 100")  # 100 statements in one source transaction
    for i in range(1, 60):  # one row changed over and over, in many transactions: order matters
        src.execute("UPDATE f SET v = %s WHERE id = 5", (f"step {i}",))
    src.execute("DELETE FROM f WHERE id BETWEEN 200 AND 250")
    src.execute("UPDATE f SET v = 'gone?' WHERE id = 7")
    src.execute("DELETE FROM f WHERE id = 8")
    d.start().wait_ready()
    d.wait_caught_up()
    dst.execute("INSERT INTO f VALUES (7, 'gone?')")  # what the skipped update would have left
    assert_same_tables(src, dst, {"f": ["id", "v"]})
    kinds = sorted(k for (k,) in dst.execute("SELECT kind FROM pgferry.conflicts"))
    # ids 7 and 8 in the first update, 7 again, and the delete of 8
    assert kinds == ["delete_missing", "update_missing", "update_missing", "update_missing"], kinds
    assert dst.execute("SELECT to_regprocedure('pgferry.apply_each_v2(text[])') IS NOT NULL")[0][0]
    assert d.stop() == 0


def test_a_rejected_statement_among_many_is_named_and_those_before_it_commit(role_pair, daemons):
    src, dst = role_pair
    _setup(src, dst, "varchar(8)")
    d = Daemon(src, dst, *BIG_BATCHES)
    daemons.append(d)
    assert d.stop() == 0
    for i in range(1, 41):
        src.execute("UPDATE f SET v = %s WHERE id = %s", (f"ok {i}", i))
    (xid,) = src.execute("UPDATE f SET v = 'far too long' WHERE id = 50 RETURNING txid_current()")[0]
    src.execute("UPDATE f SET v = 'late' WHERE id = 60")
    d.start()
    assert d.wait_exit() == 1
    out = d.output()
    assert "value too long" in out and f"xid {xid}" in out and "public.f" in out and "Traceback" not in out, out
    assert dst.execute("SELECT count(*) FROM f WHERE v LIKE 'ok %'")[0][0] == 40
    assert dst.execute("SELECT v FROM f WHERE id IN (50, 60) ORDER BY id") == [("start",), ("start",)]
