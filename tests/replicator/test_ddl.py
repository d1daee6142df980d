"""Schema changes during the migration: captured on the source by pgferry's event trigger and
applied on the target where they happened in the stream (sink/ddl.py), under load, across kills."""

from __future__ import annotations

import json
import re
import subprocess
import threading

import psycopg2.errors
import pytest

from replicator.sync.pgtools import find_pg_dump, libpq_env
from tests.pgplugin import Daemon, Db, assert_same_tables, pgferry, publish_same_table, wait_for
from tests.replicator import workload as wl

SMALL_WORK_MEM = " options='-c logical_decoding_work_mem=64kB'"

# A web framework's migrations, each with the data changes an application makes around it. A step
# is a list of statements run in one transaction, or a string run alone (in autocommit).
MIGRATIONS: list[list[str] | str] = [
    ["CREATE TABLE app_user (id bigserial PRIMARY KEY, email text NOT NULL)",
     "INSERT INTO app_user (email) SELECT 'u' || g || '@x' FROM generate_series(1, 50) g"],
    ["ALTER TABLE app_user ADD COLUMN name text",
     "UPDATE app_user SET name = 'n' || id WHERE id % 2 = 0",
     "INSERT INTO app_user (email, name) VALUES ('new@x', 'New')"],
    "CREATE INDEX CONCURRENTLY app_user_email ON app_user (email)",
    ["ALTER TABLE app_user RENAME COLUMN name TO full_name",
     "UPDATE app_user SET full_name = coalesce(full_name, '') || '!' WHERE id < 10"],
    ["ALTER TABLE app_user ALTER COLUMN email TYPE varchar(200)",
     "INSERT INTO app_user (email) VALUES ('typed@x')"],
    ["ALTER TABLE app_user ALTER COLUMN full_name SET DEFAULT 'anon'",
     "INSERT INTO app_user (email) VALUES ('defaulted@x')"],
    ["UPDATE app_user SET full_name = 'x' WHERE full_name IS NULL",
     "ALTER TABLE app_user ALTER COLUMN full_name SET NOT NULL"],
    "ALTER TABLE app_user ALTER COLUMN full_name DROP NOT NULL; ALTER TABLE app_user ALTER COLUMN full_name "
    "DROP DEFAULT",  # two statements in one query string
    ["CREATE TYPE app_mood AS ENUM ('ok', 'sad')",
     "ALTER TABLE app_user ADD COLUMN mood app_mood",
     "UPDATE app_user SET mood = 'sad' WHERE id % 3 = 0"],
    "ALTER TYPE app_mood ADD VALUE 'happy'",
    ["UPDATE app_user SET mood = 'happy' WHERE id < 5"],
    ["CREATE SEQUENCE invoice_no START 1000",
     "CREATE TABLE invoice (id int PRIMARY KEY DEFAULT nextval('invoice_no'), user_id bigint REFERENCES "
     "app_user (id), total numeric CHECK (total >= 0))",
     "INSERT INTO invoice (user_id, total) SELECT id, id * 10 FROM app_user WHERE id <= 20"],
    ["ALTER TABLE invoice ADD CONSTRAINT invoice_total_max CHECK (total < 1000000)",
     "CREATE VIEW big_invoices AS SELECT * FROM invoice WHERE total > 100"],
    ["ALTER TABLE invoice RENAME TO bill",
     "INSERT INTO bill (user_id, total) VALUES (1, 5)",
     "CREATE FUNCTION invoice_total(u bigint) RETURNS numeric LANGUAGE sql AS $$ SELECT sum(total) FROM bill "
     "WHERE user_id = u; $$"],
    ["DROP INDEX app_user_email",
     "ALTER TABLE app_user DROP COLUMN mood",
     "DELETE FROM bill WHERE total > 150"],
    # larger than logical_decoding_work_mem: streamed while in progress, the DDL inside it
    ["CREATE TABLE events (id int PRIMARY KEY, payload text)",
     "INSERT INTO events SELECT g, repeat('e', 200) FROM generate_series(1, 3000) g",
     "ALTER TABLE events ADD COLUMN kind text",
     "INSERT INTO events SELECT g, 'late', 'k' || g FROM generate_series(3001, 3100) g",
     "UPDATE events SET kind = 'early' WHERE id <= 10"],
    ["CREATE TABLE scratch (id int PRIMARY KEY)", "INSERT INTO scratch VALUES (1)"],
    ["ALTER TABLE scratch RENAME TO scratch_old", "DROP TABLE scratch_old"],
]
KILL_AFTER = {2, 6, 10, 15}  # SIGKILL pgferry after these steps (then start it again)
APP_TABLES = {
    "app_user": ["id", "email", "full_name"],
    "bill": ["id", "user_id", "total"],
    "events": ["id", "payload", "kind"],
}


def run_step(db: Db, step: list[str] | str) -> None:
    if isinstance(step, str):
        db.execute(step)
    else:
        db.psql("BEGIN;\n" + ";\n".join(step) + ";\nCOMMIT;")


def schema_of(db: Db) -> list[str]:
    """`pg_dump --schema-only` of the database without pgferry's own objects, normalised: no
    comments, settings, ownership or blank lines."""
    res = subprocess.run([find_pg_dump(), "--schema-only", "--no-owner", "--no-privileges", "--no-publications",
                          "--exclude-schema=pgferry", "-d", db.dsn], capture_output=True, text=True, check=True,
                         env=libpq_env(db.dsn))
    # pgferry's capture on the source; NOT NULL constraints as PostgreSQL 18 names them (15 does not)
    text = re.sub(r"CREATE EVENT TRIGGER[^;]*;", "", res.stdout)
    # the cutover's fence, which stays on the source after the handoff
    text = re.sub(r"(CREATE TRIGGER pgferry_fence|ALTER TABLE [^;]* ENABLE ALWAYS TRIGGER pgferry_fence)[^;]*;", "",
                  text)
    text = re.sub(r"CONSTRAINT \w+_not_null NOT NULL", "NOT NULL", text)
    # and view bodies: 15 qualifies their columns with the table's name, 16+ do not
    text = re.sub(r"CREATE VIEW [^;]*;", lambda m: re.sub(r"\b\w+\.(?=\w+\b(?!\s+AS\b))", "", m.group(0)), text)
    text = "\n".join(line for line in text.splitlines()
                     if line.strip() and not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config", "\\")))
    return text.splitlines()


def _writer(src: Db, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        w = wl.Workload(src, seed=22)
        try:
            w.run(1_000_000, big_every=50, stop=stop)
        finally:
            w.close()
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


@pytest.fixture
def capture_pair(owner_pair):
    src, dst = owner_pair
    src.psql(wl.SOURCE_SCHEMA + "CREATE PUBLICATION pgferry FOR ALL TABLES;")
    return src, dst


def test_migrations_under_load_are_applied_in_order_across_kills(capture_pair, daemons):
    src, dst = capture_pair
    if (src.version, dst.version) == (15, 15):
        pytest.skip("runs on 15 -> 18 and 18 -> 18")
    d = Daemon(src, dst, copy=True, ready=False, source_dsn=src.dsn + SMALL_WORK_MEM)
    daemons.append(d)
    wait_for(lambda: d.progress() > 0 or not d.running(), 90, "the copy to finish")
    assert d.running(), d.output()
    assert "schema changes on source" in d.output() and "are captured" in d.output(), d.output()
    stop, errors = threading.Event(), []
    th = threading.Thread(target=_writer, args=(src, stop, errors), daemon=True)
    th.start()
    try:
        for n, step in enumerate(MIGRATIONS):
            run_step(src, step)
            if n in KILL_AFTER:
                d.wait_caught_up(timeout=90)
                d.kill()
                d.start()
    finally:
        stop.set()
        th.join(60)
    assert not errors, errors
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, {**wl.TABLES, **APP_TABLES})
    assert dst.execute("SELECT enum_range(NULL::app_mood)::text") == [("{ok,sad,happy}",)]
    assert dst.execute("SELECT invoice_total(1)") == src.execute("SELECT invoice_total(1)")
    # exactly once: each captured change applied one time, in source order
    applied = dst.execute("SELECT tag, result FROM pgferry.ddl ORDER BY lsn, id")
    assert ("ALTER TYPE", "applied") in applied and all(r == "applied" for _, r in applied), applied
    assert len([t for t, _ in applied if t == "CREATE INDEX"]) == 1, applied
    out = d.output()
    assert "Traceback" not in out and "applying streamed transaction" in out, out
    st = json.loads(pgferry("status", "--source", src.dsn, "--target", dst.dsn, "--json").stdout)
    assert st["ddl"] == {"applied": len(applied)}, st
    # the cutover hands over with every schema change before it, and restores what it held back
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    assert json.loads(r.stdout)["ok"]
    assert d.wait_exit(timeout=30) == 0, d.output()
    assert schema_of(dst) == schema_of(src)
    r = pgferry("cleanup", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0 and "schema-change capture" in r.stderr, r.stderr
    assert src.execute("SELECT count(*) FROM pg_event_trigger") == [(0,)]
    assert src.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'") == [(0,)]


def test_a_change_the_target_rejects_stops_at_it_in_the_dead_letter_table(pair, daemons):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    dst.execute("CREATE INDEX t_v ON t (v)")  # made by hand already: not an error, said so
    role = f"reader_{src.name}"  # a role only the source's server has
    src.execute(f"CREATE ROLE {role}")
    try:
        d = Daemon(src, dst)
        daemons.append(d)
        src.execute("INSERT INTO t VALUES (1, 'before')")
        src.execute("CREATE INDEX t_v ON t (v)")
        src.execute(f"GRANT SELECT ON t TO {role}")
        assert d.wait_exit() == 1, d.output()
        out = d.output()
        assert "t_v" in out and "already exists), not made again: CREATE INDEX (CREATE INDEX t_v ON t (v))" in out, out
        assert f"the target rejected a schema change GRANT (GRANT SELECT ON t TO {role}): role " in out, out
        assert "does not exist" in out and "commit LSN" in out and "Traceback" not in out, out
        (kind, new_row) = dst.execute("SELECT kind, new_row FROM pgferry.conflicts")[0]
        assert kind == "ddl_rejected" and new_row["query"] == f"GRANT SELECT ON t TO {role}", new_row
        assert dst.execute("SELECT tag, result FROM pgferry.ddl") == [("CREATE INDEX", "already there")]
        assert dst.execute("SELECT * FROM t") == [(1, "before")]
    finally:
        src.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_ddl_stop_and_skip(pair, daemons):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY)")
    d = Daemon(src, dst, "--ddl", "stop")
    daemons.append(d)
    src.execute("INSERT INTO t VALUES (1)")
    src.psql("BEGIN; ALTER TABLE t ADD COLUMN note text; INSERT INTO t VALUES (2, 'x'); COMMIT;")
    assert d.wait_exit() == 1, d.output()
    out = d.output()
    assert "a schema change arrived and ddl = stop: ALTER TABLE (ALTER TABLE t ADD COLUMN note text)" in out, out
    assert dst.execute("SELECT id FROM t") == [(1,)]  # stopped before that transaction
    d = Daemon(src, dst)  # ddl = apply: the change, then its rows
    daemons.append(d)
    d.wait_caught_up()
    assert dst.execute("SELECT id, note FROM t ORDER BY id") == [(1, None), (2, "x")]
    assert d.stop() == 0


def test_a_column_filled_on_the_source_is_re_copied_not_replayed_differently(pair, daemons):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 200) g")
    # values the source's rewrite computed (the WAL carries none), then changes on top of them
    src.psql("BEGIN; ALTER TABLE t ADD COLUMN r double precision DEFAULT random(); UPDATE t SET v = 'in' "
             "WHERE id = 1; COMMIT;")
    src.execute("UPDATE t SET r = 0.5, v = 'after' WHERE id <= 3")
    src.execute("INSERT INTO t (id, v) VALUES (201, 'late')")
    d.wait_caught_up()
    wait_for(lambda: dst.execute("SELECT count(*) FROM pgferry.resync WHERE done_at IS NOT NULL") == [(1,)]
             or not d.running(), 60, "the re-copy")
    d.wait_caught_up()
    assert_same_tables(src, dst, {"t": ["id", "v", "r"]})
    out = d.output()
    assert "now holds values the source computed" in out and "re-copied public.t: 201 rows" in out, out
    assert d.stop() == 0


def test_resync_command_under_load_ends_equal(pair, daemons):
    src, dst = pair
    wl.setup(src, dst)
    d = Daemon(src, dst)
    daemons.append(d)
    stop, errors = threading.Event(), []
    th = threading.Thread(target=_writer, args=(src, stop, errors), daemon=True)
    th.start()
    try:
        wait_for(lambda: dst.execute("SELECT count(*) FROM acct")[0][0] > 20 or not d.running(), 60, "rows")
        for _attempt in range(5):  # the target drifted: the re-copy repairs it
            try:
                dst.execute("UPDATE acct SET note = 'drift' WHERE id % 2 = 0")
                break
            except psycopg2.errors.DeadlockDetected:
                continue  # with pgferry's batch updating the same rows in another order: as an application would
        r = pgferry("resync", "acct", "--target", dst.dsn, "--timeout", "120")
        assert r.returncode == 0 and "re-copied public.acct:" in r.stdout, r.stdout + r.stderr + d.output()
    finally:
        stop.set()
        th.join(60)
    assert not errors, errors
    d.wait_caught_up()
    assert_same_tables(src, dst, wl.TABLES)
    r = pgferry("resync", "nosuch", "--target", dst.dsn)
    assert r.returncode == 2 and "no table nosuch on target" in r.stderr, r.stderr
    assert d.stop() == 0


@pytest.fixture
def uncaptured(owner_pair):
    """A source role that may replicate but not create an event trigger (no superuser)."""
    src, dst = owner_pair
    role = f"repl_{src.name}"
    src.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    src.execute(f"GRANT CREATE ON DATABASE {src.name} TO {role}")
    src.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {role}")
    yield src, dst, Db(src.server, src.name, user=role)
    src.execute(f"DROP OWNED BY {role}")
    Db(src.server, "postgres").execute(f"DROP ROLE {role}")


def test_without_capture_added_and_dropped_columns_and_new_tables_are_followed(uncaptured, daemons):
    src, dst, repl = uncaptured
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, a text NOT NULL)")
    r = pgferry("preflight", "--source", repl.dsn, "--target", dst.dsn)
    assert "schema changes on source" in r.stdout + r.stderr and "cannot be captured" in r.stdout + r.stderr, r
    d = Daemon(src, dst, source_dsn=repl.dsn)
    daemons.append(d)
    out = d.output()
    assert "are not captured: creating an event trigger takes a superuser" in out, out
    src.execute("INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 20) g")
    src.psql("BEGIN; ALTER TABLE t ADD COLUMN b numeric(10, 2); INSERT INTO t VALUES (21, 'x', 2.5); "
             "UPDATE t SET b = id WHERE id <= 5; COMMIT;")
    d.wait_caught_up()
    d.kill()  # what the source described last is kept in the state: the next change is still told apart
    src.execute("ALTER TABLE t DROP COLUMN a")
    src.execute("INSERT INTO t VALUES (22, 7)")
    src.execute("CREATE TABLE n (id int PRIMARY KEY, v text, at timestamptz)")
    src.execute("INSERT INTO n VALUES (1, 'new', '2026-12-02 10:00+00'), (2, NULL, NULL)")
    d.start()
    d.wait_caught_up()
    assert_same_tables(src, dst, {"t": ["id", "b"], "n": ["id", "v", "at"]})
    assert dst.execute("SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute WHERE "
                       "attrelid = 't'::regclass AND attname IN ('a', 'b') ORDER BY attname") == [
        ("text", False), ("numeric(10,2)", False)]  # a: kept, nullable
    assert dst.execute("SELECT count(*) FROM t WHERE id = 22 AND a IS NULL") == [(1,)]
    # a rename looks like a drop and an add: stopped, named, nothing applied from it
    src.execute("ALTER TABLE t RENAME COLUMN b TO amount")
    src.execute("INSERT INTO t VALUES (23, 1)")
    assert d.wait_exit() == 1, d.output()
    out = d.output()
    assert "column(s) b of public.t disappeared and amount appeared in the same change" in out, out
    assert "Traceback" not in out and dst.execute("SELECT count(*) FROM t WHERE id = 23") == [(0,)]


def test_with_some_tables_published_only_their_schema_changes_are_applied(pair, daemons):
    src, dst = pair
    both = "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)"
    src.execute(both + "; CREATE PUBLICATION pgferry FOR TABLE a")
    dst.execute(both)
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("ALTER TABLE a ADD COLUMN x int")
    src.execute("ALTER TABLE b ADD COLUMN y int")  # not migrated: the target's b is not pgferry's to change
    src.execute("CREATE INDEX b_id ON b (id)")
    src.execute("CREATE TYPE e AS ENUM ('p')")  # on no table: applied
    src.execute("INSERT INTO a VALUES (1, 2)")
    d.wait_caught_up()
    assert dst.execute("SELECT * FROM a") == [(1, 2)]
    assert dst.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'b'") == [(1,)]
    assert dst.execute("SELECT to_regclass('b_id') IS NULL, to_regtype('e') IS NOT NULL") == [(True, True)]
    assert dst.execute("SELECT tag, result FROM pgferry.ddl ORDER BY id") == [
        ("ALTER TABLE", "applied"), ("ALTER TABLE", "not migrated"), ("CREATE INDEX", "not migrated"),
        ("CREATE TYPE", "applied")]
    assert d.stop() == 0


def test_a_table_can_have_its_own_ddl_policy(pair, daemons, tmp_path):
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    conf = tmp_path / "pgferry.toml"
    conf.write_text('[ddl_tables]\n"public.b" = "skip"\n')
    d = Daemon(src, dst, "--config", str(conf))
    daemons.append(d)
    src.execute("ALTER TABLE b ADD COLUMN y int")  # b's own policy: not applied
    src.execute("ALTER TABLE a ADD COLUMN x int")
    src.execute("INSERT INTO a VALUES (1, 2)")
    d.wait_caught_up()
    assert dst.execute("SELECT * FROM a") == [(1, 2)]
    assert dst.execute("SELECT tag, result FROM pgferry.ddl ORDER BY id") == [
        ("ALTER TABLE", "skipped"), ("ALTER TABLE", "applied")]
    assert d.stop() == 0
