"""`pgferry cutover`: fence the source, hand off at one LSN, copy sequences, verify, receipt.

0. ANALYZE the published tables (and the partitioned tables above them, the partitions below)
   never analyzed on the target (planner statistics for the application's first queries; before
   the fence: no downtime).
1. Register the cutover on the target (`control`: state 'requested', a fresh id).
2. Fence (`--fence read-only`, default): `ALTER DATABASE ... SET default_transaction_read_only =
   on` makes every new session of every role read-only, and the sessions still open are ended
   (pgferry's own walsender is not a client backend and keeps running). `--fence none` leaves
   that to the operator.
3. Write the handoff marker through the source's WAL: a transactional logical message carrying
   the cutover id, from a session that overrides the read-only default. Everything committed
   before the fence is before the marker in commit order.
4. The daemon applies every transaction up to and including the marker's, claims the cutover in
   that same target transaction (state 'done', handoff LSN = the marker's commit end LSN, which is
   also the stored progress) and stops. So the handoff LSN equals the applied LSN by construction.
5. Copy sequence values (the source is fenced: they are final), verify every table (`--verify`:
   checksum, or count for a shorter write downtime).
6. Create what was held back (replicator/sync/holdback.py): triggers, rules and foreign keys NOT VALID,
   in one transaction, before the application moves. Then validate the foreign keys (the
   application's writes go on) and write the receipt: a key the data breaks is named with its
   rows, and the exit code is 1, but the handoff stands.

On a timeout the cutover first cancels its request (an UPDATE that races the daemon's claim
through the same row: exactly one wins), then lifts the fence and exits 1: the daemon keeps
streaming and will ignore the marker. If verification fails after the handoff, the fence is
lifted too (the target is not ready) and the exit code is 1; run `pgferry start` to stream again.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import IO, Any

import msgspec
import psycopg2

from sink.state import HANDOFF_PREFIX, ensure_schema, pgferry_session, quote_ident

from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn, published_tables
from ..sync import holdback
from ..sync.sequences import copy_sequences
from .verify import verify

log = logging.getLogger("pgferry.cutover")


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Fence:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.on = False

    def raise_(self) -> None:
        conn = connect(self.dsn, "source")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT current_database()")
                (db,) = cur.fetchone()
                try:
                    cur.execute(f"ALTER DATABASE {quote_ident(db)} SET default_transaction_read_only = on")
                except psycopg2.Error as exc:
                    raise PgferryError(f"cannot fence source {describe_dsn(self.dsn)}: "
                                       f"{first_line(exc)} (ALTER DATABASE needs the database "
                                       "owner or a superuser; or use --fence none and stop the writers yourself)"
                                       ) from None
                self.on = True
                cur.execute("""SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                      AND backend_type = 'client backend'""")
                (ended,) = cur.fetchone()
            log.info("source fenced: read-only for new sessions, %d open session(s) ended", ended)
        finally:
            conn.close()

    def lift(self) -> None:
        if not self.on:
            return
        db = "<database>"
        try:
            conn = connect(self.dsn, "source")
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute("SET default_transaction_read_only = off")  # new sessions are fenced too
                    cur.execute("SELECT current_database()")
                    (db,) = cur.fetchone()
                    cur.execute(f"ALTER DATABASE {quote_ident(db)} RESET default_transaction_read_only")
            finally:
                conn.close()
        except (psycopg2.Error, PgferryError) as exc:
            raise PgferryError(f"could not lift the fence on source {describe_dsn(self.dsn)} ({exc}): the source "
                               f"still refuses writes. Lift it by hand: ALTER DATABASE {db} RESET "
                               "default_transaction_read_only") from None
        self.on = False
        log.info("fence lifted: the source takes writes again")


def _control(target: str, schema: str, slot: str) -> dict[str, Any] | None:
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT c.cutover_id, c.state, c.handoff_lsn::text, p.applied_lsn::text "
                        f"FROM {quote_ident(schema)}.control c JOIN {quote_ident(schema)}.progress p USING (slot_name) "
                        "WHERE c.slot_name = %s", (slot,))
            row = cur.fetchone()
        if row is None:
            return None
        return {"id": row[0], "state": row[1], "handoff_lsn": row[2], "applied_lsn": row[3]}
    finally:
        conn.close()


def run_cutover(source: str, target: str, publication: str, slot: str, schema: str, fence_mode: str,
                timeout: float, receipt_path: str | None, out: IO[str] = sys.stdout,
                verify_mode: str = "checksum") -> int:
    cutover_id = uuid.uuid4().hex
    analyzed = analyze_tables_without_statistics(source, target, publication)
    dst = connect(target, "target")
    try:
        cur = dst.cursor()
        ensure_schema(cur, schema)
        cur.execute(f"SELECT 1 FROM {quote_ident(schema)}.progress WHERE slot_name = %s", (slot,))
        if cur.fetchone() is None:
            raise PgferryError(f"target {describe_dsn(target)} has no pgferry progress for slot {slot!r}: "
                               "run `pgferry start` first")
        cur.execute(f"INSERT INTO {quote_ident(schema)}.control (slot_name, cutover_id, state, requested_at) "
                    "VALUES (%s, %s, 'requested', now()) ON CONFLICT (slot_name) DO UPDATE SET "
                    "cutover_id = excluded.cutover_id, state = 'requested', requested_at = now(), "
                    "handoff_lsn = NULL, done_at = NULL", (slot, cutover_id))
        dst.commit()
    finally:
        dst.close()

    fence = Fence(source)
    receipt: dict[str, Any] = {"cutover_id": cutover_id, "fence": fence_mode, "fenced_at": None,
                               "analyzed": analyzed}
    try:
        if fence_mode == "read-only":
            fence.raise_()
        receipt["fenced_at"] = _now()
        fenced = time.monotonic()
        src = connect(source, "source")
        try:
            with src.cursor() as c:
                c.execute("SET default_transaction_read_only = off")
                c.execute("SELECT pg_logical_emit_message(true, %s, %s)::text", (HANDOFF_PREFIX, cutover_id))
                (marker,) = c.fetchone()
            src.commit()
        finally:
            src.close()
        log.info("handoff marker written at %s; waiting for the daemon (timeout %.0f s)", marker, timeout)
        deadline = time.monotonic() + timeout
        while True:
            ctl = _control(target, schema, slot)
            if ctl is not None and ctl["id"] == cutover_id and ctl["state"] == "done":
                break
            if time.monotonic() > deadline:
                if _cancel(target, schema, slot, cutover_id):
                    raise PgferryError(f"cutover timed out after {timeout:.0f} s: the daemon did not apply up to the "
                                       f"handoff marker at {marker} (is `pgferry start` running and caught up?). "
                                       "The fence is lifted; nothing was handed off")
                continue  # the daemon claimed it just now
            time.sleep(0.1)
        receipt["handoff_lsn"] = ctl["handoff_lsn"]
        receipt["applied_lsn"] = ctl["applied_lsn"]
        receipt["handed_off_after_s"] = round(time.monotonic() - fenced, 3)
        receipt["sequences"] = [{"name": n, "value": v} for n, v in copy_sequences(source, target)]
        receipt["verify"] = verify_mode
        results = verify(source, target, publication, None, verify_mode)
        receipt["tables"] = [{"name": r.name, "source_rows": r.source_rows, "target_rows": r.target_rows,
                              "match": r.match, "differences": r.differences} for r in results]
        receipt["ok"] = all(r.match for r in results) and ctl["handoff_lsn"] == ctl["applied_lsn"]
        if receipt["ok"]:  # the foreign keys, triggers and rules held back: before the application moves
            receipt["held_back_created_s"] = round(holdback.create(target, schema, slot), 3)
        receipt["finished_at"] = _now()
        receipt["write_downtime_s"] = round(time.monotonic() - fenced, 3)
    except BaseException:
        fence.lift()
        raise
    if not receipt["ok"]:
        _write_receipt(receipt, out, receipt_path)
        fence.lift()
        bad = [t["name"] for t in receipt["tables"] if not t["match"]]
        raise PgferryError(f"cutover verification failed ({', '.join(bad) or 'handoff LSN mismatch'}): the fence is "
                           "lifted and the source takes writes again; investigate, then `pgferry start` to resume")
    log.info("cutover done at %s: point the application at the target", receipt["handoff_lsn"])
    # Foreign keys came back NOT VALID; validating them scans, but lets the application write.
    receipt["constraints_validated_s"] = round(holdback.validate(target, schema, slot), 3)
    conn = connect(target, "target")
    try:
        held = holdback.listing(conn.cursor(), schema, slot)
    finally:
        conn.close()
    receipt["held_back"] = [msgspec.to_builtins(h) for h in held]
    invalid = [h for h in held if h.state == "invalid"]
    receipt["constraints_ok"] = not invalid
    _write_receipt(receipt, out, receipt_path)
    if invalid:
        raise PgferryError("cutover done (the handoff stands), but " + "; ".join(
            f"foreign key {h.name} on {h.table} is NOT VALID: {h.detail}" for h in invalid)
            + ". Fix those rows on the target, then ALTER TABLE ... VALIDATE CONSTRAINT ...")
    return 0


def _write_receipt(receipt: dict[str, Any], out: IO[str], path: str | None) -> None:
    text = json.dumps(receipt, indent=2)
    out.write(text + "\n")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def analyze_tables_without_statistics(source: str, target: str, publication: str) -> list[str]:
    """ANALYZE the published tables, and the partitioned tables above them or partitions below, that
    have never been analyzed on the target, before the fence (so it costs no downtime): a copied
    table has no planner statistics until autovacuum gets to it, and autovacuum never analyzes a
    partitioned table itself; the application's first queries on the new server would be planned
    blind. Returns the names of those analyzed; those this role may not analyze are named in a
    warning."""
    src = connect(source, "source")
    try:
        published = [f"{quote_ident(n)}.{quote_ident(t)}" for n, t in published_tables(src, publication)]
    finally:
        src.close()
    conn = connect(target, "target")
    conn.autocommit = True
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            pgferry_session(cur)  # no statement_timeout for a big table's ANALYZE
            cur.execute("""SELECT DISTINCT c.oid, format('%%I.%%I', n.nspname, c.relname), n.nspname || '.' || c.relname
                FROM unnest(%s::text[]) t, LATERAL (SELECT to_regclass(t) AS relid
                                                    UNION SELECT relid FROM pg_partition_ancestors(to_regclass(t))
                                                    UNION SELECT relid FROM pg_partition_tree(to_regclass(t))) a
                JOIN pg_stat_user_tables s ON s.relid = a.relid JOIN pg_class c ON c.oid = a.relid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE s.last_analyze IS NULL AND s.last_autoanalyze IS NULL ORDER BY 3""", (published,))
            todo = cur.fetchall()
            for _, quoted, _ in todo:
                cur.execute(f"ANALYZE {quoted}")  # a table this role may not analyze: a warning, not an error
            cur.execute("SELECT relid FROM pg_stat_user_tables WHERE relid = ANY(%s::oid[]) AND last_analyze IS NULL",
                        ([oid for oid, _, _ in todo],))
            skipped = {r[0] for r in cur.fetchall()}
    finally:
        conn.close()
    done = [name for oid, _, name in todo if oid not in skipped]
    if done:
        log.info("analyzed %d target table(s) that had no planner statistics in %.1f s", len(done),
                 time.monotonic() - started)
    if skipped:
        log.warning("%d target table(s) have no planner statistics and this role may not analyze them: %s; run "
                    "ANALYZE on them as their owner before the application uses the target", len(skipped),
                    ", ".join(name for oid, _, name in todo if oid in skipped))
    return done


def _cancel(target: str, schema: str, slot: str, cutover_id: str) -> bool:
    """Withdraw the request unless the daemon claimed it first. True: withdrawn."""
    conn = connect(target, "target")
    try:
        with conn.cursor() as cur:
            cur.execute(f"UPDATE {quote_ident(schema)}.control SET state = 'cancelled' WHERE slot_name = %s "
                        "AND cutover_id = %s AND state = 'requested'", (slot, cutover_id))
            withdrawn = cur.rowcount == 1
        conn.commit()
        return withdrawn
    finally:
        conn.close()
