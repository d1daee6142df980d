"""Switchover: the fence no client bypasses, PgBouncer moved to the target, a switch command, and
a cutover killed or failing part-way undone or finished (replicator/cutover/)."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from tests.pgplugin import Daemon, Db, main_pair_only, pgferry, wait_for
from tests.replicator.test_sync import PGBENCH

pytestmark = pytest.mark.pg


def _status(src: Db, dst: Db) -> dict:
    r = pgferry("status", "--json", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _streaming(src: Db, dst: Db, d: Daemon) -> None:
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 120, "streaming")
    assert d.running(), d.output()


def _start_streaming(src: Db, dst: Db, daemons: list[Daemon], **kw: object) -> Daemon:
    """`pgferry start` (copy, then stream) from src into dst, once it streams."""
    d = Daemon(src, dst, copy=True, ready=False, **kw)  # type: ignore[arg-type]
    daemons.append(d)
    _streaming(src, dst, d)
    return d


def pgbench_processed(returncode: int, out: str, err: str) -> int:
    """The transactions pgbench says it committed; it ended well and none failed."""
    assert returncode == 0, out + err
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is None or int(failed.group(1)) == 0, out
    return int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]


def cut_over_under_pgbench(bench: subprocess.Popen, src: Db, dst: Db, d: Daemon, b: Any, *flags: str
                           ) -> tuple[Any, int]:
    """`pgferry cutover FLAGS --pgbouncer ...` once pgbench (writing through PgBouncer `b`) has
    500 transactions in; it must succeed. (The cutover's result, the transactions pgbench counted.)"""
    try:
        wait_for(lambda: src.execute("SELECT count(*) FROM pgbench_history")[0][0] > 500 or bench.poll() is not None,
                 60, "pgbench writing through PgBouncer")
        r = pgferry("cutover", *flags, "--source", src.dsn, "--target", dst.dsn, "--timeout", "60", "--pgbouncer",
                    b.admin_dsn, "--pgbouncer-target", _target_conninfo(dst))
        assert r.returncode == 0, r.stdout + r.stderr + d.output() + b.log_tail()
        out, err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
    return r, pgbench_processed(bench.returncode, out, err)


def assert_pgbench_once_on(dst: Db, processed: int) -> None:
    """Every transaction pgbench counted is one history row on the target (those before the
    handoff came through the stream, those after were written there through PgBouncer), and the
    balances add up."""
    (on_target,) = dst.execute("SELECT count(*) FROM pgbench_history")[0]
    assert on_target == processed, (on_target, processed)
    (sums,) = dst.execute("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM "
                          "pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(delta) FROM "
                          "pgbench_history)")
    assert len(set(sums)) == 1, sums


def _target_conninfo(dst: Db) -> str:
    return f"host={dst.server.host} port={dst.server.port} dbname={dst.name} user={dst.user or dst.server.user}"


def _admin(bouncer: object, sql: str) -> list[tuple]:
    conn = psycopg2.connect(bouncer.admin_dsn)  # type: ignore[attr-defined]
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            names = [c[0] for c in cur.description] if cur.description else []
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()] if names else []  # type: ignore[misc]
    finally:
        conn.close()


def _entry(bouncer: object, name: str) -> dict:
    return next(r for r in _admin(bouncer, "SHOW DATABASES") if r["name"] == name)  # type: ignore[index]


class Writer(threading.Thread):
    """An application client: one row per transaction into w (who, n), through `dsn`; it records
    what it saw committed and every error, and goes on (reconnecting) until stopped."""

    def __init__(self, dsn: str, who: str, setup: str = "", begin: str = "", copy: bool = False) -> None:
        super().__init__(daemon=True)
        self.dsn, self.who, self.setup, self.begin, self.copy = dsn, who, setup, begin, copy
        self.committed: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n, conn = 0, None
        while not self.stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = psycopg2.connect(self.dsn)
                    conn.autocommit = True
                    if self.setup:
                        conn.cursor().execute(self.setup)
                cur = conn.cursor()
                cur.execute(self.begin or "BEGIN")
                if self.copy:
                    import io
                    cur.copy_expert("COPY w (who, n) FROM STDIN", io.StringIO(f"{self.who}\t{n}\n"))
                else:
                    cur.execute("INSERT INTO w (who, n) VALUES (%s, %s)", (self.who, n))
                cur.execute("COMMIT")
                self.committed.append(n)
            except psycopg2.Error as exc:
                self.errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                if conn is not None:
                    conn.close()
                conn = None
                self.stop.wait(0.05)
        if conn is not None:
            conn.close()


def _rows(db: Db, who: str) -> list[int]:
    return [n for (n,) in db.execute("SELECT n FROM w WHERE who = %s ORDER BY n", (who,))]


def test_pgbench_through_pgbouncer_sees_a_pause_not_an_error(owner_pair, daemons, pgbouncer, tmp_path):
    """pgbench (8 clients, transaction pooling) writes through PgBouncer across the cutover: no
    transaction fails, and every one pgbench counts is on the target exactly once."""
    src, dst = owner_pair
    main_pair_only(src, dst)
    subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-d", src.dsn], check=True, capture_output=True)
    d = _start_streaming(src, dst, daemons)
    b = pgbouncer(src, pool_size=8)
    bench = subprocess.Popen([PGBENCH, "-c", "8", "-j", "2", "-T", "20", "-n", "-M", "simple", "-l", "--log-prefix",
                              str(tmp_path / "tx"), "-d", b.dsn(src.name)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    r, processed = cut_over_under_pgbench(bench, src, dst, d, b)
    receipt = json.loads(r.stdout)
    assert receipt["ok"] and receipt["refused_writes"] == 0 and not receipt["client_errors"], receipt
    assert d.wait_exit(timeout=30) == 0, d.output()
    assert_pgbench_once_on(dst, processed)
    # the source kept exactly what it had at the handoff: all of it is on the target too
    source_rows = collections.Counter(src.execute("SELECT tid, bid, aid, delta, mtime FROM pgbench_history"))
    target_rows = collections.Counter(dst.execute("SELECT tid, bid, aid, delta, mtime FROM pgbench_history"))
    assert 0 < sum(source_rows.values()) < processed and not source_rows - target_rows
    assert _entry(b, src.name)["port"] == dst.server.port and not _entry(b, src.name)["paused"]
    latencies = [int(line.split()[2]) for f in tmp_path.glob("tx*") for line in f.read_text().splitlines()]
    print(f"pgbench: {processed} transactions, 0 failed; the longest took {max(latencies) / 1e6:.3f} s; the "
          f"clients paused {receipt['client_pause_s']} s ({receipt['clients_waiting']} waiting); steps "
          f"{receipt.get('steps_s')}")


def test_no_client_commits_on_the_source_after_the_fence_whatever_it_sets(pair, daemons):
    """Clients that set their way around a read-only default (a role setting, a connection option,
    BEGIN READ WRITE, the replica role, COPY) write on through the cutover: everything each saw
    committed is on the target, and the source has nothing the target does not (no commit after
    the handoff). A write held open past --fence-wait is ended and never commits."""
    src, dst = pair
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n))")
    role = f"app_{src.name}"
    src.psql(f"CREATE ROLE {role} LOGIN; GRANT ALL ON w TO {role}; "
             f"ALTER ROLE {role} SET default_transaction_read_only = off; "
             f"ALTER DATABASE {src.name} SET default_transaction_read_only = off")
    d = _start_streaming(src, dst, daemons)
    dsn = src.dsn
    writers = [Writer(src.server.dsn(src.name, user=role), "role_setting"),
               Writer(dsn + " options='-c default_transaction_read_only=off'", "option"),
               Writer(dsn, "read_write", begin="BEGIN READ WRITE"),
               Writer(dsn, "replica", setup="SET session_replication_role = replica"),
               Writer(dsn, "copy", copy=True)]
    held = psycopg2.connect(dsn)
    held.cursor().execute("INSERT INTO w VALUES ('held_open', 1)")  # and not committed
    for w in writers:
        w.start()
    try:
        wait_for(lambda: all(len(w.committed) > 20 for w in writers), 60, "the writers")
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60", "--fence-wait", "1")
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        wait_for(lambda: all(any("ReadOnlySqlTransaction" in e for e in w.errors) for w in writers), 30,
                 "every writer to be refused")
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(timeout=30)
    receipt = json.loads(r.stdout)
    assert receipt["ok"] and receipt["sessions_ended"] == 1 and receipt["refused_writes"] > 0, receipt
    with pytest.raises(psycopg2.OperationalError):
        held.commit()  # its session was ended: the transaction never commits
    for w in writers:
        assert _rows(dst, w.who) == w.committed, (w.who, w.errors[:3])
        assert _rows(src, w.who) == w.committed, w.who
    assert not _rows(src, "held_open") and not _rows(dst, "held_open")
    # and after the cutover: still nothing, TRUNCATE as a superuser included
    for sql in ("TRUNCATE w", "SET session_replication_role = replica; DELETE FROM w"):
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction, match="is fenced"):
            src.execute(sql)
    assert src.execute("SELECT count(*) FROM w") == dst.execute("SELECT count(*) FROM w")


def test_a_cutover_killed_after_the_fence_is_undone_and_the_next_one_runs(pair, daemons, pgbouncer):
    """Killed right after the fence (PgBouncer paused, the source fenced): status and preflight say
    so and what to run; `cutover --undo` resumes PgBouncer on the source and lifts the fence, the
    daemon streams on, and the next cutover goes through. The client waiting in PgBouncer all along
    sees no error."""
    src, dst = pair
    main_pair_only(src, dst)
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n))")
    d = _start_streaming(src, dst, daemons)
    b = pgbouncer(src)
    app = Writer(b.dsn(src.name), "app")
    app.start()
    try:
        wait_for(lambda: len(app.committed) > 20, 30, "the application")
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--pgbouncer", b.admin_dsn,
                    env={"PGFERRY_FAILPOINT": "cutover_after_fence"})
        assert r.returncode == 99, r.stdout + r.stderr
        assert _entry(b, src.name)["paused"]
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            src.execute("INSERT INTO w VALUES ('direct', 1)")
        st = _status(src, dst)
        assert st["fenced_tables"] == 1 and st["cutover_state"] == "requested", st
        assert "interrupted before its handoff" in st["action"] and "pgferry cutover --undo" in st["action"], st
        pre = pgferry("preflight", "--json", "--source", src.dsn, "--target", dst.dsn)
        assert any(f["check"] == "cutover fence" and "refuse writes" in f["message"]
                   for f in json.loads(pre.stdout)["findings"]), pre.stdout
        r = pgferry("cutover", "--undo", "--source", src.dsn, "--target", dst.dsn, "--pgbouncer", b.admin_dsn)
        assert r.returncode == 0 and "fence is lifted" in r.stderr and "resumed" in r.stderr, r.stderr
        assert not _entry(b, src.name)["paused"]
        src.execute("INSERT INTO w VALUES ('direct', 1)")  # writable again
        st = _status(src, dst)
        assert st["fenced_tables"] == 0 and st["action"] is None and st["cutover_state"] == "cancelled", st
        d.wait_caught_up()
        assert _rows(dst, "direct") == [1]
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--pgbouncer", b.admin_dsn,
                    "--pgbouncer-target", _target_conninfo(dst))
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        before = len(app.committed)
        wait_for(lambda: len(app.committed) > before + 20, 30, "the application on the target")
    finally:
        app.stop.set()
        app.join(timeout=30)
    assert not app.errors, app.errors[:5]
    assert _rows(dst, "app") == app.committed
    assert _status(src, dst)["phase"] == "done"


def test_a_cutover_killed_after_the_handoff_is_finished_by_the_next(pair, daemons, pgbouncer):
    """Killed after the handoff: status does not say done, `start` refuses to stream past the
    handoff, and the next `pgferry cutover` copies the sequences, verifies, moves PgBouncer and
    writes the receipt. The application waits in PgBouncer across the kill and sees no error."""
    src, dst = pair
    main_pair_only(src, dst)
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n)); CREATE SEQUENCE s; SELECT setval('s', 42)")
    d = _start_streaming(src, dst, daemons)
    b = pgbouncer(src)
    app = Writer(b.dsn(src.name), "app")
    app.start()
    try:
        wait_for(lambda: len(app.committed) > 20, 30, "the application")
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--pgbouncer", b.admin_dsn,
                    "--pgbouncer-target", _target_conninfo(dst), env={"PGFERRY_FAILPOINT": "cutover_after_handoff"})
        assert r.returncode == 99, r.stdout + r.stderr
        assert d.wait_exit(timeout=30) == 0, d.output()
        st = _status(src, dst)
        assert st["phase"] != "done" and st["cutover_state"] == "handed_off", st
        assert "interrupted after its handoff" in st["action"] and "run `pgferry cutover` to finish" in st["action"]
        again = Daemon(src, dst, ready=False)
        daemons.append(again)
        assert again.wait_exit(timeout=60) == 1 and "did not finish: run `pgferry cutover`" in again.output()
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--fence", "none")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "interrupted after its handoff" in r.stderr
        receipt = json.loads(r.stdout)
        assert receipt["ok"] and receipt["resumed_after_interruption"] and receipt["pgbouncer"], receipt
        assert {"name": "public.s", "value": 42} in receipt["sequences"]
        before = len(app.committed)
        wait_for(lambda: len(app.committed) > before + 20, 30, "the application on the target")
    finally:
        app.stop.set()
        app.join(timeout=30)
    assert not app.errors, app.errors[:5]
    assert _rows(dst, "app") == app.committed
    st = _status(src, dst)
    assert st["phase"] == "done" and st["action"] is None, st
    r = pgferry("cutover", "--undo", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "nothing to undo" in r.stderr, r.stderr


def test_a_failing_switch_command_undoes_the_cutover(pair, daemons, tmp_path):
    """`--switch-command` runs once the target verified, with the handoff in its environment; when
    it fails the fence is lifted like after a failed verify, and `start` streams again."""
    src, dst = pair
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n))")
    d = _start_streaming(src, dst, daemons)
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--switch-command",
                "echo no route to the load balancer >&2; exit 3")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "switch command failed (exit 3: no route to the load balancer)" in r.stderr, r.stderr
    assert "fence is lifted" in r.stderr and "Traceback" not in r.stderr
    assert d.wait_exit(timeout=30) == 0  # it had handed off
    src.execute("INSERT INTO w VALUES ('after', 1)")  # writable again
    st = _status(src, dst)
    assert st["cutover_state"] == "undone" and st["fenced_tables"] == 0 and st["action"] is None, st
    d.start()
    d.wait_caught_up()
    assert _rows(dst, "after") == [1]
    seen = tmp_path / "switch.env"
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--switch-command",
                f'echo "$PGFERRY_HANDOFF_LSN $PGFERRY_CUTOVER_ID" > {seen}')
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    receipt = json.loads(r.stdout)
    assert seen.read_text().split() == [receipt["handoff_lsn"], receipt["cutover_id"]]
    assert receipt["switch_command"]["ok"]


def test_pgbouncer_in_session_mode_is_refused_before_anything_changes(pair, pgbouncer):
    src, dst = pair
    main_pair_only(src, dst)
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n)); CREATE PUBLICATION pgferry FOR ALL TABLES")
    b = pgbouncer(src, pool_mode="session")
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--pgbouncer", b.admin_dsn)
    assert r.returncode == 2 and "session mode" in r.stderr, r.stderr
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--pgbouncer", b.admin_dsn,
                "--pgbouncer-database", "nosuch")
    assert r.returncode == 2 and "no database 'nosuch'" in r.stderr, r.stderr
    assert not _entry(b, src.name)["paused"]
    src.execute("INSERT INTO w VALUES ('still', 1)")
    assert Path(b.config).read_text().count(f"port={src.server.port}") == 1


def test_a_cutover_killed_after_its_switch_command_is_finished_never_undone(pair, daemons):
    """Killed once the switch command moved the application (which may write on the target at
    once): `cutover --undo` refuses, and the next `pgferry cutover` finishes without verifying or
    undoing anything, even though the target now has rows the source does not."""
    src, dst = pair
    main_pair_only(src, dst)
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n))")
    _start_streaming(src, dst, daemons)
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--switch-command", "true",
                env={"PGFERRY_FAILPOINT": "cutover_after_switch"})
    assert r.returncode == 99, r.stdout + r.stderr
    dst.execute("INSERT INTO w VALUES ('on the target', 1)")  # the application, moved
    r = pgferry("cutover", "--undo", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "cannot be undone" in r.stderr, r.stderr
    assert _status(src, dst)["fenced_tables"] == 1
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    receipt = json.loads(r.stdout)
    assert receipt["resumed_after_interruption"] and receipt["handoff_lsn"], receipt
    st = _status(src, dst)
    assert st["phase"] == "done" and st["fenced_tables"] == 1 and st["action"] is None, st
    assert _rows(dst, "on the target") == [1]


def test_a_failing_switch_command_is_in_the_receipt(pair, daemons):
    src, dst = pair
    main_pair_only(src, dst)
    src.execute("CREATE TABLE w (who text, n int, PRIMARY KEY (who, n))")
    _start_streaming(src, dst, daemons)
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--switch-command", "exit 4")
    assert r.returncode == 1, r.stdout + r.stderr
    receipt = json.loads(r.stdout)
    assert receipt["ok"] is False and receipt["switch_command"]["ok"] is False, receipt
    assert "exit 4" in receipt["switch_command"]["error"], receipt
