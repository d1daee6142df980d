"""A randomized source workload and the schema it runs on (shared by the stream tests).

The schema covers the row semantics pgferry must get right: primary key, `REPLICA IDENTITY USING
INDEX`, `REPLICA IDENTITY FULL` with duplicate rows, primary-key changes, TOASTed values that an
UPDATE leaves unchanged, a partitioned table, a generated column, a column dropped on the source
and a different column order on the target, and the types enum, domain, composite, range, arrays
with NULLs and quotes, NaN/Infinity and non-ASCII text.
"""

from __future__ import annotations

import random
import threading

import psycopg2

from tests.pgplugin import Db

TYPES = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (x integer, label text);
"""

# Source and target differ on purpose: `acct` has a dropped column on the source and another
# column order on the target; `gen`'s generated column exists on both.
SOURCE_SCHEMA = TYPES + """
CREATE TABLE acct (id integer PRIMARY KEY, dropme text, balance numeric, f8 double precision, note text,
                   big text, m mood, tags text[], p pair, r int4range, d posint);
ALTER TABLE acct DROP COLUMN dropme;
ALTER TABLE acct ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE ledger (id bigserial PRIMARY KEY, acct integer REFERENCES acct(id) ON DELETE CASCADE,
                     amount numeric, at timestamptz DEFAULT now());
CREATE TABLE nokey (a integer, b text, j json);
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE TABLE uidx (code text NOT NULL, v integer);
CREATE UNIQUE INDEX uidx_code ON uidx (code);
ALTER TABLE uidx REPLICA IDENTITY USING INDEX uidx_code;
CREATE TABLE meas (id integer, day date, v double precision, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE meas_a PARTITION OF meas FOR VALUES FROM ('2020-01-01') TO ('2025-01-01');
CREATE TABLE meas_b PARTITION OF meas FOR VALUES FROM ('2025-01-01') TO ('2030-01-01');
CREATE TABLE gen (id integer PRIMARY KEY, a integer, b integer GENERATED ALWAYS AS (a * 2) STORED);
"""

TARGET_SCHEMA = TYPES + """
CREATE TABLE acct (d posint, r int4range, p pair, tags text[], m mood, big text, note text, f8 double precision,
                   balance numeric, id integer PRIMARY KEY, extra text DEFAULT 'target-only');
CREATE TABLE ledger (id bigserial PRIMARY KEY, acct integer REFERENCES acct(id) ON DELETE CASCADE,
                     amount numeric, at timestamptz DEFAULT now());
CREATE TABLE nokey (a integer, b text, j json);
CREATE TABLE uidx (code text NOT NULL, v integer);
CREATE UNIQUE INDEX uidx_code ON uidx (code);
CREATE TABLE meas (id integer, day date, v double precision, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE meas_a PARTITION OF meas FOR VALUES FROM ('2020-01-01') TO ('2025-01-01');
CREATE TABLE meas_b PARTITION OF meas FOR VALUES FROM ('2025-01-01') TO ('2030-01-01');
CREATE TABLE gen (id integer PRIMARY KEY, a integer, b integer GENERATED ALWAYS AS (a * 2) STORED);
"""

TABLES: dict[str, list[str]] = {
    "acct": ["id", "balance", "f8", "note", "big", "m", "tags", "p", "r", "d"],
    "ledger": ["id", "acct", "amount", "at"],
    "nokey": ["a", "b", "j::text"],
    "uidx": ["code", "v"],
    "meas": ["id", "day", "v"],
    "gen": ["id", "a", "b"],
}

NOTES = ["plain", "żółw ☃ naïve", 'quote " and \' and \\ backslash', "", None, "NULL", "tab\there"]
FLOATS = ["NaN", "Infinity", "-Infinity", "0", "-0", "1.5e300", "3.141592653589793"]


def setup(src: Db, dst: Db, publication: str = "CREATE PUBLICATION pgferry FOR ALL TABLES") -> None:
    src.psql(SOURCE_SCHEMA + publication + ";")
    dst.psql(TARGET_SCHEMA)


class Workload:
    """Random transactions on the source; the generator is seeded, so a failure can be replayed."""

    def __init__(self, db: Db, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.conn = psycopg2.connect(db.dsn)
        self.next_id = 1
        self.ids: list[int] = []
        self.codes: list[str] = []

    def close(self) -> None:
        self.conn.close()

    def _acct_values(self) -> tuple:
        r = self.rnd
        big = (r.choice("abcdef") * r.randint(3000, 9000)) if r.random() < 0.3 else None
        tags = r.choice([None, [], ["a", None, 'q"uote', "NULL", "ü"], ["x", "y"]])
        mood = r.choice(["sad", "ok", "happy"])
        composite = f"({r.randint(-5, 5)},\"lbl {r.randint(0, 9)}\")"
        rng = f"[{r.randint(0, 5)},{r.randint(6, 9)})"
        return (round(r.uniform(-1e6, 1e6), 2), r.choice(FLOATS), r.choice(NOTES), big, mood, tags, composite, rng,
                r.randint(1, 1000))

    def one_change(self, cur: psycopg2.extensions.cursor) -> None:
        r = self.rnd
        op = r.random()
        if op < 0.30 or len(self.ids) < 5:
            i = self.next_id
            self.next_id += 1
            cur.execute("INSERT INTO acct (id, balance, f8, note, big, m, tags, p, r, d) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", (i, *self._acct_values()))
            self.ids.append(i)
        elif op < 0.45:
            # an update that leaves the TOASTed column alone (sent as unchanged-TOAST)
            cur.execute("UPDATE acct SET balance = balance + %s, note = %s WHERE id = %s",
                        (r.randint(1, 99), r.choice(NOTES), r.choice(self.ids)))
        elif op < 0.50:
            old = r.choice(self.ids)
            new = self.next_id
            self.next_id += 1
            cur.execute("UPDATE acct SET id = %s WHERE id = %s", (new, old))  # primary-key change
            if cur.rowcount:
                self.ids[self.ids.index(old)] = new
        elif op < 0.55:
            victim = r.choice(self.ids)
            cur.execute("DELETE FROM acct WHERE id = %s", (victim,))
            self.ids.remove(victim)
        elif op < 0.65:
            cur.execute("INSERT INTO ledger (acct, amount) VALUES (%s, %s)", (r.choice(self.ids), r.randint(-50, 50)))
        elif op < 0.75:
            # duplicates on purpose: the FULL-identity table must keep exactly as many as the source
            cur.execute("INSERT INTO nokey VALUES (%s, %s, %s)", (r.randint(0, 5), r.choice(["x", "y", None]),
                                                                  r.choice([None, '{"k": [1, 2]}'])))
        elif op < 0.80:
            cur.execute("UPDATE nokey SET b = %s WHERE ctid = (SELECT ctid FROM nokey WHERE a = %s LIMIT 1)",
                        (r.choice(["u", "v"]), r.randint(0, 5)))
        elif op < 0.83:
            cur.execute("DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey WHERE a = %s LIMIT 1)",
                        (r.randint(0, 5),))
        elif op < 0.88:
            code = f"c{r.randint(0, 60)}"
            cur.execute("INSERT INTO uidx VALUES (%s, %s) ON CONFLICT (code) DO UPDATE SET v = uidx.v + 1",
                        (code, r.randint(0, 9)))
            if r.random() < 0.2:
                cur.execute("UPDATE uidx SET code = code || 'x' WHERE code = %s", (code,))
        elif op < 0.95:
            day = f"20{r.randint(21, 28)}-0{r.randint(1, 9)}-1{r.randint(0, 9)}"
            cur.execute("INSERT INTO meas VALUES (%s, %s, %s) ON CONFLICT (id, day) DO UPDATE SET v = excluded.v",
                        (r.randint(0, 200), day, r.random()))
            if r.random() < 0.3:  # moves rows between partitions
                cur.execute("UPDATE meas SET day = day + 1200 WHERE id = %s AND day < '2024-01-01'",
                            (r.randint(0, 200),))
        else:
            cur.execute("INSERT INTO gen (id, a) VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET a = gen.a + 1",
                        (r.randint(0, 50), r.randint(0, 100)))

    def transaction(self) -> None:
        """One source transaction: usually committed, sometimes with a rolled-back savepoint,
        sometimes rolled back entirely, sometimes empty."""
        r = self.rnd
        ids_before = list(self.ids)
        next_before = self.next_id
        cur = self.conn.cursor()
        kind = r.random()
        try:
            if kind < 0.03:
                cur.execute("SELECT pg_logical_emit_message(true, 'pgferry-test', 'in a transaction')")
            for _ in range(r.randint(1, 6)):
                self.one_change(cur)
            if kind < 0.15:
                cur.execute("SAVEPOINT s")
                saved = (list(self.ids), self.next_id)
                for _ in range(r.randint(1, 4)):
                    self.one_change(cur)
                cur.execute("ROLLBACK TO SAVEPOINT s")
                self.ids, self.next_id = saved
                self.one_change(cur)
        except psycopg2.Error:
            self.conn.rollback()
            self.ids, self.next_id = ids_before, next_before
            return
        if 0.15 <= kind < 0.20:
            self.conn.rollback()
            self.ids, self.next_id = ids_before, next_before
        else:
            self.conn.commit()

    def big_transaction(self, rows: int = 3000) -> None:
        """Larger than logical_decoding_work_mem (64kB in the tests): streamed while in progress,
        with an aborted subtransaction inside."""
        cur = self.conn.cursor()
        base = self.next_id
        cur.execute("INSERT INTO acct (id, balance, note, d) SELECT g, g, repeat('x', 200), 1 "
                    "FROM generate_series(%s, %s) g", (base, base + rows - 1))
        cur.execute("SAVEPOINT big")
        cur.execute("INSERT INTO nokey SELECT g %% 7, 'aborted', NULL FROM generate_series(1, %s) g", (rows,))
        cur.execute("ROLLBACK TO SAVEPOINT big")
        cur.execute("UPDATE acct SET note = 'big-updated' WHERE id BETWEEN %s AND %s", (base, base + rows // 2))
        self.conn.commit()
        self.ids.extend(range(base, base + rows))
        self.next_id = base + rows

    def aborted_big_transaction(self, rows: int = 3000) -> None:
        cur = self.conn.cursor()
        cur.execute("INSERT INTO nokey SELECT g %% 7, 'never', NULL FROM generate_series(1, %s) g", (rows,))
        self.conn.rollback()

    def truncate(self) -> None:
        cur = self.conn.cursor()
        cur.execute("TRUNCATE nokey, gen RESTART IDENTITY")
        self.conn.commit()

    def run(self, transactions: int, big_every: int = 0, stop: threading.Event | None = None) -> None:
        """`transactions` transactions, or until `stop` is set when that comes first."""
        for n in range(1, transactions + 1):
            if stop is not None and stop.is_set():
                return
            self.transaction()
            if big_every and n % big_every == 0:
                self.big_transaction()
                self.aborted_big_transaction()
            if n % 97 == 0:
                self.truncate()


def current_ids(db: Db) -> tuple[list[int], int]:
    """The acct ids a new Workload on an existing database should know about."""
    ids = [r[0] for r in db.execute("SELECT id FROM acct ORDER BY id")]
    return ids, (max(ids) + 1 if ids else 1)


def write(db: Db, transactions: int, big_every: int = 0, seed: int = 0) -> None:
    """Run `transactions` workload transactions on `db` (see Workload.run) and close."""
    w = Workload(db, seed)
    try:
        w.run(transactions, big_every)
    finally:
        w.close()
