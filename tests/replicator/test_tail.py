"""`pgferry tail` against real servers: values, NULL vs unchanged TOAST, Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.pgplugin import Db, wait_for

pytestmark = pytest.mark.pg

TYPES_TABLE = r"""
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE t (
    id int PRIMARY KEY, i8 bigint, num numeric, f8 double precision, b boolean, tx text, by bytea,
    d date, ts timestamp, tstz timestamptz, iv interval, u uuid, j json, jb jsonb,
    ai int[], at text[], a2 int[][], m mood, big text);
ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE PUBLICATION pgferry FOR ALL TABLES;
"""


class Tail:
    """`pgferry tail` as a subprocess, its stdout read line by line on a thread."""

    def __init__(self, dsn: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicator.cli", "tail", "--source", dsn, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def wait_lines(self, n: int, timeout: float = 30) -> list[dict]:
        wait_for(lambda: len(self.lines) >= n or self.proc.poll() is not None, timeout, f"{n} tail lines")
        assert len(self.lines) >= n, self.proc.stderr.read() if self.proc.stderr else ""
        return self.lines

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=20)
        self._reader.join(timeout=5)
        return rc, self.proc.stderr.read() if self.proc.stderr else ""


def _slot_count(db: Db) -> int:
    return db.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()")[0][0]


def test_tail_prints_typed_values_and_cleans_up_its_temporary_slot(source: Db):
    source.psql(TYPES_TABLE)
    tail = Tail(source.dsn)
    wait_for(lambda: _slot_count(source) == 1, 30, "the temporary slot")
    source.psql(r"""
INSERT INTO t VALUES (1, 9223372036854775807, 'NaN', '-Infinity', true, 'żółw "q" ☃', '\x00ff',
  '-infinity', '2024-02-29 13:14:15.5', '2024-02-29 13:14:15.5+02', '1 year 2 mons 3 days 04:05:06.7',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.5]}', '{"b": null}',
  '{1,NULL,3}', '{"x","a \"q\" b",NULL,"NULL"}', '{{1,2},{3,4}}', 'happy', repeat('B', 5000));
INSERT INTO t (id) VALUES (2);
UPDATE t SET tx = 'changed' WHERE id = 1;
UPDATE t SET id = 3 WHERE id = 2;
DELETE FROM t WHERE id = 3;
SELECT pg_logical_emit_message(false, 'app', 'hello');
TRUNCATE t;
""")
    lines = tail.wait_lines(7)
    ins1, ins2, upd, key_upd, dele, msg, trunc = lines[:7]
    new = ins1["new"]
    assert ins1["op"] == "insert" and ins1["schema"] == "public" and ins1["table"] == "t"
    assert ins1["key"] == {"id": 1} and ins1["old"] is None
    assert new["i8"] == 9223372036854775807 and new["num"] == "NaN" and new["f8"] == "-Infinity"
    assert new["b"] is True and new["tx"] == 'żółw "q" ☃' and new["by"] == "\\x00ff"
    assert new["d"] == "-infinity" and new["ts"] == "2024-02-29T13:14:15.500000"
    assert new["tstz"] == "2024-02-29T11:14:15.500000+00:00"
    assert new["iv"] == "1 year 2 mons 3 days 04:05:06.7"
    assert new["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert new["j"] == {"a": [1, 2.5]} and new["jb"] == {"b": None}
    assert new["ai"] == [1, None, 3] and new["at"] == ["x", 'a "q" b', None, "NULL"]
    assert new["a2"] == [[1, 2], [3, 4]] and new["m"] == "happy" and new["big"] == "B" * 5000
    # NULL and unchanged TOAST are told apart: NULL is null, unchanged is absent and listed.
    assert ins2["new"]["tx"] is None and "unchanged_toast" not in ins2
    assert upd["new"]["tx"] == "changed" and "big" not in upd["new"] and upd["unchanged_toast"] == ["big"]
    assert key_upd["old"] == {"id": 2} and key_upd["new"]["id"] == 3 and key_upd["key"] == {"id": 2}
    assert dele["op"] == "delete" and dele["old"] == {"id": 3} and dele["new"] is None
    assert msg["op"] == "message" and msg["content"] == "hello" and msg["transactional"] is False
    assert trunc["op"] == "truncate" and trunc["tables"] == ["public.t"]
    # Transaction identity: each line carries its transaction's commit LSN, xid and time; LSNs grow.
    assert ins1["commit_lsn"] == ins2["commit_lsn"] == lines[0]["commit_lsn"] or ins1["xid"] != ins2["xid"]
    assert all(line["xid"] for line in (ins1, upd, dele, trunc)) and ins1["commit_time"].startswith("20")
    from decoder import Lsn
    lsns = [Lsn.parse(line["lsn"]) for line in lines[:7]]
    assert lsns == sorted(lsns)
    current = Lsn.parse(source.execute("SELECT pg_current_wal_lsn()::text")[0][0])
    assert Lsn.parse(trunc["commit_lsn"]) <= current

    rc, err = tail.stop(signal.SIGINT)
    assert rc == 0 and "Traceback" not in err
    wait_for(lambda: _slot_count(source) == 0, 10, "the temporary slot to be dropped")


def test_tail_named_slot_resumes_after_what_it_printed(source: Db):
    source.psql("CREATE TABLE k (id int PRIMARY KEY); CREATE PUBLICATION pgferry FOR ALL TABLES;")
    tail = Tail(source.dsn, "--slot", "tail_named")
    wait_for(lambda: _slot_count(source) == 1, 30, "the named slot")
    source.execute("INSERT INTO k VALUES (1)")
    assert tail.wait_lines(1)[0]["new"] == {"id": 1}
    # The flush position is sent on the walsender's next status update; wait until the slot has it.
    wait_for(lambda: source.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                                    "WHERE slot_name = 'tail_named'", (tail.lines[0]["commit_lsn"],))[0][0],
             30, "feedback to reach the slot")
    rc, err = tail.stop(signal.SIGTERM)
    assert rc == 0, err
    source.execute("INSERT INTO k VALUES (2)")
    tail2 = Tail(source.dsn, "--slot", "tail_named")
    lines = tail2.wait_lines(1)
    assert lines[0]["new"] == {"id": 2}
    tail2.stop()
    assert _slot_count(source) == 1  # a named slot stays


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replicator.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[2])


def _one_clear_line(res: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgferry: error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_tail_bad_input_gives_one_clear_line(source: Db):
    srv = source.server
    _one_clear_line(_run("tail", "--source", "host=127.0.0.1 port=notaport"), 2, "source")
    _one_clear_line(_run("tail", "--source", "nonsense"), 2, "invalid source DSN")
    _one_clear_line(_run("tail"), 2, "PGFERRY_SOURCE")
    _one_clear_line(_run("tail", "--source", f"host=127.0.0.1 port={srv.port} dbname=nosuchdb user=postgres"),
                    1, "nosuchdb", "does not exist")
    _one_clear_line(_run("tail", "--source", "host=127.0.0.1 port=1 dbname=x"), 1, "cannot connect")
    # Missing publication.
    _one_clear_line(_run("tail", "--source", source.dsn, "--publication", "nopub"), 1, "nopub",
                    "CREATE PUBLICATION")
    # No REPLICATION privilege; DSN from the environment.
    source.execute("DROP ROLE IF EXISTS plain_user")
    source.execute("CREATE ROLE plain_user LOGIN")
    source.execute("CREATE PUBLICATION pgferry FOR ALL TABLES")
    res = _run("tail", env={"PGFERRY_SOURCE": source.server.dsn(source.name, user="plain_user")})
    _one_clear_line(res, 1, "REPLICATION", "ALTER ROLE plain_user")
    source.execute("DROP ROLE plain_user")


def test_tail_refuses_wal_level_replica():
    from replicator.local.servers import LocalServer
    with LocalServer(18, settings={"wal_level": "replica"}, name="replica-") as srv:
        res = _run("tail", "--source", srv.dsn())
    _one_clear_line(res, 1, "wal_level = replica", "wal_level = logical")
