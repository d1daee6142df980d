"""The SQL behind the golden captures, shared by the capture script and the golden tests, so the
tests check decoded fields against the statements that produced them.

Each scenario: `setup` (schema; before the slot exists), `workload` (a list of SQL batches run
after the slot is created; each batch is one psql call), and the read option sets.
"""

from __future__ import annotations

SETUP_BASIC = r"""
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE types (
    id int PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric(20, 5), num_nan numeric,
    f4 real, f8 double precision,
    b boolean, t text, vc varchar(10), ch char(3), by bytea,
    d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, iv interval,
    u uuid, j json, jb jsonb,
    ai int[], at text[], a2 int[][],
    m mood
);
CREATE TABLE toasty (id int PRIMARY KEY, note text, big text);
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE fullrow (a int, b text);
ALTER TABLE fullrow REPLICA IDENTITY FULL;
CREATE TABLE byindex (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX byindex_ab ON byindex (a, b);
ALTER TABLE byindex REPLICA IDENTITY USING INDEX byindex_ab;
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent(id));
CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
CREATE PUBLICATION golden_pub FOR ALL TABLES;
"""

# Row 1 holds ordinary values, row 2 the edge cases, row 3 all NULL.
WORKLOAD_BASIC = [
    r"""
INSERT INTO types VALUES
 (1, 1, 2, 3, 12345.678, 1.5, 1.25, 2.5, true, 'hello', 'vc', 'abc', '\x0001ff',
  '2024-02-29', '13:14:15.123456', '13:14:15+02', '2024-02-29 13:14:15.5', '2024-02-29 13:14:15.5+00',
  '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2]}', '{"b": null}',
  '{1,NULL,3}', '{"x","a \"q\" b",NULL,"NULL","",","}', '{{1,2},{3,4}}', 'happy'),
 (2, -32768, -2147483648, -9223372036854775808, -99999.99999, 'NaN', 'NaN', '-Infinity', false,
  'żółw ☃ 𝄞', '', '   ', '\x', 'infinity', '00:00', '00:00+00', '-infinity', 'infinity',
  '-1 days -00:00:01', '00000000-0000-0000-0000-000000000000', '[]', '"s"',
  '{}', '{}', '{{NULL,2},{3,NULL}}', 'sad'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
""",
    "UPDATE types SET t = 'updated', f8 = 'Infinity' WHERE id = 1;",
    "UPDATE types SET id = 10 WHERE id = 3;",  # key change: 'K' old tuple
    "DELETE FROM types WHERE id = 2;",
    "INSERT INTO toasty VALUES (1, 'n1', repeat('x', 10000));",
    "UPDATE toasty SET note = 'n2' WHERE id = 1;",  # big is unchanged TOAST: 'u'
    "INSERT INTO fullrow VALUES (1, 'dup'), (1, 'dup'), (2, NULL);",
    "UPDATE fullrow SET b = 'one' WHERE ctid = (SELECT min(ctid) FROM fullrow WHERE a = 1);",
    "DELETE FROM fullrow WHERE a = 2;",
    "INSERT INTO byindex VALUES (1, 2, 'c');",
    "UPDATE byindex SET b = 3 WHERE a = 1;",
    "DELETE FROM byindex WHERE a = 1;",
    "INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1); INSERT INTO ident (v) VALUES ('i');",
    "TRUNCATE parent, child;",
    "TRUNCATE parent CASCADE;",
    "TRUNCATE ident RESTART IDENTITY;",
    "BEGIN; INSERT INTO parent VALUES (99); ROLLBACK;",
    "BEGIN; COMMIT;",
    "BEGIN; SELECT pg_logical_emit_message(true, 'golden', 'in txn'); INSERT INTO parent VALUES (5); COMMIT;",
    "SELECT pg_logical_emit_message(false, 'golden', '\\x00ff'::bytea);",
    # A transaction with a replication origin: pgoutput sends an Origin message.
    """
SELECT pg_replication_origin_create('golden_origin');
SELECT pg_replication_origin_session_setup('golden_origin');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/AB', now());
INSERT INTO parent VALUES (7);
COMMIT;
SELECT pg_replication_origin_session_reset();
""",
]

SETUP_STREAM = r"""
CREATE TABLE big (id int PRIMARY KEY, pad text);
CREATE PUBLICATION golden_pub FOR ALL TABLES;
"""

# logical_decoding_work_mem is 64kB on the capture servers: 2,000 rows spill, and with
# streaming on are sent while in progress.
WORKLOAD_STREAM = [
    "INSERT INTO big SELECT g, repeat('p', 50) FROM generate_series(1, 2000) g;",
    "BEGIN; INSERT INTO big SELECT g, 'aborted' FROM generate_series(10001, 12000) g; ROLLBACK;",
    """
BEGIN;
INSERT INTO big SELECT g, 'kept' FROM generate_series(20001, 21000) g;
SELECT pg_logical_emit_message(true, 'golden', 'streamed');
SAVEPOINT s1;
INSERT INTO big SELECT g, 'sub aborted' FROM generate_series(30001, 32000) g;
ROLLBACK TO s1;
UPDATE big SET pad = 'after' WHERE id BETWEEN 1 AND 1000;
DELETE FROM big WHERE id BETWEEN 1001 AND 1500;
COMMIT;
""",
]

SETUP_TWOPHASE = r"""
CREATE TABLE tp (id int PRIMARY KEY, v text);
CREATE PUBLICATION golden_pub FOR ALL TABLES;
"""

WORKLOAD_TWOPHASE = [
    "BEGIN; INSERT INTO tp VALUES (1, 'one'); PREPARE TRANSACTION 'gid-commit';",
    "COMMIT PREPARED 'gid-commit';",
    "BEGIN; INSERT INTO tp VALUES (2, 'two'); PREPARE TRANSACTION 'gid-rollback';",
    "ROLLBACK PREPARED 'gid-rollback';",
    # Large enough to be streamed, then prepared: Stream Prepare.
    "BEGIN; INSERT INTO tp SELECT g, repeat('v', 40) FROM generate_series(100, 2100) g; "
    "PREPARE TRANSACTION 'gid-stream';",
    "COMMIT PREPARED 'gid-stream';",
]


def read_options(version: int, scenario: str) -> list[tuple[str, dict[str, str]]]:
    """(name, pgoutput options) for each read of a scenario's slot on a server version."""
    max_proto = 4 if version >= 16 else (3 if version >= 15 else 2)
    out: list[tuple[str, dict[str, str]]] = []
    base = {"publication_names": "golden_pub", "messages": "true"}
    if scenario == "basic":
        for proto in range(1, max_proto + 1):
            for binary in (False, True):
                name = f"p{proto}-{'binary' if binary else 'text'}"
                out.append((name, {**base, "proto_version": str(proto), "binary": str(binary).lower()}))
    elif scenario == "stream":
        for proto in range(1, max_proto + 1):
            opts = {**base, "proto_version": str(proto)}
            if proto >= 2:
                opts["streaming"] = "on"
            out.append((f"p{proto}-text", opts))
        if max_proto >= 4:
            out.append(("p4-parallel", {**base, "proto_version": "4", "streaming": "parallel"}))
    elif scenario == "twophase":
        for proto in range(3, max_proto + 1):
            out.append((f"p{proto}-text", {**base, "proto_version": str(proto), "two_phase": "on",
                                           "streaming": "on"}))
    return out


SCENARIOS = {
    "basic": (SETUP_BASIC, WORKLOAD_BASIC),
    "stream": (SETUP_STREAM, WORKLOAD_STREAM),
    "twophase": (SETUP_TWOPHASE, WORKLOAD_TWOPHASE),
}
