"""The spool of streamed transactions (pure file I/O, no server)."""

from __future__ import annotations

import os

from replicator.stream.spool import Spool


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


def test_a_start_removes_the_spools_of_gone_processes_only(tmp_path):
    """A killed pgferry cannot remove its spool directory; the next start on the host does, and
    leaves alone those of live processes (another daemon), of other hosts and of unknown names."""
    import subprocess
    import sys

    from replicator.stream.spool import _host_prefix

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = _host_prefix()
        dead_dir = tmp_path / f"{host}{gone.pid}-abc"
        earlier_me = tmp_path / f"{host}{os.getpid()}-old"  # a container's pid 1, restarted
        keep = [tmp_path / f"{host}{live.pid}-abc", tmp_path / f"pgferry-spool-otherhost-{gone.pid}-abc",
                tmp_path / "pgferry-spool-k2j4h5g_", tmp_path / "unrelated"]
        for d in [dead_dir, earlier_me, *keep]:
            d.mkdir()
            (d / "42.spool").write_bytes(b"x" * 100)
        running = Spool(str(tmp_path))  # this process's first spool, in use
        running.append(5, 5, b"in progress")
        assert not dead_dir.exists() and not earlier_me.exists()
        assert all((d / "42.spool").exists() for d in keep)
        second = Spool(str(tmp_path))  # a second stream in the same process leaves the first alone
        assert list(running.replay(5)) == [b"in progress"] and running.dir.exists()
        second.close()
        running.close()
        assert sorted(tmp_path.iterdir()) == sorted(keep)
    finally:
        live.kill()
        live.wait()
