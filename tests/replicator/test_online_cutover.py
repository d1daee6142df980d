"""`cutover --verify online` (cutover/changed.py) and `verify --online` with the daemon disturbed:
every row compared while streaming, then under the fence only the rows changed since."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable

import psycopg2
import pytest

from tests.pgplugin import ROOT, Db, assert_same_tables, pgferry, wait_for
from tests.replicator.test_switchover import (
    _start_streaming,
    assert_pgbench_once_on,
    cut_over_under_pgbench,
    main_pair_only,
)
from tests.replicator.test_sync import PGBENCH

pytestmark = pytest.mark.pg

W = {"w": ["id", "v"]}


def while_comparing(args: list[str], progress: str, act: Callable[[], object]) -> tuple[int, str, str]:
    """Run `pgferry ARGS` (a verify or cutover comparing online); once its stderr shows the
    progress line `progress`, do `act()`, then wait for it to end. (exit code, stdout, stderr)"""
    proc = subprocess.Popen([sys.executable, "-m", "replicator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen: list[str] = []

    def read() -> None:  # stderr as it comes; stdout (a receipt) fits in the pipe meanwhile
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(progress in line for line in seen) or proc.poll() is not None, 60,
                 "the online comparison under way")
        act()
        proc.wait(timeout=120)
        out = proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    return proc.returncode, out, "".join(seen)


def test_cutover_verify_online_under_pgbench_checks_only_the_changed_rows_at_the_fence(owner_pair, daemons,
                                                                                      pgbouncer, tmp_path):
    """pgbench through PgBouncer across `cutover --verify online`: every row compared before the
    fence, the rows pgbench changed since compared by key under it; no transaction fails and every
    one is on the target exactly once."""
    src, dst = owner_pair
    main_pair_only(src, dst)
    subprocess.run([PGBENCH, "-i", "-s", "2", "-q", "-d", src.dsn], check=True, capture_output=True)
    d = _start_streaming(src, dst, daemons)
    b = pgbouncer(src, pool_size=8)
    bench = subprocess.Popen([PGBENCH, "-c", "4", "-j", "2", "-T", "25", "-n", "-M", "simple", "-d",
                              b.dsn(src.name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=tmp_path)
    r, processed = cut_over_under_pgbench(bench, src, dst, d, b, "--verify", "online")
    receipt = json.loads(r.stdout)
    assert receipt["ok"] and receipt["verify"] == "online" and not receipt["client_errors"], receipt
    online = receipt["online_verify"]
    assert online["tables"] == 4 and online["rows"] >= 200_000 and not online["different"], online
    changes = receipt["changes_verified"]
    rounds = online["rounds"]  # catch-up rounds only after a comparison of more than a second
    assert changes["since_lsn"] == (rounds[-1]["lsn"] if rounds else online["lsn"]), (changes, online)
    assert changes["transactions"] > 0 and changes["keys"] > 0, changes
    assert "public.pgbench_accounts" in changes["tables_by_key"], changes
    assert changes["tables_whole"] == {"public.pgbench_history": "no primary key"}, changes
    assert {t["name"] for t in receipt["tables"]} == {"public.pgbench_history", *changes["tables_by_key"]}
    assert all(t["match"] for t in receipt["tables"]), receipt["tables"]
    assert "[1/4] public.pgbench_accounts" in r.stderr, r.stderr  # the progress of the comparison
    assert d.wait_exit(timeout=30) == 0, d.output()
    assert_pgbench_once_on(dst, processed)
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_verify%'")
    print(f"cutover --verify online: {processed} pgbench transactions, 0 failed; write downtime "
          f"{receipt['write_downtime_s']} s, clients paused {receipt['client_pause_s']} s; online verify "
          f"{online['took_s']} s; {changes['keys']} changed keys; steps {receipt['steps_s']}")


def _tamper_on_target(dst: Db) -> None:
    """A row the daemon updates to 'poison' ends up 'tampered' on the target: a difference made
    after the online verify's LSN, which only the check at the fence can see."""
    dst.execute("CREATE FUNCTION tamper() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.v = 'poison' THEN NEW.v := 'tampered'; END IF; RETURN NEW; END $$; "
                "CREATE TRIGGER tamper BEFORE UPDATE ON w FOR EACH ROW EXECUTE FUNCTION tamper(); "
                "ALTER TABLE w ENABLE ALWAYS TRIGGER tamper")


def _cutover_with_a_row_tampered_after_the_lsn(src: Db, dst: Db, daemons: list, rounds: str) -> tuple[int, str, str]:
    """A cutover --verify online; while its first comparison runs (after its LSN), the source
    updates a row that the target's trigger tampers with as the daemon applies it."""
    src.execute("CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big SELECT g, 'b' FROM "
                "generate_series(1, 3000) g; CREATE TABLE w (id int PRIMARY KEY, v text); "
                "INSERT INTO w SELECT g, 'v' FROM generate_series(1, 100) g")
    d = _start_streaming(src, dst, daemons)
    _tamper_on_target(dst)
    # 6,000 rows compared at 1,000 a second: the comparison goes on for ~6 s after its LSN
    rc, out, err = while_comparing(
        ["cutover", "--verify", "online", "--max-rate", "1000", "--catch-up-rounds", rounds, "--source", src.dsn,
         "--target", dst.dsn, "--timeout", "30"], "[1/2] public.big",
        lambda: src.execute("UPDATE w SET v = 'poison' WHERE id = 7"))  # after the LSN, before the fence
    return rc, out, err + d.output()


def test_cutover_verify_online_finds_a_row_changed_after_the_online_comparison_at_the_fence(owner_pair, daemons):
    """No catch-up round: the row changed after the comparison's LSN is compared under the fence,
    found different, and the cutover undone."""
    src, dst = owner_pair
    rc, out, err = _cutover_with_a_row_tampered_after_the_lsn(src, dst, daemons, "0")
    assert rc == 1, out + err
    assert "cutover verification failed (public.w)" in err and "Traceback" not in err, err
    receipt = json.loads(out)
    assert receipt["ok"] is False and receipt["verify"] == "online" and not receipt["online_verify"]["different"]
    assert receipt["online_verify"]["rounds"] == [], receipt
    tables = {t["name"]: t for t in receipt["tables"]}
    assert tables["public.w"]["differences"][1:] == ["row (id)=(7): differs"], tables
    assert receipt["changes_verified"]["tables_by_key"] == ["public.w"], receipt
    # undone: the source takes writes; the daemon, stopped at the handoff, streams again once started
    d = daemons[-1]
    assert d.wait_exit(timeout=30) == 0, d.output()
    src.execute("UPDATE w SET v = 'after' WHERE id = 8")
    dst.execute("DROP TRIGGER tamper ON w")  # (a start refuses a trigger that would fire during apply)
    d.start()
    wait_for(lambda: dst.execute("SELECT v FROM w WHERE id = 8") == [("after",)], 30, "the daemon streaming again")


def test_cutover_verify_online_catch_up_round_finds_it_before_the_fence(owner_pair, daemons):
    """With catch-up rounds (the default), the same row is found by the round that compares what
    changed during the first comparison: refused before anything changed, the daemon streams on."""
    src, dst = owner_pair
    rc, out, err = _cutover_with_a_row_tampered_after_the_lsn(src, dst, daemons, "4")
    assert rc == 1, out + err
    assert "catch-up round found differences" in err and "in public.w" in err and "Traceback" not in err, err
    assert "row (id)=(7): differs" in err, err
    assert out == ""  # no receipt: no cutover began
    assert not src.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'pgferry_fence'")
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'pgferry_verify%'")
    d = daemons[-1]
    assert d.running(), d.output()
    src.execute("UPDATE w SET v = 'after' WHERE id = 8")
    wait_for(lambda: dst.execute("SELECT v FROM w WHERE id = 8") == [("after",)], 30, "the daemon streaming on")


def test_verify_online_survives_a_daemon_killed_and_restarted_while_it_compares(pair, daemons):
    """Both snapshots are taken before the comparison: a daemon killed (SIGKILL) and restarted
    meanwhile changes nothing compared; a daemon gone before it could hold fails the verify."""
    src, dst = pair
    src.execute("CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big SELECT g, 'b' FROM "
                "generate_series(1, 3000) g; CREATE TABLE w (id int PRIMARY KEY, v text)")
    d = _start_streaming(src, dst, daemons)
    stop = threading.Event()

    def load() -> None:
        conn = psycopg2.connect(src.dsn)
        conn.autocommit = True
        n = 0
        while not stop.is_set():
            n += 1
            conn.cursor().execute("INSERT INTO w VALUES (%s, 'load'); UPDATE big SET v = %s WHERE id = %s",
                                  (n, str(n), n % 3000 + 1))
        conn.close()

    t = threading.Thread(target=load, daemon=True)
    t.start()

    def restart() -> None:
        d.kill()
        d.start()

    try:
        rc, out, err = while_comparing(["verify", "--online", "--json", "--max-rate", "1000", "--source", src.dsn,
                                        "--target", dst.dsn], "[1/2] public.big", restart)
    finally:
        stop.set()
        t.join(10)
    assert rc == 0, out + err + d.output()
    res = json.loads(out)
    assert res["ok"] and [t["name"] for t in res["tables"]] == ["public.big", "public.w"], res
    d.wait_caught_up(timeout=60)
    assert_same_tables(src, dst, {"big": ["id", "v"], **W})
    # killed before it holds: nothing is compared, the verify says why
    d.kill()
    r = pgferry("verify", "--online", "--timeout", "10", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "no `pgferry start` streams this slot" in r.stderr, r.stderr
    assert "tables compared" not in r.stdout


def test_verify_online_while_large_transactions_stream(pair, daemons):
    """Transactions bigger than logical_decoding_work_mem (streamed to the daemon in pieces before
    they commit) keep committing around the LSN: the comparison finds both sides equal."""
    src, dst = pair
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text); CREATE TABLE big (id bigint PRIMARY KEY, v text)")
    d = _start_streaming(src, dst, daemons, source_dsn=src.dsn + " options='-c logical_decoding_work_mem=64kB'")
    stop = threading.Event()
    batches = [0]

    def large() -> None:
        conn = psycopg2.connect(src.dsn)
        conn.autocommit = True
        while not stop.is_set():
            i = batches[0]
            conn.cursor().execute("INSERT INTO big SELECT g, repeat('x', 50) FROM generate_series(%s, %s) g",
                                  (i * 20_000 + 1, (i + 1) * 20_000))
            batches[0] += 1
        conn.close()

    t = threading.Thread(target=large, daemon=True)
    t.start()
    try:
        wait_for(lambda: batches[0] >= 2, 60, "large transactions")
        r = pgferry("verify", "--online", "--json", "--source", src.dsn, "--target", dst.dsn)
        first = batches[0]
        wait_for(lambda: batches[0] >= first + 2, 60, "more large transactions after the verify")
    finally:
        stop.set()
        t.join(30)
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    res = json.loads(r.stdout)
    rows = {x["name"]: x["source_rows"] for x in res["tables"]}
    assert res["ok"] and rows["public.big"] % 20_000 == 0 and rows["public.big"] > 0, res
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, {"big": ["id", "v"], **W})


def test_repair_copies_the_differing_ranges_again_under_load(owner_pair, daemons, tmp_path):
    """Rows changed, deleted and added on the target behind pgferry's back: `repair` lists their
    key ranges (a dry run changes nothing), `--apply` copies them again as of one LSN while pgbench
    writes on, and the tables end equal; a table without a key is left to `resync`."""
    src, dst = owner_pair
    subprocess.run([PGBENCH, "-i", "-s", "1", "-q", "-d", src.dsn], check=True, capture_output=True)
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text); INSERT INTO w SELECT g, 'v' FROM "
                "generate_series(1, 1000) g; CREATE TABLE nokey (v text); INSERT INTO nokey VALUES ('a'), ('b'); "
                "INSERT INTO pgbench_accounts VALUES (100001, 1, 0, '')")  # (pgbench writes aid 1 to 100000)
    d = _start_streaming(src, dst, daemons)
    dst.execute("UPDATE w SET v = 'changed' WHERE id = 17; DELETE FROM w WHERE id = 33; "
                "INSERT INTO w VALUES (5000, 'extra'); UPDATE pgbench_accounts SET filler = 'x' WHERE aid = 100001")
    bench = subprocess.Popen([PGBENCH, "-c", "2", "-j", "2", "-T", "120", "-n", "-d", src.dsn],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        wait_for(lambda: src.execute("SELECT count(*) FROM pgbench_history")[0][0] > 200, 60, "pgbench")
        r = pgferry("repair", "--json", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1, r.stdout + r.stderr
        dry = json.loads(r.stdout)
        assert not dry["applied"] and set(dry["ranges"]) == {"public.w", "public.pgbench_accounts"}, (dry, r.stderr)
        assert dst.execute("SELECT v FROM w WHERE id = 17") == [("changed",)]  # nothing changed
        r = pgferry("repair", "--apply", "--json", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        done = json.loads(r.stdout)
        assert done["ok"] and done["applied"] and done["applied_at_lsn"] and done["rows_copied"] >= 1000, done
        assert {t["name"] for t in done["after"]} == {"public.w", "public.pgbench_accounts"}, done
        assert all(t["match"] for t in done["after"]), done
        # a table without a key: named, not repaired
        dst.execute("UPDATE nokey SET v = 'z' WHERE v = 'a'")
        r = pgferry("repair", "--apply", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "public.nokey: not repaired: no primary key" in r.stdout, r.stdout + r.stderr
        assert "pgferry resync public.nokey" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
    finally:
        bench.kill()
        bench.wait()
    d.wait_caught_up(timeout=60)
    assert d.running(), d.output()
    assert_same_tables(src, dst, {"w": ["id", "v"], "pgbench_accounts": ["aid", "bid", "abalance", "filler"],
                                  "pgbench_tellers": ["tid", "bid", "tbalance", "filler"]})


def test_cutover_verify_online_with_partitions_toast_and_a_truncate(pair, daemons):
    """Partitions (the stream names the leaves), rows with TOASTed values updated around them (the
    stream leaves the unchanged TOAST value out, the key is there), a keyless table and a TRUNCATE
    after the comparison: each compared by key or whole under the fence, and equal."""
    src, dst = pair
    src.execute("CREATE TABLE p (id int, part int, v text, PRIMARY KEY (id, part)) PARTITION BY LIST (part); "
                "CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1); CREATE TABLE p2 PARTITION OF p FOR VALUES IN (2); "
                "INSERT INTO p SELECT g, 1 + g % 2, 'v' FROM generate_series(1, 2000) g; "
                "CREATE TABLE t (id int PRIMARY KEY, n int, doc text); "
                "INSERT INTO t SELECT g, 0, repeat(md5(g::text), 40000) FROM generate_series(1, 20) g; "
                "CREATE TABLE k (v text); INSERT INTO k VALUES ('a'); "
                "CREATE TABLE gone (id int PRIMARY KEY); INSERT INTO gone SELECT generate_series(1, 100)")
    d = _start_streaming(src, dst, daemons)
    rc, out, err = while_comparing(
        ["cutover", "--verify", "online", "--max-rate", "2000", "--catch-up-rounds", "0", "--source", src.dsn,
         "--target", dst.dsn, "--timeout", "30"], "[1/",
        lambda: src.execute("UPDATE p SET v = 'changed' WHERE id IN (4, 5); UPDATE t SET n = n + 1 WHERE id <= 5; "
                            "INSERT INTO k VALUES ('b'); TRUNCATE gone; INSERT INTO gone VALUES (7)"))
    assert rc == 0, out + err + d.output()
    receipt = json.loads(out)
    changes = receipt["changes_verified"]
    assert receipt["ok"] and changes["tables_by_key"] == ["public.p1", "public.p2", "public.t"], changes
    assert changes["tables_whole"] == {"public.gone": "truncated", "public.k": "no primary key"}, changes
    rows = {t["name"]: t["source_rows"] for t in receipt["tables"]}
    assert rows["public.t"] == 5 and rows["public.gone"] == 1, rows
    assert_same_tables(src, dst, {"p": ["id", "part", "v"], "t": ["id", "n", "doc"], "k": ["v"], "gone": ["id"]})


def test_cutover_verify_online_with_a_key_update_a_reordered_key_and_ddl(pair, daemons):
    """A primary key updated (old and new key both compared), a primary key whose columns are not
    in table order (still compared by key), and a table altered by DDL after the comparison's LSN
    (compared whole); `--fence none` is refused with --verify online (exit 2)."""
    src, dst = pair
    src.execute("CREATE TABLE w (id int PRIMARY KEY, v text); INSERT INTO w SELECT g, 'v' FROM "
                "generate_series(1, 1000) g; CREATE TABLE c (a int, b int, v text, PRIMARY KEY (b, a)); "
                "INSERT INTO c SELECT g, g % 7, 'c' FROM generate_series(1, 1000) g; "
                "CREATE TABLE d (id int PRIMARY KEY); INSERT INTO d SELECT generate_series(1, 100)")
    d = _start_streaming(src, dst, daemons)
    r = pgferry("cutover", "--verify", "online", "--fence", "none", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 2 and "--verify online needs the fence" in r.stderr, r.stderr
    rc, out, err = while_comparing(
        ["cutover", "--verify", "online", "--max-rate", "1000", "--catch-up-rounds", "0", "--source", src.dsn,
         "--target", dst.dsn, "--timeout", "30"], "[1/",
        lambda: src.execute("UPDATE w SET id = 10003 WHERE id = 3; UPDATE c SET v = 'changed' WHERE a = 8; "
                            "ALTER TABLE d ADD COLUMN z int DEFAULT 5"))
    assert rc == 0, out + err + d.output()
    receipt = json.loads(out)
    changes = receipt["changes_verified"]
    assert receipt["ok"] and changes["tables_by_key"] == ["public.c", "public.w"], changes
    assert changes["tables_whole"] == {"public.d": "changed by DDL (ALTER TABLE)"}, changes
    rows = {t["name"]: (t["source_rows"], t["target_rows"]) for t in receipt["tables"]}
    assert rows["public.w"] == (1, 1) and rows["public.c"] == (1, 1) and rows["public.d"] == (100, 100), rows
    assert receipt["online_verify"]["table_rows"] == {"public.c": 1000, "public.d": 100, "public.w": 1000}
    assert_same_tables(src, dst, {"w": ["id", "v"], "c": ["a", "b", "v"], "d": ["id", "z"]})
