"""`pgferry demo`: what pgferry can do so far, on an embedded server, with no set-up.

Today (foundation issue) that is the decoder end to end: start an embedded PostgreSQL 18 source
with wal_level=logical, create sample tables and the publication, write changes of every kind
(all common types, NULLs, unchanged TOAST, updates of the key, deletes, truncate) and print them
as `pgferry tail` does. The full migration demo (copy, stream, cutover, receipt) replaces this
once the stream/apply and cutover issues land.
"""

from __future__ import annotations

import sys
import threading
from typing import IO

import psycopg2

from .errors import PgferryError
from .servers import LocalServer, ServerError
from .tail import run_tail

SAMPLE_SCHEMA = """
CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL,
                       balance numeric(12, 2), tags text[], profile jsonb, opened date,
                       last_seen timestamptz, photo bytea, notes text);
ALTER TABLE accounts ALTER COLUMN notes SET STORAGE EXTERNAL;
CREATE TABLE transfers (id uuid PRIMARY KEY, src bigint REFERENCES accounts, dst bigint REFERENCES accounts,
                        amount numeric(12, 2), took interval, rate double precision);
CREATE PUBLICATION pgferry FOR ALL TABLES;
"""


def _workload(dsn: str, changes: int) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO accounts (name, balance, tags, profile, opened, last_seen, photo, notes) VALUES "
                    "('Zoë', 100.50, '{vip,\"quoted \\\"tag\\\"\",NULL}', '{\"lang\": \"pl\"}', '2024-02-29', "
                    "now(), '\\x89504e47', repeat('long note ', 500)), "
                    "('Bob', 'NaN', '{}', NULL, 'infinity', NULL, NULL, NULL)")
        for i in range(changes):
            cur.execute("INSERT INTO transfers VALUES (gen_random_uuid(), 1, 2, %s, %s, %s)",
                        (i + 0.25, f"{i} minutes", float("inf") if i == 1 else i / 3))
        cur.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")  # notes: unchanged TOAST
        cur.execute("DELETE FROM transfers WHERE amount > 2")
        cur.execute("TRUNCATE transfers")
    conn.close()


class _Enough(Exception):
    pass


class _CountingOut:
    def __init__(self, out: IO[str], limit: int) -> None:
        self.out, self.limit, self.lines = out, limit, 0

    def write(self, text: str) -> int:
        # For people reading the demo: elide the middle of very long lines (the TOASTed note).
        self.out.write(text if len(text) < 400 else f"{text[:200]} …({len(text) - 300} chars)… {text[-100:]}")
        self.lines += text.count("\n")
        if self.lines >= self.limit:
            self.out.flush()
            raise _Enough()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def run_demo(changes: int = 20, out: IO[str] = sys.stdout) -> int:
    print("pgferry demo: starting an embedded PostgreSQL 18 source (wal_level=logical)...", file=sys.stderr)
    try:
        server = LocalServer(18, name="demo-").start()
    except ServerError as exc:
        raise PgferryError(f"could not start the embedded server: {exc}") from None
    try:
        server.psql("CREATE DATABASE shop")
        server.psql(SAMPLE_SCHEMA, "shop")
        dsn = server.dsn("shop")
        expected = 2 + changes + 1 + max(changes - 2, 0) + 1  # inserts, update, deletes, truncate
        writer = threading.Thread(target=_workload, args=(dsn, changes), daemon=True)

        def ready(slot: str) -> None:
            print(f"pgferry demo: streaming from slot {slot}; writing sample changes...", file=sys.stderr)
            writer.start()

        try:
            run_tail(dsn, "pgferry", None, out=_CountingOut(out, expected), on_ready=ready)  # type: ignore[arg-type]
        except _Enough:
            pass
        writer.join(timeout=30)
        print(f"pgferry demo: decoded {expected} changes. The full migration demo (copy, stream, cutover) "
              "arrives with the next issues.", file=sys.stderr)
        return 0
    finally:
        server.cleanup()
