"""`pgferry cutover`, `status`, `verify` and `cleanup` end to end."""

from __future__ import annotations

import json
import logging
import subprocess

import psycopg2
import pytest

from replicator.cutover import verify
from replicator.cutover.handoff import analyze_tables_without_statistics
from tests.pgplugin import Daemon, Db, assert_same_tables, pgferry, publish_same_table, wait_for
from tests.replicator.test_sync import PGBENCH, TABLES, TYPED

pytestmark = pytest.mark.pg


def _status(src: Db, dst: Db) -> dict:
    r = pgferry("status", "--json", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sequences(db: Db) -> dict[str, int]:
    return {f"{s}.{n}": int(v or 0) for s, n, v in db.execute(
        "SELECT schemaname, sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'")}


def test_cutover_under_pgbench_hands_off_exactly_and_cleans_up(pair, daemons, tmp_path):
    src, dst = pair
    subprocess.run([PGBENCH, "-i", "-s", "2", "-q", "-d", src.dsn], check=True, capture_output=True)
    src.psql(TYPED)
    bench = subprocess.Popen([PGBENCH, "-c", "4", "-T", "120", "-n", "-d", src.dsn], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        d = Daemon(src, dst, copy=True, ready=False)
        daemons.append(d)
        wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 120, "streaming")
        st = _status(src, dst)
        assert st["daemon_running"] and {t["state"] for t in st["tables"]} == {"copied"}, st
        receipt_file = tmp_path / "receipt.json"
        r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60", "--receipt",
                str(receipt_file))
        assert r.returncode == 0, r.stdout + r.stderr + d.output()
        receipt = json.loads(receipt_file.read_text())
        assert receipt == json.loads(r.stdout)
        print("write downtime (fence to receipt):", receipt["write_downtime_s"], "s; handed off after",
              receipt["handed_off_after_s"], "s")
        assert receipt["ok"] and receipt["fenced_at"] and receipt["finished_at"]
        # the handoff LSN is the applied LSN stored on the target
        (applied,) = dst.execute("SELECT applied_lsn::text FROM pgferry.progress")[0]
        assert receipt["handoff_lsn"] == applied == receipt["applied_lsn"]
        assert d.wait_exit(timeout=30) == 0, d.output()
        assert "handed off at" in d.output()
    finally:
        bench.wait(timeout=180)
    # after the fence, writes on the source fail with a read-only error
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        src.execute("INSERT INTO pgbench_history (tid, bid, aid, delta) VALUES (1, 1, 1, 1)")
    assert_same_tables(src, dst, TABLES)
    assert {t["name"] for t in receipt["tables"]} >= {"public.pgbench_accounts", "public.typed"}
    assert all(t["match"] and t["source_rows"] == t["target_rows"] for t in receipt["tables"])
    # nextval on the target is above every value the source used
    source_seq = _sequences(src)
    assert source_seq and {s["name"] for s in receipt["sequences"]} == set(source_seq)
    for name, used in source_seq.items():
        (nxt,) = dst.execute("SELECT nextval(%s)", (name,))[0]
        assert nxt > used, (name, nxt, used)
    assert pgferry("verify", "--source", src.dsn, "--target", dst.dsn).returncode == 0
    assert _status(src, dst)["phase"] == "done"
    r = pgferry("cleanup", "--source", src.dsn, "--target", dst.dsn, "--drop-state")
    assert r.returncode == 0, r.stderr
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'pgferry%'")
    assert not src.execute("SELECT 1 FROM pg_publication")
    assert not dst.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'pgferry'")


def test_cutover_verify_count_compares_row_counts_only(pair, daemons):
    """`--verify count`: the tables are counted, not read row by row, in the write downtime; the
    receipt says which comparison was made. And tables without planner statistics (just copied,
    autovacuum not there yet) are analyzed first, before the fence."""
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text); "
                "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 50) g; "
                "CREATE TABLE p (id int, k int) PARTITION BY RANGE (k); "
                "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (100); INSERT INTO p VALUES (1, 1)")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 60, "streaming")
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--fence", "none", "--verify", "count")
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    receipt = json.loads(r.stdout)
    assert receipt["ok"] and receipt["verify"] == "count"
    # the copied tables had no planner statistics, nor the partitioned table above one (autovacuum
    # never analyzes that one): the cutover analyzed them before fencing
    assert receipt["analyzed"] == ["public.p", "public.p1", "public.t"]
    assert dst.execute("SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE schemaname = "
                       "'public' ORDER BY 1") == [
        ("p", True), ("p1", True), ("t", True)]
    assert receipt["tables"] == [{"name": "public.p1", "source_rows": 1, "target_rows": 1, "match": True,
                                  "differences": []},
                                 {"name": "public.t", "source_rows": 50, "target_rows": 50, "match": True,
                                  "differences": []}]
    assert d.wait_exit(timeout=30) == 0, d.output()


def test_a_handoff_marker_in_a_streamed_transaction_is_claimed(pair, daemons):
    """A source that streams every transaction in progress (PostgreSQL 16+:
    debug_logical_replication_streaming = immediate) sends the cutover's marker inside a streamed
    block: the daemon claims it like any other and the cutover hands off."""
    src, dst = pair
    if src.version < 16:
        pytest.skip("debug_logical_replication_streaming is PostgreSQL 16+")
    (dbname,) = src.execute("SELECT current_database()")[0]
    src.execute(f'ALTER DATABASE "{dbname}" SET debug_logical_replication_streaming = immediate')
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 60, "streaming")
    src.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g")
    wait_for(lambda: dst.execute("SELECT count(*) FROM t") == [(100,)] or not d.running(), 60, "the stream")
    assert "applying streamed transaction" in d.output()  # the source does stream them
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--fence", "none", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    receipt = json.loads(r.stdout)
    (applied,) = dst.execute("SELECT applied_lsn::text FROM pgferry.progress")[0]
    assert receipt["ok"] and receipt["handoff_lsn"] == applied
    assert d.wait_exit(timeout=30) == 0, d.output()


def test_tables_the_target_role_may_not_analyze_are_named_not_counted(pair, caplog):
    """The cutover's ANALYZE runs as the target role; a table someone else owns is skipped by the
    server with a warning: pgferry names it in its own warning instead of counting it analyzed."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE mine (id int); CREATE TABLE theirs (id int)")
    role = f"r_{dst.name}"
    dst.psql(f"CREATE ROLE {role} LOGIN; ALTER TABLE mine OWNER TO {role}")
    with caplog.at_level(logging.WARNING, logger="pgferry.cutover"):
        done = analyze_tables_without_statistics(src.dsn, dst.server.dsn(dst.name, user=role), "pgferry")
    assert done == ["public.mine"]
    assert "may not analyze them: public.theirs" in caplog.text, caplog.text
    assert dst.execute("SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables ORDER BY 1") == [
        ("mine", True), ("theirs", False)]


def test_cutover_timeout_lifts_the_fence_and_the_daemon_streams_on(pair, daemons):
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 60, "streaming")
    assert d.stop() == 0
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--timeout", "3")
    assert r.returncode == 1 and "cutover timed out" in r.stderr and "fence is lifted" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    src.execute("INSERT INTO t VALUES (1, 'writable again')")  # the fence is gone
    assert dst.execute("SELECT state FROM pgferry.control") == [("cancelled",)]
    d.start()
    d.wait_caught_up()
    assert d.running(), d.output()  # it ignored the withdrawn handoff marker
    assert "gave up: streaming on" in d.output()
    assert_same_tables(src, dst, {"t": ["id", "v"]})


def test_verify_names_the_table_and_key_range_that_differ(pair, daemons, monkeypatch):
    src, dst = pair
    src.execute("CREATE TABLE t (a int, b int, v text, PRIMARY KEY (a, b)); CREATE TABLE k (v int)")
    src.execute("INSERT INTO t SELECT g / 10, g % 10, 'x' FROM generate_series(0, 2999) g; "
                "INSERT INTO k VALUES (1), (1)")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 60, "streaming")
    assert d.stop() == 0
    assert pgferry("verify", "--source", src.dsn, "--target", dst.dsn).returncode == 0
    dst.execute("UPDATE t SET v = 'changed' WHERE a = 250 AND b = 3")
    dst.execute("DELETE FROM k WHERE ctid = (SELECT min(ctid) FROM k)")
    r = pgferry("verify", "--source", src.dsn, "--target", dst.dsn, "--json")
    assert r.returncode == 1
    result = {t["name"]: t for t in json.loads(r.stdout)["tables"]}
    assert result["public.k"]["differences"] == ["row count 2 on the source, 1 on the target",
                                                  "content differs (table without primary key: hashed whole)"]
    assert not result["public.t"]["match"] and result["public.k"]["match"] is False
    assert "row (a, b)=(250,3): differs" in result["public.t"]["differences"], result["public.t"]
    r = pgferry("verify", "--source", src.dsn, "--target", dst.dsn, "--mode", "count", "--tables", "t")
    assert r.returncode == 0, r.stdout


def test_verify_is_exact_whatever_order_each_servers_collation_keeps_a_text_key(pair, monkeypatch):
    """The target's collation orders a text primary key differently from the source's (another
    collation provider, a newer glibc): equal tables verify equal, in any chunking, and one changed
    value is still found."""
    src, dst = pair
    icu = src.execute("SELECT collname FROM pg_collation WHERE collname = 'und-x-icu'")
    if not icu:
        pytest.skip("this PostgreSQL is built without ICU")
    # ICU sorts 'a' < 'B' < 'c'; C sorts 'B' < 'a' < 'c' (and '_' before lower case letters)
    src.execute('CREATE TABLE w (k text COLLATE "und-x-icu" PRIMARY KEY, v int); CREATE PUBLICATION pgferry '
                "FOR ALL TABLES")
    dst.execute('CREATE TABLE w (k text COLLATE "C" PRIMARY KEY, v int)')
    rows = "INSERT INTO w SELECT w, g FROM generate_series(1, 300) g, LATERAL (SELECT (ARRAY['a', 'B', 'c', " \
           "'_x', 'Ä'])[1 + g % 5] || g AS w) s"
    src.execute(rows)
    dst.execute(rows)
    monkeypatch.setattr(verify, "CHUNK", 7)
    assert [r.match for r in verify.verify(src.dsn, dst.dsn, "pgferry", None, "checksum")] == [True]
    dst.execute("UPDATE w SET v = -1 WHERE k = 'B101'")
    (res,) = verify.verify(src.dsn, dst.dsn, "pgferry", None, "checksum")
    assert not res.match and res.differences, res


def test_verify_outlasts_the_servers_timeouts(pair):
    """statement_timeout (and transaction_timeout on 17+) are meant for the application's queries: a
    verify of a big table takes longer, and must not be cancelled half-way."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE big (id int PRIMARY KEY, v text)")
    for db in (src, dst):
        db.execute("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 300000) g")
        db.execute(f"ALTER DATABASE {db.name} SET statement_timeout = '50ms'")
        if db.server.version >= 17:
            db.execute(f"ALTER DATABASE {db.name} SET transaction_timeout = '50ms'")
    r = pgferry("verify", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0 and "canceling" not in r.stderr + r.stdout, r.stdout + r.stderr


def test_names_are_quoted_where_they_must_be_in_status_and_the_receipt(pair, daemons):
    """`my.schema.we"ird` could be two tables; every name pgferry prints is quoted only where it
    must be: `public.plain`, `"my.schema"."we""ird"`."""
    src, dst = pair
    src.psql('CREATE SCHEMA "my.schema"; CREATE TABLE "my.schema"."we""ird" (id int PRIMARY KEY, v text); '
             "INSERT INTO \"my.schema\".\"we\"\"ird\" VALUES (1, 'a'); CREATE TABLE plain (id int PRIMARY KEY);")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 60, "streaming")
    weird = '"my.schema"."we""ird"'
    assert sorted(t["name"] for t in _status(src, dst)["tables"]) == [weird, "public.plain"]
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--fence", "none", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    assert sorted(t["name"] for t in json.loads(r.stdout)["tables"]) == [weird, "public.plain"]
    assert d.wait_exit(timeout=30) == 0, d.output()
