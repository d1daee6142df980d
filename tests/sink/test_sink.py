"""The sink in process, on a real target connection: what the stream loop calls (open, relation,
begin, apply, commit, flush) with decoded messages made here, and what lands on the target."""

from __future__ import annotations

import psycopg2
import pytest

from decoder import Column, Delete, Insert, Lsn, Relation, Update
from sink.apply import BatchLimits, Sink
from sink.errors import ApplyError
from sink.stats import SinkStats
from tests.pgplugin import Db, wait_for

pytestmark = pytest.mark.pg

OID = 4242


def _rel(identity: str = "d") -> Relation:
    return Relation(xid=None, oid=OID, namespace="public", name="t", replica_identity=identity, columns=(
        Column(flags=1, name="id", type_oid=23, type_modifier=-1),
        Column(flags=1 if identity == "f" else 0, name="v", type_oid=25, type_modifier=-1)))


def _sink(dst: Db, identity: str = "d", **kwargs: object) -> Sink:
    dst.execute("CREATE TABLE t (id int PRIMARY KEY, v text)" if identity == "d" else
                "CREATE TABLE t (id int, v text)")
    sink = Sink(psycopg2.connect(dst.dsn), "inproc", limits=BatchLimits(rows=1000, bytes=1 << 20, seconds=60),
                **kwargs)  # type: ignore[arg-type]
    assert sink.open(initial=Lsn(100)) == Lsn(100)
    sink.relation(_rel(identity))
    return sink


def _txn(sink: Sink, xid: int, commit_lsn: int, *changes: Insert | Update | Delete) -> None:
    assert sink.begin(xid, Lsn(commit_lsn))
    for c in changes:
        sink.apply(c)
    sink.commit(Lsn(commit_lsn + 8), 0)


def ins(i: int, v: str) -> Insert:
    return Insert(xid=None, relation_oid=OID, new=(str(i), v))


def upd(i: int, v: str, old: tuple | None = None) -> Update:
    return Update(xid=None, relation_oid=OID, old_kind="O" if old else None, old=old, new=(str(i), v))


def dele(i: int, v: str | None = None, kind: str = "K") -> Delete:
    return Delete(xid=None, relation_oid=OID, old_kind=kind, old=(str(i), v))


def _progress(dst: Db) -> str:
    return dst.execute("SELECT applied_lsn::text FROM pgferry.progress WHERE slot_name = 'inproc'")[0][0]


def test_a_batch_of_transactions_commits_folded_with_its_progress(pair):
    _, dst = pair
    stats = SinkStats()
    sink = _sink(dst, stats=stats)
    _txn(sink, 1, 200, ins(1, "a"), ins(2, "b"), ins(3, "c"))
    _txn(sink, 2, 300, upd(1, "a2"), dele(2), ins(4, "d"), upd(4, "d2"))
    assert dst.execute("SELECT count(*) FROM t") == [(0,)]  # nothing before the batch commits
    assert _progress(dst) == "0/64"
    sink.flush()
    assert dst.execute("SELECT id, v FROM t ORDER BY id") == [(1, "a2"), (3, "c"), (4, "d2")]
    assert _progress(dst) == str(Lsn(308)) and sink.stored == Lsn(308)
    assert stats.rows_applied == 7 and stats.op_counts["public.t"] == {Insert: 4, Update: 2, Delete: 1}
    # the batch committed asynchronously; a synchronous commit on the target flushes its WAL past
    # it (in the daemon, later batches and idle progress writes do that)
    wait_for(lambda: dst.execute("SELECT txid_current()") and sink.poll_durable() == Lsn(308), 10,
             "the batch's commit flushed on the target")
    assert not sink.begin(3, Lsn(250))  # committed before what is stored: already applied


def test_a_batch_written_in_the_background_is_joined_by_the_next_use(pair):
    _, dst = pair
    sink = _sink(dst)
    _txn(sink, 1, 200, *[ins(i, "x") for i in range(1, 501)])
    sink.flush(wait=False)
    assert sink.writing()
    _txn(sink, 2, 300, upd(1, "y"))  # folded while the first batch is written
    sink.flush()  # waits for the first, then commits the second
    assert not sink.writing()
    assert dst.execute("SELECT count(*), min(v), max(v) FROM t") == [(500, "x", "y")]
    assert _progress(dst) == str(Lsn(308))


def test_a_conflict_names_its_transaction_and_applies_nothing(pair):
    _, dst = pair
    sink = _sink(dst)
    dst.execute("INSERT INTO t VALUES (1, 'target')")
    _txn(sink, 7, 200, ins(1, "source"))
    with pytest.raises(ApplyError) as exc:
        sink.flush()
    assert "insert_exists" in str(exc.value) and exc.value.xid == 7 and exc.value.table == "public.t", str(exc.value)
    sink.rollback()
    assert dst.execute("SELECT v FROM t") == [("target",)] and _progress(dst) == "0/64"


def test_full_identity_goes_change_by_change_in_one_round_trip(pair):
    """REPLICA IDENTITY FULL (no key on the target): found by whole rows, in order, with an
    identical duplicate row left alone."""
    _, dst = pair
    sink = _sink(dst, identity="f")
    dst.execute("INSERT INTO t VALUES (1, 'a'), (1, 'a'), (2, 'b')")
    sink.stored = Lsn(100)
    _txn(sink, 1, 200, upd(1, "a1", old=("1", "a")), upd(1, "a2", old=("1", "a1")), dele(2, "b", kind="O"),
         upd(9, "gone", old=("9", "none")))
    sink.flush()
    assert dst.execute("SELECT id, v FROM t ORDER BY v") == [(1, "a"), (1, "a2")]
    assert sink.stats.missing_rows == 1  # the update of a row the target does not have
    assert dst.execute("SELECT kind FROM pgferry.conflicts") == [("update_missing",)]
