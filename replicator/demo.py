"""`pgferry demo`: a whole migration between two embedded PostgreSQL 18 servers, no set-up.

1. start an embedded source and target (wal_level=logical, 127.0.0.1, temp dirs);
2. load sample data: related tables with identity columns and a sequence, a TOASTed column, a
   partitioned table;
3. keep an application-like write load running on the source;
4. run `pgferry start`: initial sync (schema, parallel copy, exact handoff) then streaming;
5. stop the writes, wait until the target has applied everything, compare every table on both
   sides (row counts and content hashes), print a summary, stop the servers.

Cutover (fencing the source, the handoff LSN, sequences, the receipt) arrives with the cutover
issue; until then the demo ends after the comparison.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psycopg2

from .errors import PgferryError
from .servers import LocalServer, ServerError

SAMPLE_SCHEMA = """
CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL,
                       balance numeric(12, 2) NOT NULL DEFAULT 0, tags text[], profile jsonb, opened date,
                       notes text);
ALTER TABLE accounts ALTER COLUMN notes SET STORAGE EXTERNAL;
CREATE TABLE transfers (id bigserial PRIMARY KEY, src bigint REFERENCES accounts, dst bigint REFERENCES accounts,
                        amount numeric(12, 2), at timestamptz NOT NULL DEFAULT now());
CREATE TABLE events (id bigint NOT NULL, day date NOT NULL, kind text, payload jsonb, PRIMARY KEY (id, day))
    PARTITION BY RANGE (day);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE SEQUENCE invoice_no START 1000;
INSERT INTO accounts (name, balance, tags, profile, opened, notes)
SELECT 'customer ' || g, g % 1000, ARRAY['t' || g % 7, NULL], jsonb_build_object('lang', 'pl', 'n', g),
       date '2020-01-01' + g % 2000, CASE WHEN g % 50 = 0 THEN repeat('long note ', 2000) END
FROM generate_series(1, 20000) g;
INSERT INTO transfers (src, dst, amount)
SELECT 1 + g % 20000, 1 + (g * 7) % 20000, g % 500 FROM generate_series(1, 100000) g;
INSERT INTO events SELECT g, date '2025-06-01' + g % 400, 'k' || g % 5, jsonb_build_object('g', g)
FROM generate_series(1, 50000) g;
"""

TABLES = ["accounts", "transfers", "events_2025", "events_2026"]  # events' rows live in its partitions


def _writer(dsn: str, stop: threading.Event, counter: list[int]) -> None:
    """An application: transfers between accounts, new accounts, event rows, invoice numbers."""
    rnd = random.Random(1)
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                a, b, amount = rnd.randint(1, 20000), rnd.randint(1, 20000), rnd.randint(1, 100)
                cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, a))
                cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, b))
                cur.execute("INSERT INTO transfers (src, dst, amount) VALUES (%s, %s, %s)", (a, b, amount))
                if rnd.random() < 0.1:
                    cur.execute("INSERT INTO accounts (name) VALUES ('new customer')")
                    cur.execute("SELECT nextval('invoice_no')")
                if rnd.random() < 0.2:
                    cur.execute("INSERT INTO events VALUES (%s, %s, 'live', '{}') ON CONFLICT DO NOTHING",
                                (100000 + counter[0], f"2026-0{rnd.randint(1, 9)}-1{rnd.randint(0, 9)}"))
                conn.commit()
                counter[0] += 1
                time.sleep(0.002)
    finally:
        conn.close()


def _digest(dsn: str, table: str) -> tuple[int, str]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM "
                        f"(SELECT md5(t::text) AS h FROM ONLY {table} t) s")
            n, h = cur.fetchone()
        return int(n), h
    finally:
        conn.close()


def _scalar(dsn: str, sql: str) -> object:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
        return row[0] if row else None
    except psycopg2.Error:
        return None
    finally:
        conn.close()


def _wait(cond: object, timeout: float, what: str, daemon: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if daemon.poll() is not None:
            raise PgferryError(f"demo: pgferry exited with {daemon.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise PgferryError(f"demo: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_demo(write_seconds: float = 10.0, out: IO[str] = sys.stdout) -> int:
    def say(text: str) -> None:
        print(f"pgferry demo: {text}", file=out, flush=True)

    say("starting two embedded PostgreSQL 18 servers (source and target)...")
    servers: list[LocalServer] = []
    try:
        try:
            servers.append(LocalServer(18, name="demo-src-").start())
            servers.append(LocalServer(18, name="demo-dst-").start())
        except ServerError as exc:
            raise PgferryError(f"could not start an embedded server: {exc}") from None
        src_server, dst_server = servers
        src_server.psql("CREATE DATABASE shop")
        dst_server.psql("CREATE DATABASE shop")
        src_server.psql(SAMPLE_SCHEMA, "shop")
        src, dst = src_server.dsn("shop"), dst_server.dsn("shop")
        say("source loaded: 20,000 accounts (some with TOASTed notes), 100,000 transfers, 50,000 events "
            "in a partitioned table, a sequence")

        stop, counter = threading.Event(), [0]
        writer = threading.Thread(target=_writer, args=(src, stop, counter), daemon=True)
        writer.start()
        say("application writes running on the source; starting `pgferry start` (copy, then stream)")
        started = time.monotonic()
        root = Path(__file__).resolve().parents[1]
        daemon = subprocess.Popen([sys.executable, "-m", "replicator.cli", "start", "--source", src, "--target", dst],
                                  cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stderr=subprocess.PIPE,
                                  text=True)
        log_lines: list[str] = []

        def relay() -> None:
            assert daemon.stderr is not None
            for line in daemon.stderr:
                log_lines.append(line)
                print("  | " + line.rstrip().split(": ", 1)[-1], file=out, flush=True)

        threading.Thread(target=relay, daemon=True).start()
        try:
            _wait(lambda: _scalar(dst, "SELECT phase FROM pgferry.sync") == "streaming", 300, "the copy", daemon)
            copied = time.monotonic() - started
            say(f"initial copy done in {copied:.1f} s; streaming. Writing for {write_seconds:.0f} s more...")
            time.sleep(write_seconds)
            stop.set()
            writer.join(timeout=30)
            end = str(_scalar(src, "SELECT pg_current_wal_lsn()"))
            say(f"writes stopped after {counter[0]} application transactions; source at {end}; waiting for "
                "the target to catch up...")
            t0 = time.monotonic()
            _wait(lambda: bool(_scalar(dst, f"SELECT applied_lsn >= '{end}' FROM pgferry.progress")), 120,
                  "the target to catch up", daemon)
            say(f"caught up {time.monotonic() - t0:.1f} s after the writes stopped")
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            rc = daemon.wait(timeout=60)
        if rc != 0:
            raise PgferryError(f"demo: pgferry exited with {rc}")
        say("comparing every table on both sides (row counts and content hashes):")
        ok = True
        for table in TABLES:
            a, b = _digest(src, table), _digest(dst, table)
            ok &= a == b
            print(f"  {table:<12} source {a[0]:>7} rows  target {b[0]:>7} rows  {'equal' if a == b else 'DIFFERENT'}",
                  file=out)
        say(f"{'all tables equal' if ok else 'DIFFERENCES FOUND'}; total {time.monotonic() - started:.1f} s. "
            "Cutover (fence, handoff LSN, sequences, receipt) comes with the next milestone.")
        return 0 if ok else 1
    finally:
        for s in servers:
            s.cleanup()
