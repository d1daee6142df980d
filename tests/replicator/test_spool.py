"""The spool of streamed transactions (pure file I/O, no server)."""

from __future__ import annotations

from replicator.spool import Spool


def test_replay_in_order_and_file_removed(tmp_path):
    sp = Spool(str(tmp_path))
    for i in range(1000):
        sp.append(7, 7, f"m{i}".encode())
    assert sp.stats(7) == (1000, sum(4 + len(f"m{i}") for i in range(1000)))
    assert list(sp.replay(7)) == [f"m{i}".encode() for i in range(1000)]
    assert len(sp) == 0 and not list(sp.dir.iterdir())
    sp.close()
    assert not sp.dir.exists()


def test_subtransaction_abort_cuts_its_changes_and_nested_ones(tmp_path):
    sp = Spool(str(tmp_path))
    sp.append(10, 10, b"top-1")
    sp.append(10, 11, b"in-a")  # SAVEPOINT a
    sp.append(10, 12, b"in-b")  # SAVEPOINT b (nested in a)
    sp.abort(10, 13)  # a subtransaction that wrote nothing: no effect
    sp.abort(10, 12)  # ROLLBACK TO b
    sp.append(10, 11, b"in-a-after-release-b")  # RELEASE b: back in a
    sp.append(10, 14, b"in-c")  # SAVEPOINT c (nested in a), RELEASE c
    assert sp.stats(10)[0] == 5
    sp.abort(10, 11)  # ROLLBACK TO a: drops a and everything nested in it
    sp.append(10, 10, b"top-2")
    assert list(sp.replay(10)) == [b"top-1", b"top-2"]


def test_subtransaction_abort_keeps_what_came_before_it(tmp_path):
    sp = Spool(str(tmp_path))
    sp.append(10, 10, b"top-1")
    sp.append(10, 11, b"in-a")
    sp.append(10, 12, b"in-b")
    sp.abort(10, 12)
    sp.append(10, 11, b"in-a-2")
    assert list(sp.replay(10)) == [b"top-1", b"in-a", b"in-a-2"]


def test_whole_abort_and_interleaved_transactions(tmp_path):
    sp = Spool(str(tmp_path))
    sp.append(1, 1, b"a1")
    sp.append(2, 2, b"b1")
    sp.append(1, 1, b"a2")
    sp.abort(2, 2)
    sp.abort(3, 3)  # unknown: nothing to do
    assert list(sp.replay(2)) == []
    assert list(sp.replay(1)) == [b"a1", b"a2"]
    sp.append(5, 5, b"x")
    sp.reset()
    assert len(sp) == 0 and not list(sp.dir.iterdir())
    sp.close()
