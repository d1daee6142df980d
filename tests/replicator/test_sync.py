"""`pgferry start` with the initial copy: a populated source under live pgbench writes."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from replicator.errors import CopyError
from replicator.local.servers import find_bindir
from replicator.sync import copy, libpq, postdata
from replicator.sync import initial as sync
from replicator.sync.initial import InitialSync, SyncConfig, copy_sequences
from tests.pgplugin import (
    ROOT,
    Daemon,
    Db,
    assert_same_tables,
    pgferry,
    slow_inserts_under_a_timeout,
    wait_for,
)

pytestmark = pytest.mark.pg

PGBENCH = str(find_bindir(18) / "pgbench")
TABLES = {
    "pgbench_accounts": ["aid", "bid", "abalance", "filler"],
    "pgbench_branches": ["bid", "bbalance", "filler"],
    "pgbench_tellers": ["tid", "bid", "tbalance", "filler"],
    "pgbench_history": ["tid", "bid", "aid", "delta", "mtime", "filler"],
    "typed": ["id", "m", "d", "r", "p", "a", "j", "n", "f", "t", "b", "u", "ts", "iv", "c", "cu"],
}

TYPED = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (x integer, label text);
CREATE TABLE typed (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, m mood, d posint, r int4range, p pair,
    a text[], j jsonb, n numeric, f float8, t text, b bytea, u uuid, ts timestamptz, iv interval,
    twice bigint GENERATED ALWAYS AS (id * 2) STORED, c char(7), cu bpchar);
ALTER TABLE typed ALTER COLUMN t SET STORAGE EXTERNAL;
INSERT INTO typed (m, d, r, p, a, j, n, f, t, b, u, ts, iv, c, cu)
SELECT (ARRAY['sad','ok','happy'])[1 + g % 3]::mood, 1 + g, int4range(g, g + 10), ROW(g, 'żółw "' || g || '"')::pair,
       ARRAY['a', NULL, 'q"uote'], jsonb_build_object('g', g, 'arr', jsonb_build_array(1, 'x')),
       CASE WHEN g % 50 = 0 THEN 'NaN'::numeric ELSE g / 7.0 END,
       CASE WHEN g % 40 = 0 THEN '-Infinity'::float8 ELSE g * 1.5 END,
       CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 200) ELSE 'naïve ☃ ' || g END,
       decode(md5(g::text), 'hex'), md5(g::text)::uuid,
       CASE WHEN g % 30 = 0 THEN 'infinity'::timestamptz ELSE now() - g * interval '1 minute' END,
       make_interval(days => g, secs => g / 3.0),
       CASE g % 5 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN 'ż ' || g % 10 ELSE ' c ' || g % 1000 END,
       'u' || g % 3 || repeat(' ', g % 4)
FROM generate_series(1, 5000) g;
CREATE SEQUENCE standalone START 100;
SELECT nextval('standalone') FROM generate_series(1, 5);
"""

TYPED_WRITES = """
INSERT INTO typed (m, d, t) VALUES ('happy', :aid % 1000 + 1, 'from pgbench ' || :aid);
UPDATE typed SET n = n + 1, t = t WHERE id = :aid % 5000 + 1;
"""


def _load(src: Db, scale: int) -> None:
    subprocess.run([PGBENCH, "-i", "-s", str(scale), "-q", "-d", src.dsn], check=True, capture_output=True)
    src.psql(TYPED)


def _pgbench(src: Db, tmp_path, seconds: int) -> subprocess.Popen:
    script = tmp_path / "typed.sql"
    script.write_text("\\set aid random(1, 100000)\n" + TYPED_WRITES)
    return subprocess.Popen([PGBENCH, "-c", "4", "-T", str(seconds), "-n", "-b", "tpcb-like", "-f", str(script),
                             "-d", src.dsn], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _check_done(src: Db, dst: Db, d: Daemon, bench: subprocess.Popen) -> None:
    assert bench.wait(timeout=300) == 0, bench.stderr.read() if bench.stderr else ""
    d.wait_caught_up(timeout=300)
    assert_same_tables(src, dst, TABLES)
    # sequences were copied at the end of the copy: the target's are at least the source's at that time
    (seq,) = dst.execute("SELECT last_value FROM standalone")[0]
    assert seq == 104
    assert d.stop() == 0
    out = d.output()
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_copy_under_pgbench_load_meets_the_stream_exactly(pair, daemons, tmp_path):
    src, dst = pair
    _load(src, 10)
    bench = _pgbench(src, tmp_path, 25)
    wait_for(lambda: src.execute("SELECT count(*) FROM pgbench_history")[0][0] > 100, 30, "pgbench to write")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    _check_done(src, dst, d, bench)
    out = d.output()
    assert "copied public.pgbench_accounts: 1000000 rows" in out and "(binary)" in out and "(text)" in out, out
    # indexes and constraints came after the copy
    assert dst.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'pgbench_accounts'") == [(1,)]


@pytest.mark.slow
def test_killed_mid_copy_then_restarted_resumes_without_loss(pair, daemons, tmp_path):
    src, dst = pair
    _load(src, 10)
    bench = _pgbench(src, tmp_path, 25)
    wait_for(lambda: src.execute("SELECT count(*) FROM pgbench_history")[0][0] > 100, 30, "pgbench to write")
    d = Daemon(src, dst, "--jobs", "2", copy=True, ready=False, env={"PGFERRY_FAILPOINT": "mid_copy"})
    daemons.append(d)
    assert d.wait_exit(timeout=120) == 99, d.output()
    assert "failpoint mid_copy reached" in d.output()
    copied = dst.execute("SELECT count(*) FILTER (WHERE state = 'copied'), count(*) FROM pgferry.tables")[0]
    assert copied[0] < copied[1], copied  # the kill came mid-copy
    r = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "--json", "--source", src.dsn, "--target",
                        dst.dsn], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    st = json.loads(r.stdout)
    assert st["phase"] == "stopped" and not st["daemon_running"], st
    assert "copying" in {t["state"] for t in st["tables"]}, st  # the table the kill interrupted
    d.env.pop("PGFERRY_FAILPOINT")
    d.start()
    _check_done(src, dst, d, bench)
    out = d.output()
    assert "resuming the initial sync" in out and "in a new snapshot" in out, out


def test_no_schema_reports_every_difference_before_anything_starts(pair, daemons):
    src, dst = pair
    src.execute("CREATE TABLE a (id int PRIMARY KEY, x text, y int); CREATE TABLE b (id int PRIMARY KEY)")
    dst.execute("CREATE TABLE a (id int PRIMARY KEY, x int)")
    d = Daemon(src, dst, "--no-schema", copy=True, ready=False)
    daemons.append(d)
    assert d.wait_exit() == 1
    out = d.output()
    assert "table public.b is missing" in out and "public.a: column y (integer) is missing" in out, out
    assert "public.a: column x is integer on the target but text on the source" in out, out
    assert "Traceback" not in out, out
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgferry'")


# The data path: the C pump between two libpq connections, or psql processes where it is missing.
TABLE_A = ("CREATE TABLE a (id int PRIMARY KEY, x text); "
           "INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 1000) g")
PATHS = [pytest.param({}, "(binary)", id="pump"),
         pytest.param({"PGFERRY_PURE_PYTHON": "1"}, "(binary, psql)", id="psql")]


@pytest.mark.parametrize(("env", "how"), PATHS)
def test_no_schema_copies_into_tables_made_by_hand(pair, daemons, env, how):
    src, dst = pair
    src.execute(TABLE_A)
    dst.execute("CREATE TABLE a (x text, id int PRIMARY KEY, extra int DEFAULT 7)")
    d = Daemon(src, dst, "--no-schema", copy=True, ready=False, env=env)
    daemons.append(d)
    wait_for(lambda: d.progress() > 0 or not d.running(), 60, "the sync to start")
    src.execute("UPDATE a SET x = 'changed' WHERE id <= 10")
    d.wait_caught_up()
    assert_same_tables(src, dst, {"a": ["id", "x"]})
    assert dst.execute("SELECT count(*) FROM a WHERE extra = 7") == [(1000,)]
    assert "copied public.a: 1000 rows in" in d.output() and how in d.output(), d.output()


@pytest.mark.parametrize(("env", "how"), PATHS)
def test_a_copy_the_target_rejects_stops_with_its_error_and_keeps_nothing(pair, daemons, env, how):
    src, dst = pair
    src.execute(TABLE_A)
    dst.execute("CREATE TABLE a (id int PRIMARY KEY, x text CHECK (x <> 'v500'))")
    d = Daemon(src, dst, "--no-schema", copy=True, ready=False, env=env)
    daemons.append(d)
    assert d.wait_exit(timeout=60) == 1, d.output()
    out = d.output()
    assert "copying public.a failed" in out and 'violates check constraint "a_x_check"' in out, out
    assert "Traceback" not in out, out
    assert dst.execute("SELECT count(*) FROM a") == [(0,)]  # the table's copy is one transaction
    # not copied; 'copying' only where the mark is worth a commit (psql, or tables of 8 MB and more)
    state = "pending" if how == "(binary)" else "copying"
    assert dst.execute("SELECT state FROM pgferry.tables WHERE table_name = 'a'") == [(state,)]


@pytest.mark.parametrize("broken", ["pg_dump", "pg_restore"])
def test_a_failing_schema_dump_stops_the_start_with_pg_dumps_own_words(pair, daemons, tmp_path, broken):
    """The schema is dumped once (pg_dump, custom format) and its sections taken out by pg_restore:
    either failing stops the start with exit 1 and the tool's last line, not a traceback."""
    src, dst = pair
    src.execute(TABLE_A)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    from replicator.sync.pgtools import find_pg_dump

    real = find_pg_dump()
    for tool in ("pg_dump", "pg_restore"):
        script = bindir / tool
        body = (f'echo "{tool}: error: the disk is on fire" >&2; exit 1' if tool == broken else
                f'exec {Path(real).with_name(tool)} "$@"')
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    d = Daemon(src, dst, copy=True, ready=False, env={"PGFERRY_PG_DUMP": str(bindir / "pg_dump")})
    daemons.append(d)
    assert d.wait_exit(timeout=60) == 1, d.output()
    out = d.output()
    assert f"{broken}: error: the disk is on fire" in out and "Traceback" not in out, out
    assert ("pg_dump --schema-only of source" if broken == "pg_dump" else "pg_restore --section=pre-data") in out, out


def test_many_small_tables_share_connections_and_stale_rows_are_replaced(pair):
    """A schema of many small tables: the copy threads reuse their connections (a managed target
    limits connections, and opening them cost more than copying), and a small table that already
    has rows on the target is emptied in its copy's transaction."""
    src, dst = pair
    n = 40
    ddl = "".join(f"CREATE TABLE t{i} (id int PRIMARY KEY, v text);" for i in range(n))
    src.psql(ddl + "".join(f"INSERT INTO t{i} SELECT g, 'v{i}.' || g FROM generate_series(1, 20) g;"
                           for i in range(n)))
    dst.psql(ddl + "INSERT INTO t7 VALUES (1, 'stale'), (999, 'stale');")
    # one connection for the checks, so that only pgferry's sessions add up
    watch = psycopg2.connect(dst.dsn)
    watch.autocommit = True
    cur = watch.cursor()

    def one(sql: str) -> object:
        cur.execute(sql)
        row = cur.fetchone()
        return row[0] if row else None

    sessions = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
    try:
        before = one(sessions)
        InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="pgferry",
                               schema="pgferry", schema_copy=False, jobs=2)).run()
        # every connection is closed: its backend has exited and counted its session
        wait_for(lambda: one("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgferry%'") == 0,
                 30, "pgferry's target connections to close")
        opened = one(sessions) - before
    finally:
        watch.close()
    assert opened < n // 2, f"{opened} target connections for {n} tables"  # 5 now; 123 (3 per table) before
    assert_same_tables(src, dst, {f"t{i}": ["id", "v"] for i in range(n)})
    assert dst.execute("SELECT count(*), sum(rows) FROM pgferry.tables WHERE state = 'copied'") == [(n, n * 20)]


def test_sequences_are_copied_in_one_statement_and_those_the_target_lacks_are_named_not_set(pair):
    """copy_sequences (end of the copy, and cutover): every source sequence the target has gets the
    source's value, quoted names included; one the target lacks (--no-schema, a hand-made target)
    is left out of what it reports instead of failing."""
    src, dst = pair
    src.psql('CREATE SCHEMA "Odd ""s"""; CREATE SEQUENCE "Odd ""s""".".q 1" START 5; CREATE SEQUENCE plain;'
             "CREATE SEQUENCE only_here; CREATE SEQUENCE never_used;"
             "SELECT nextval('\"Odd \"\"s\"\"\".\".q 1\"'), nextval('plain'), nextval('plain'),"
             " setval('only_here', 70)")
    dst.psql('CREATE SCHEMA "Odd ""s"""; CREATE SEQUENCE "Odd ""s""".".q 1"; CREATE SEQUENCE plain;'
             "CREATE SEQUENCE never_used")
    copied = copy_sequences(src.dsn, dst.dsn)
    assert sorted(copied) == [('Odd "s"..q 1', 5), ("public.plain", 2)]  # never_used: no value yet
    assert dst.execute("SELECT nextval('\"Odd \"\"s\"\"\".\".q 1\"'), nextval('plain'), "
                       "nextval('never_used')") == [(6, 3, 1)]


@pytest.mark.parametrize("path", ["pump", "psql"])
def test_the_copy_outlasts_the_servers_statement_timeout(pair, monkeypatch, path):
    """A server's statement_timeout and transaction_timeout (17+) are meant for the application's
    queries: the copy's sessions turn them off (as pg_dump does), so a slow COPY is not cancelled
    half-way through a migration, nor are the source's snapshot transactions that feed it. On both
    copy paths (the psql one is taken where the C pump cannot be built)."""
    if path == "psql":
        monkeypatch.setattr(libpq, "pump", lambda: None)
    src, dst = pair
    src.execute(TABLE_A)
    dst.execute("CREATE TABLE a (id int PRIMARY KEY, x text)")
    slow_inserts_under_a_timeout(dst, "a")
    src.execute(f"ALTER DATABASE {src.name} SET statement_timeout = '200ms'")
    if src.server.version >= 17:
        src.execute(f"ALTER DATABASE {src.name} SET transaction_timeout = '300ms'")
    InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="pgferry",
                           schema="pgferry", schema_copy=False, jobs=1)).run()
    assert_same_tables(src, dst, {"a": ["id", "x"]})


def test_tables_without_identity_that_get_updates_stop_before_publishing(pair, daemons):
    src, dst = pair
    src.psql("""CREATE TABLE keyless (a int, b text); INSERT INTO keyless VALUES (1, 'x');
        UPDATE keyless SET b = 'y'; CREATE TABLE logonly (a int); INSERT INTO logonly VALUES (1);
        CREATE UNLOGGED TABLE scratch (a int); SELECT lo_create(0);""")
    wait_for(lambda: src.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'keyless'")[0][0] > 0,
             30, "table statistics")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    assert d.wait_exit() == 1
    out = d.output()
    assert "receive UPDATE or DELETE: public.keyless" in out and "REPLICA IDENTITY FULL" in out, out
    assert "unlogged tables are not replicated: public.scratch" in out, out
    assert "1 large objects" in out and "seem insert-only" in out and "public.logonly" in out, out
    # nothing was created on the source: the application's updates keep working
    assert not src.execute("SELECT 1 FROM pg_publication")
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgferry'")


STYLES_DDL = """CREATE TYPE mood AS ENUM ('ok', 'meh');
CREATE TABLE w (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz, i interval, f float8, r real, m mood,
    a text[])"""


def _styles_rows(first: int, last: int) -> str:
    return (f"INSERT INTO w SELECT g, date '2026-11-05' + g, timestamp '2026-03-04 05:06:07.123456' + g * "
            "interval '1 day', timestamptz '2026-03-04 05:06:07+03' + g * interval '1 hour', "
            "make_interval(days => -g, secs => g * 1.5), 1.0 / (g + 3), 1.0 / (g + 7), 'meh', "
            "ARRAY['v' || g, NULL] "
            f"FROM generate_series({first}, {last}) g")


STYLES_CANON = ("SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; "
                "SET TimeZone = 'UTC'; SELECT id, d::text, ts::text, tz::text, i::text, f::text, r::text, m::text, "
                "a::text, a[2] IS NULL FROM w ORDER BY id")


@pytest.mark.parametrize(("env", "how"), PATHS)
def test_values_cross_in_portable_formats_whatever_the_sources_settings(pair, daemons, env, how):
    """A source database set for its applications (DateStyle 'SQL, DMY', IntervalStyle
    sql_standard, extra_float_digits -3, an Indian time zone) and a target with array_nulls off
    (and xmloption document, which servers without libxml ignore): the copy (text, for the enum) and
    the stream carry the same values. Before,
    the copy rounded floats and the stream stopped on 30/03/2026 (a day read as a month); a day up
    to 12 would swap silently, and a NULL in a text array would arrive as the string 'NULL'."""
    src, dst = pair
    src.psql(STYLES_DDL + ";" + _styles_rows(1, 25))
    for setting in ("DateStyle = 'SQL, DMY'", "IntervalStyle = 'sql_standard'", "extra_float_digits = -3",
                    "TimeZone = 'Asia/Kolkata'"):
        src.execute(f"ALTER DATABASE {src.name} SET {setting}")
    for setting in ("array_nulls = off", "xmloption = document"):
        dst.execute(f"ALTER DATABASE {dst.name} SET {setting}")
    d = Daemon(src, dst, copy=True, ready=False, env=env)
    daemons.append(d)
    d.wait_ready()
    src.execute(_styles_rows(26, 50))
    d.wait_caught_up()
    a, b = src.execute(STYLES_CANON), dst.execute(STYLES_CANON)
    assert len(a) == 50
    assert a == b, [(x, y) for x, y in zip(a, b, strict=False) if x != y][:3]
    assert "copied public.w: 25 rows in" in d.output() and f"({'text' if how == '(binary)' else 'text, psql'})" \
        in d.output(), d.output()


def test_rows_hidden_by_row_level_security_stop_the_start_instead_of_a_partial_copy(pair, daemons):
    """A table whose policies hide rows from pgferry's role (not a superuser, no BYPASSRLS): its COPY
    would return only the visible rows, silently. Preflight names it with the fix; the copy session
    sets row_security = off, so even past preflight the COPY fails instead of copying a part."""
    src, dst = pair
    role = f"mig_{src.name}"
    src.psql(f"""CREATE TABLE secret (id int PRIMARY KEY, owner text);
        INSERT INTO secret SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END FROM generate_series(1, 100) g;
        ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
        CREATE POLICY only_a ON secret USING (owner = 'a');
        CREATE ROLE {role} LOGIN REPLICATION;
        GRANT SELECT ON secret TO {role};
        CREATE PUBLICATION pgferry FOR ALL TABLES;""")
    source = src.server.dsn(src.name, user=role)
    try:
        assert len(src.execute(f"SET ROLE {role}; SELECT * FROM secret")) == 50  # what the role sees
        d = Daemon(src, dst, copy=True, ready=False, source_dsn=source)
        daemons.append(d)
        assert d.wait_exit(timeout=60) == 1, d.output()
        out = d.output()
        assert "row-level security hides rows of public.secret" in out and f"ALTER ROLE {role} BYPASSRLS" in out, out
        assert "Traceback" not in out and not src.execute("SELECT 1 FROM pg_replication_slots"), out
        # past preflight (InitialSync alone does not run it), the copy session refuses too
        with pytest.raises(CopyError, match=r"copying public\.secret failed on the source: query would be "
                                            r"affected by row-level security policy"):
            InitialSync(SyncConfig(source=source, target=dst.dsn, publication="pgferry", slot="rls", schema="rls",
                                   jobs=1)).run()
        assert dst.execute("SELECT count(*) FROM secret") == [(0,)]
        dst.execute("DROP TABLE secret; DROP SCHEMA rls CASCADE")
        src.execute(f"ALTER ROLE {role} BYPASSRLS")
        d.start()
        d.wait_ready()
        assert d.stop() == 0, d.output()
        assert dst.execute("SELECT count(*) FROM secret") == [(100,)]
    finally:
        src.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
        src.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_latin1_source_is_copied_and_streamed_into_a_utf8_target(pair, daemons):
    """A source database in LATIN1: pg_dump wrote the schema in it (an enum label 'é' made pgferry
    fail with a traceback decoding it as UTF-8); pgferry asks pg_dump for UTF-8, and the copy and
    the stream convert through the sessions' client encoding. Values compared as characters (the
    row hashes of two encodings differ)."""
    src0, dst = pair
    name = src0.name + "_l1"
    Db(src0.server, "postgres").execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                                        "TEMPLATE template0")
    src = Db(src0.server, name)
    try:
        _run_latin1(src, dst, daemons)
    finally:
        for d in daemons:
            d.close()
        src.drop()


def _run_latin1(src, dst, daemons):
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text, c char(5), vc varchar(10)); "
                "CREATE TYPE e AS ENUM ('é'); ALTER TABLE t ADD COLUMN en e")
    src.execute("INSERT INTO t SELECT g, 'café ' || g, 'ñ', 'Øre', 'é' FROM generate_series(1, 30) g")
    src.execute("CREATE PUBLICATION pgferry FOR ALL TABLES")
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    d.wait_ready()
    src.execute("INSERT INTO t SELECT g, 'straße ' || g, 'ü', 'Ærø', 'é' FROM generate_series(31, 60) g")
    src.execute("UPDATE t SET v = v || ' à' WHERE id % 2 = 0")
    d.wait_caught_up()
    q = "SELECT id, v, c, vc, en::text FROM t ORDER BY id"
    a, b = src.execute(q), dst.execute(q)
    assert len(a) == 60 and a == b, [(x, y) for x, y in zip(a, b, strict=False) if x != y][:3]
    assert dst.execute("SELECT v FROM t WHERE id = 2") == [("café 2 à",)]
    assert d.stop() == 0, d.output()
    # verify hashes the rows as UTF-8 on both sides (before: every non-ASCII row differed)
    r = pgferry("verify", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    dst.execute("UPDATE t SET v = 'cafe 2 à' WHERE id = 2")
    assert pgferry("verify", "--source", src.dsn, "--target", dst.dsn).returncode == 1


def test_a_tables_indexes_build_as_soon_as_it_is_copied_while_the_others_copy(pair, monkeypatch):
    """Post-data runs beside the copy: a big table's primary key is created once the table is
    copied, before the next table's copy starts (here the copy of `later` waits for it, so without
    the overlap it would time out); the small tables' indexes follow after the copy."""
    src, dst = pair
    if libpq.pump() is None:
        pytest.skip("the C pump is not built")
    monkeypatch.setattr(postdata, "SMALL_TABLE_BYTES", 100_000)
    src.psql("CREATE TABLE first (id int PRIMARY KEY, v text); CREATE TABLE later (id int PRIMARY KEY, v text);"
             "INSERT INTO first SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g;"
             "INSERT INTO later SELECT g, 'y' FROM generate_series(1, 100) g;")
    real_copy = sync.copy_table

    def copy_later_once_first_has_its_key(cfg, t, *args, **kwargs):
        if t.name == "later":
            wait_for(lambda: dst.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'first_pkey'") == [(1,)],
                     30, "the primary key of the copied table while another is still to copy")
        return real_copy(cfg, t, *args, **kwargs)

    monkeypatch.setattr(sync, "copy_table", copy_later_once_first_has_its_key)
    InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="pgferry",
                           schema="pgferry", jobs=1)).run()
    assert_same_tables(src, dst, {"first": ["id", "v"], "later": ["id", "v"]})
    assert dst.execute("SELECT count(*) FROM pg_indexes WHERE indexname IN ('first_pkey', 'later_pkey')") == [(2,)]
    assert dst.execute("SELECT post_data_done FROM pgferry.sync") == [(True,)]


def test_a_table_over_the_split_size_is_read_in_block_ranges_into_one_copy(pair, monkeypatch, caplog):
    src, dst = pair
    if libpq.pump() is None:
        pytest.skip("the C pump is not built")
    monkeypatch.setattr(copy, "PUMP_SPLIT_BYTES", 1 << 20)
    monkeypatch.setattr(copy, "SPLIT_BYTES", 1 << 20)
    src.psql("CREATE TABLE big (id int PRIMARY KEY, c char(20), v text);"
             "INSERT INTO big SELECT g, 'c' || g % 7, md5(g::text) FROM generate_series(1, 60000) g;")
    caplog.set_level(logging.INFO, logger="pgferry.sync")
    InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="pgferry",
                           schema="pgferry", jobs=3)).run()
    assert_same_tables(src, dst, {"big": ["id", "c", "v"]})
    assert "copied public.big: 60000 rows" in caplog.text and "binary, 3 block ranges" in caplog.text, caplog.text


MONETARY = "de_DE.UTF-8"  # .ci/run generates it where it is missing (localedef)


@pytest.mark.parametrize(("env", "how"), PATHS)
def test_money_crosses_whatever_the_sources_lc_monetary(pair, daemons, env, how):
    """`money` is printed as lc_monetary says: a source database set to de_DE prints 1234.56 as
    '1.234,56 €', which a target in another locale would misread. The copy (text, for the enum)
    and the stream both carry the same amounts."""
    src, dst = pair
    try:
        src.execute(f"ALTER DATABASE {src.name} SET lc_monetary = '{MONETARY}'")
    except psycopg2.errors.InvalidParameterValue:
        pytest.skip(f"the source server has no {MONETARY} locale (localedef -i de_DE -f UTF-8 {MONETARY})")
    assert src.execute("SELECT 1234.56::money::text") == [("1.234,56 €",)]
    src.psql("CREATE TYPE mood AS ENUM ('ok', 'meh'); CREATE TABLE cash (id int PRIMARY KEY, m mood, amount money);"
             "INSERT INTO cash SELECT g, 'ok', g * 1234.56 - 5000 FROM generate_series(1, 20) g")
    d = Daemon(src, dst, copy=True, ready=False, env=env)
    daemons.append(d)
    d.wait_ready()
    src.execute("INSERT INTO cash SELECT g, 'meh', g * 98765.43 FROM generate_series(21, 40) g; "
                "UPDATE cash SET amount = amount + 0.01::money WHERE id % 3 = 0")
    d.wait_caught_up()
    canon = "SELECT id, amount::numeric FROM cash ORDER BY id"
    assert src.execute(canon) == dst.execute(canon)
    assert "copied public.cash: 20 rows in" in d.output() and "text" in d.output(), d.output()


@pytest.mark.parametrize("schema_copy", [True, False], ids=["schema", "no-schema"])
def test_the_sync_reports_its_phases_in_order(pair, schema_copy):
    """What the metrics' pgferry_phase shows while `start` syncs: schema (the tables being created),
    then copy; with --no-schema straight to copy."""
    src, dst = pair
    src.execute(TABLE_A)
    if not schema_copy:
        dst.execute("CREATE TABLE a (id int PRIMARY KEY, x text)")
    phases: list[str] = []
    InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="pgferry",
                           schema="pgferry", schema_copy=schema_copy, jobs=1), on_phase=phases.append).run()
    assert phases == (["schema", "copy"] if schema_copy else ["copy"])
    assert_same_tables(src, dst, {"a": ["id", "x"]})


def test_a_table_of_large_values_counts_its_toast_in_the_copy_summary(pair, caplog):
    """The copy's size, progress and order count what the COPY moves: a table whose data is all
    TOAST (a tiny heap) is not `0.0 MB`."""
    src, dst = pair
    src.execute("CREATE TABLE docs (id int PRIMARY KEY, body text); ALTER TABLE docs ALTER body SET STORAGE EXTERNAL; "
                "INSERT INTO docs SELECT g, repeat(md5(g::text), 300) FROM generate_series(1, 200) g")
    (toast,) = src.execute("SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'docs'")[0]
    assert toast > 1_000_000  # 200 values of 9.6 kB, stored out of line uncompressed
    caplog.set_level(logging.INFO, logger="pgferry.sync")
    InitialSync(SyncConfig(source=src.dsn, target=dst.dsn, publication="pgferry", slot="pgferry",
                           schema="pgferry", jobs=1)).run()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("copy: 1 tables"))
    mb = float(re.search(r"([\d.]+) MB of source tables", summary).group(1))
    assert mb >= toast / 1e6, summary
    assert_same_tables(src, dst, {"docs": ["id", "body"]})


def test_a_table_dropped_on_the_source_before_the_copy_resumes_is_no_longer_pending(pair, daemons):
    """A copy that stopped on a table (here: the target refuses its rows) and the user drops that
    table from the source: the resumed start no longer lists it pending, and streams."""
    src, dst = pair
    src.execute(TABLE_A + "; CREATE TABLE bad (id int PRIMARY KEY, v int); INSERT INTO bad VALUES (1, 1)")
    dst.execute("CREATE TABLE a (id int PRIMARY KEY, x text); "
                "CREATE TABLE bad (id int PRIMARY KEY, v int CHECK (v > 1))")
    d = Daemon(src, dst, "--no-schema", "--jobs", "1", copy=True, ready=False)
    daemons.append(d)
    assert d.wait_exit(timeout=120) == 1, d.output()
    assert "bad" in {t for (t,) in dst.execute("SELECT table_name FROM pgferry.tables WHERE state <> 'copied'")}
    src.execute("DROP TABLE bad")  # the publication (FOR ALL TABLES) loses it with it
    d.start().wait_ready()
    names = [t["name"] for t in json.loads(pgferry("status", "--json", "--source", src.dsn, "--target",
                                                   dst.dsn).stdout)["tables"]]
    assert names == ["public.a"], names
    assert "no longer published, so not copied: public.bad" in d.output(), d.output()
    assert_same_tables(src, dst, {"a": ["id", "x"]})
