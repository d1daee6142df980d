"""`pgferry demo`: a whole migration between two embedded PostgreSQL 18 servers, no set-up.

1. start an embedded source and target (wal_level=logical, 127.0.0.1, temp dirs);
2. load sample data: related tables with identity columns and a sequence, a TOASTed column, a
   partitioned table;
3. keep an application-like write load running on the source;
4. run `pgferry preflight`, then `pgferry start`: initial sync (schema, parallel copy, exact handoff)
   then streaming;
5. `pgferry cutover` while the application still writes: the application writes through a
   PgBouncer the demo starts (when pgbouncer is installed), which the cutover pauses; the source is
   fenced, the daemon applies up to the handoff LSN and stops, sequences are copied, every table is
   verified, PgBouncer is repointed to the target and resumed, so the application writes on there
   without an error; print the receipt and a summary (rows, the clients' pause, failed
   transactions: 0), stop the servers. Without PgBouncer the application writes on the source
   directly and is refused at the fence.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import psycopg2
import psycopg2.errors

from ..errors import PgferryError, first_line
from .pgbouncer import LocalPgBouncer, find_pgbouncer
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



def _writer(dsn: str, stop: threading.Event, counter: list[int], refused: list[str], failed: list[str],
            through_bouncer: bool) -> None:
    """An application: transfers between accounts, new accounts, event rows, invoice numbers. Like a
    real one it reconnects when its session is ended. Straight on the source it stops at the first
    write the source refuses (the cutover's fence) and records why; through PgBouncer it writes on
    to the end (after the cutover on the target) and records any transaction that failed."""
    rnd = random.Random(1)
    conn = None
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg2.connect(dsn)
            _one_transaction(conn, conn.cursor(), rnd, counter)
        except psycopg2.errors.ReadOnlySqlTransaction as exc:
            refused.append(first_line(exc))
            if not through_bouncer:
                break
            failed.append(first_line(exc))
            if conn is not None and not conn.closed:
                conn.rollback()
        except psycopg2.Error as exc:
            failed.append(first_line(exc))
            if conn is not None and not conn.closed:
                conn.close()
            conn = None  # session ended: reconnect
            time.sleep(0.05)
            continue
        time.sleep(0.002)
    if conn is not None:
        conn.close()


def _one_transaction(conn: psycopg2.extensions.connection, cur: psycopg2.extensions.cursor, rnd: random.Random,
                     counter: list[int]) -> None:
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


def _wait(cond: object, timeout: float, what: str, daemon: subprocess.Popen, running: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if running and daemon.poll() is not None:
            raise PgferryError(f"demo: pgferry exited with {daemon.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise PgferryError(f"demo: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_demo(write_seconds: float = 10.0, out: IO[str] = sys.stdout, use_pgbouncer: bool = True) -> int:
    def say(text: str) -> None:
        print(f"pgferry demo: {text}", file=out, flush=True)

    say("starting two embedded PostgreSQL 18 servers (source and target)...")
    servers: list[LocalServer] = []
    bouncer: LocalPgBouncer | None = None
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

        bouncer = _start_pgbouncer(src_server, say) if use_pgbouncer else None
        if not use_pgbouncer:
            say("--no-pgbouncer: the application writes on the source directly, and the cutover leaves moving it "
                "to you")
        app = bouncer.dsn("shop") if bouncer is not None else src
        stop, counter, refused, failed = threading.Event(), [0], list[str](), list[str]()
        writer = threading.Thread(target=_writer, args=(app, stop, counter, refused, failed, bouncer is not None),
                                  daemon=True)
        writer.start()
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root)}
        say("application writes running on the source; `pgferry preflight`:")
        pre = subprocess.run([sys.executable, "-m", "replicator.cli", "preflight", "--source", src, "--target", dst],
                             cwd=root, env=env, capture_output=True, text=True)
        for line in pre.stdout.splitlines():
            print("  | " + line, file=out, flush=True)
        if pre.returncode != 0:
            raise PgferryError(f"preflight found problems: {pre.stdout.strip().splitlines()[-1:]} {pre.stderr}")
        say("starting `pgferry start` (copy, then stream)")
        started = time.monotonic()
        daemon = subprocess.Popen([sys.executable, "-m", "replicator.cli", "start", "--source", src, "--target", dst,
                                   "--log-format", "text"], cwd=root, env=env, stderr=subprocess.PIPE, text=True)

        def relay() -> None:
            assert daemon.stderr is not None
            for line in daemon.stderr:
                print("  | " + line.rstrip().split(": ", 1)[-1], file=out, flush=True)

        threading.Thread(target=relay, daemon=True).start()
        try:
            _wait(lambda: _scalar(dst, "SELECT phase FROM pgferry.sync") == "streaming", 300, "the copy", daemon)
            say(f"initial copy done in {time.monotonic() - started:.1f} s; streaming while the application "
                f"writes. Cutover in {write_seconds:.0f} s...")
            time.sleep(write_seconds)
            say(f"`pgferry cutover` now, with the application still writing ({counter[0]} transactions so far)")
            moving = ["--pgbouncer", bouncer.admin_dsn] if bouncer is not None else []
            cut = subprocess.run([sys.executable, "-m", "replicator.cli", "cutover", "--source", src, "--target", dst,
                                  "--timeout", "120", *moving], cwd=root, env=env, capture_output=True, text=True,
                                 check=False)
            for line in cut.stderr.splitlines():
                print("  | " + line.rstrip().split(": ", 1)[-1], file=out, flush=True)
            if cut.returncode != 0:
                raise PgferryError(f"demo: cutover failed (exit {cut.returncode})")
            rc = daemon.wait(timeout=60)
            if bouncer is not None and cut.returncode == 0:
                before = counter[0]
                _wait(lambda: counter[0] >= before + 200, 60, "the application's writes on the target", daemon,
                      running=False)
        finally:
            stop.set()
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=60)
        writer.join(timeout=30)
        if rc != 0:
            raise PgferryError(f"demo: pgferry exited with {rc}")
        receipt = json.loads(cut.stdout)
        print("receipt:", file=out)
        print(cut.stdout.rstrip(), file=out)
        rows = sum(t["target_rows"] for t in receipt["tables"])
        if bouncer is None:
            say("the application's writes after the fence were refused: "
                f"{refused[0] if refused else '(none tried)'}")
            say(f"summary: {len(receipt['tables'])} tables, {rows:,} rows on the target, all equal: {receipt['ok']}; "
                f"handoff at {receipt['handoff_lsn']}; write downtime (fence to receipt) "
                f"{receipt['write_downtime_s']} s; total {time.monotonic() - started:.1f} s")
            return 0 if receipt["ok"] else 1
        # every transfer the application committed is one row: the initial 100,000 and its own
        on_target = _scalar(dst, "SELECT count(*) FROM transfers")
        say(f"the application went on through PgBouncer, on the target since the cutover: {counter[0]} "
            f"transactions committed, {len(failed)} failed{' (' + failed[0] + ')' if failed else ''}; the target "
            f"has {on_target:,} transfers (100,000 + {counter[0]})")
        say(f"summary: {len(receipt['tables'])} tables, {rows:,} rows at the handoff, all equal: {receipt['ok']}; "
            f"handoff at {receipt['handoff_lsn']}; the clients paused {receipt['client_pause_s']} s "
            f"({receipt['clients_waiting']} waiting, the longest {receipt['longest_client_wait_s']} s); "
            f"total {time.monotonic() - started:.1f} s")
        return 0 if receipt["ok"] and not failed and on_target == 100000 + counter[0] else 1
    finally:
        if bouncer is not None:
            bouncer.cleanup()
        for s in servers:
            s.cleanup()


def _start_pgbouncer(server: LocalServer, say: Callable[[str], None]) -> LocalPgBouncer | None:
    """The demo's application writes through a PgBouncer, which the cutover moves to the target;
    without pgbouncer installed it writes on the source straight (and is refused at the fence)."""
    if find_pgbouncer() is None:
        say("PgBouncer is not installed (apt-get install pgbouncer): the application writes on the source "
            "directly, and the cutover leaves moving it to you")
        return None
    try:
        bouncer = LocalPgBouncer({"shop": f"host={server.host} port={server.port} dbname=shop user={server.user}"})
        bouncer.start()
    except ServerError as exc:
        say(f"PgBouncer did not start ({exc}): the application writes on the source directly")
        return None
    say(f"the application connects through PgBouncer (127.0.0.1:{bouncer.port}, transaction pooling): the cutover "
        "pauses it, repoints it to the target and resumes it")
    return bouncer
