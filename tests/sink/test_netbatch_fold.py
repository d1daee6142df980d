"""Folding a batch's changes into their net effect per key (pure code, no server)."""

from __future__ import annotations

from decoder import UNCHANGED, Column, Delete, Insert, Relation, Update
from sink.netbatch import DEL, DEL_INS, INS, UPD, NetBatch
from sink.relations import TargetTable


def _table(identity: str = "d", key: tuple[int, ...] = (0,)) -> TargetTable:
    cols = (Column(flags=int(0 in key), name="id", type_oid=23, type_modifier=-1),
            Column(flags=int(1 in key), name="v", type_oid=25, type_modifier=-1),
            Column(flags=0, name="big", type_oid=25, type_modifier=-1))
    rel = Relation(xid=None, oid=1, namespace="public", name="t", replica_identity=identity, columns=cols)
    return TargetTable(rel=rel, qualified="public.t", names=["id", "v", "big"], writable=[True] * 3,
                       settable=[True] * 3, key=list(key), text_compare=[False] * 3, types=["integer", "text", "text"])


def ins(*row):
    return Insert(xid=None, relation_oid=1, new=tuple(row))


def upd(*row, old=None):
    return Update(xid=None, relation_oid=1, old=old, old_kind="K" if old else None, new=tuple(row))


def dele(key):
    return Delete(xid=None, relation_oid=1, old=(key, None, None), old_kind="K")


def _net(b: NetBatch) -> dict:
    return {k: (op, None if op == DEL else list(e[1]))
            for _, rows in b.tables.values() for k, e in rows.items() for op in [e[0]]}


def test_changes_to_one_key_fold_to_their_net_effect():
    t = _table()
    b = NetBatch()
    assert b.add(t, ins("1", "a", "x" * 10))
    assert b.add(t, upd("1", "b", UNCHANGED))  # TOASTed column unchanged: the inserted value stays
    assert b.add(t, upd("2", "c", UNCHANGED))
    assert b.add(t, upd("2", UNCHANGED, "y"))
    assert b.add(t, dele("3"))
    assert b.add(t, ins("3", "again", None))
    assert b.add(t, ins("4", "gone", None))
    assert b.add(t, dele("4"))
    assert b.add(t, upd("5", "z", None))
    assert b.add(t, dele("5"))
    assert _net(b) == {("1",): (INS, ["1", "b", "x" * 10]), ("2",): (UPD, ["2", "c", "y"]),
                       ("3",): (DEL_INS, ["3", "again", None]), ("5",): (DEL, None)}


def test_a_key_of_two_columns_folds_on_both():
    t = _table(key=(0, 1))
    b = NetBatch()
    assert b.add(t, ins("1", "a", "first"))
    assert b.add(t, ins("1", "b", "other key"))  # same id, other v: another row
    assert b.add(t, upd("1", "a", "second"))
    assert b.add(t, Delete(xid=None, relation_oid=1, old=("1", "b", None), old_kind="K"))
    assert not b.add(t, upd("1", UNCHANGED, "v not sent"))
    assert not b.add(t, ins("2", None, "NULL in the key"))
    assert _net(b) == {("1", "a"): (INS, ["1", "a", "second"])}


def test_what_cannot_fold_is_refused_so_the_caller_keeps_source_order():
    t = _table()
    b = NetBatch()
    assert not b.add(t, upd("2", "v", None, old=("1", None, None)))  # key change
    assert b.add(t, ins("1", "a", None))
    assert not b.add(t, ins("1", "dup", None))  # a second insert of the same key
    assert b.add(t, dele("7"))
    assert not b.add(t, dele("7"))
    assert not b.add(t, upd("7", "after delete", None))
    assert not b.add(t, upd(UNCHANGED, "key not sent", None))
    full = NetBatch()
    assert full.add(_table("f"), ins("1", "a", None))  # FULL identity: inserts are appended
    assert not full.add(_table("f"), dele("1"))  # but rows are found by comparing them whole, in order
    assert _net(b) == {("1",): (INS, ["1", "a", None]), ("7",): (DEL, None)}


def test_a_relation_redescribed_mid_batch_is_not_folded_with_its_old_rows():
    b = NetBatch()
    assert b.add(_table(), ins("1", "a", None))
    assert not b.add(_table(), upd("1", "b", None))  # a new mapping: write the old rows out first


def test_text_forms_for_copy_and_array_literals_escape_what_they_must():
    from sink.netbatch import array_text, copy_text

    assert copy_text([["a\\b", None, "x\ty\nz\r"], ["1", "", "NULL"]]) == "a\\\\b\t\\N\tx\\ty\\nz\\r\n1\t\tNULL\n"
    assert array_text(("a", None, 'q"uote', "back\\slash", "", "NULL", '{"x",NULL}')) == (
        '{"a",NULL,"q\\"uote","back\\\\slash","","NULL","{\\"x\\",NULL}"}')


def test_copy_text_matches_escaping_every_value_whatever_mix_of_nulls_and_special_characters():
    import random

    from sink.netbatch import copy_text

    def reference(rows):
        esc = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
        return "".join("\t".join("\\N" if v is None else "".join(esc.get(c, c) for c in v) for v in r) + "\n"
                       for r in rows)

    rng = random.Random(7)
    pieces = ["a", "7", "", "NULL", "\\N", "\\", "\t", "\n", "\r", "ż", "x y"]
    for case in range(400):
        width = rng.randint(1, 5)
        special = case % 4  # 0: plain text only, 1: with NULLs, 2: with escapes, 3: both
        pool = pieces[:4] + (pieces[4:9] if special >= 2 else []) + pieces[9:]
        rows = [tuple(None if special % 2 and rng.random() < 0.3 else
                      "".join(rng.choice(pool) for _ in range(rng.randint(0, 3))) for _ in range(width))
                for _ in range(rng.randint(0, 6))]
        assert copy_text(rows) == reference(rows), rows
