"""The C fold (sink/_cfold.c) against NetBatch.add on random change streams (pure code, no server).

What the stream loop does per change message: `Sink.apply_raw` (the C fold) and, when it declines,
the Python path (decode, NetBatch.add). Both ways must leave exactly the batch Python alone leaves."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder import UNCHANGED, Delete, Insert, Update, decode_message
from sink.apply import FOLD
from sink.netbatch import NetBatch
from tests.sink.test_netbatch_fold import _table

pytestmark = pytest.mark.skipif(FOLD is None, reason="the C fold is not built")


def _tuple(row: tuple) -> bytes:
    out = struct.pack(">H", len(row))
    for v in row:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        else:
            data = v.encode()
            out += b"t" + struct.pack(">I", len(data)) + data
    return out


def message(kind: str, row: tuple, old: tuple | None = None, old_kind: bytes = b"K") -> bytes:
    head = kind.encode() + struct.pack(">I", 1)
    if kind == "I":
        return head + b"N" + _tuple(row)
    if kind == "U":
        return head + (old_kind + _tuple(old) if old is not None else b"") + b"N" + _tuple(row)
    return head + old_kind + _tuple(row)


VALUES = st.sampled_from(["1", "2", "3", None, UNCHANGED, "x\ty", "é"])
CHANGE = st.tuples(st.sampled_from("IUDK"), st.sampled_from(["1", "2", "3"]), VALUES, VALUES, VALUES)


def _state(b: NetBatch) -> dict:
    return {oid: {k: list(e) for k, e in rows.items()} for oid, (_, rows) in b.tables.items()}


def _payload(kind: str, k: str, a, v, big, key_cols: tuple[int, ...]) -> bytes:
    row = (k, v if 1 not in key_cols else a, big)
    if kind == "I":
        return message("I", tuple(UNCHANGED if x is UNCHANGED and i == 2 else ("z" if x is UNCHANGED else x)
                                  for i, x in enumerate(row)))
    if kind == "U":
        return message("U", row)
    if kind == "K":  # an update that changes the key: refused by both
        return message("U", row, old=("9", None, None))
    return message("D", tuple(x if i in key_cols else None for i, x in enumerate(row)))


@pytest.mark.parametrize("key_cols,identity", [((0,), "d"), ((0, 1), "d"), ((0,), "f"), ((), "d")])
@settings(max_examples=300, deadline=None)
@given(changes=st.lists(CHANGE, max_size=40))
def test_the_c_fold_then_python_leaves_what_python_alone_leaves(key_cols, identity, changes):
    ta, tb = _table(identity, key_cols), _table(identity, key_cols)
    a, b = NetBatch(), NetBatch()
    for n, (kind, k, x, v, big) in enumerate(changes):
        payload = _payload(kind, k, x, v, big, key_cols)
        lsn, xid = 100 + n, 500 + n
        msg = decode_message(payload)
        ok_a = a.add(ta, msg, lsn, xid)
        before = dict(tb.counts)
        done = FOLD(payload, {1: tb}, b.tables, b._appended, lsn, xid)
        assert done in (0, 1)
        if done == 0:
            assert tb.counts == before
            ok_b = b.add(tb, msg, lsn, xid)
        else:
            assert tb.counts[type(msg)] == before.get(type(msg), 0) + 1
            ok_b = True
        assert ok_a == ok_b, (kind, msg)
        assert _state(a) == _state(b)


def test_changes_before_the_tables_copy_are_skipped_and_other_messages_declined():
    t = _table()
    t.snapshot_lsn = 200
    net = NetBatch()
    ins = message("I", ("1", "a", None))
    assert FOLD(ins, {1: t}, net.tables, net._appended, 150, 7) == 2  # before the copy: the copy has it
    assert not net.tables and not t.counts
    assert FOLD(ins, {1: t}, net.tables, net._appended, 250, 7) == 1
    assert FOLD(ins, {}, net.tables, net._appended, 250, 7) == 0  # relation not mapped yet
    assert FOLD(b"B" + bytes(20), {1: t}, net.tables, net._appended, 250, 7) == 0
    assert FOLD(ins[:-1], {1: t}, net.tables, net._appended, 260, 7) == 0  # malformed: Python reports it
    full_delete = message("D", ("2", None, None), old_kind=b"O")
    assert FOLD(full_delete, {1: t}, net.tables, net._appended, 260, 7) == 0
    assert isinstance(decode_message(ins), Insert) and isinstance(decode_message(message("U", ("1", "b", "c"))), Update)
    assert isinstance(decode_message(message("D", ("1", None, None))), Delete)


def test_the_c_fold_relies_on_what_the_python_side_declares():
    """sink/_cfold.c's CONTRACT (op codes, entry layout, TargetTable attributes it reads, key0's
    special values) is netbatch.FOLD_CONTRACT, and TargetTable keeps it."""
    from sink import _cfold  # type: ignore[attr-defined]
    from sink.netbatch import FOLD_CONTRACT

    assert _cfold.CONTRACT == {**FOLD_CONTRACT, "table_attrs": tuple(FOLD_CONTRACT["table_attrs"])}
    one, several, full = _table(), _table(key=(0, 1)), _table(identity="f")
    fires = _table()
    fires.fires = ["trigger audit"]
    fires.__post_init__()
    for t in (one, several, full, fires):
        for attr in FOLD_CONTRACT["table_attrs"]:
            assert hasattr(t, attr), attr
    special = FOLD_CONTRACT["key0"]
    assert (one.key0, several.key0, full.key0, fires.key0) == (
        0, special["several_columns"], special["whole_row"], special["fires"])
    b = NetBatch()
    assert b.add(one, Insert(xid=None, relation_oid=1, new=("1", "a", "b")), 7, 9)
    (entry,) = b.tables[1][1].values()
    assert len(entry) == FOLD_CONTRACT["entry_len"] and entry[0] == FOLD_CONTRACT["ops"]["INS"]
    assert entry[2:] == [7, 9]
