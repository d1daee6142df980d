"""`pgferry cleanup [--drop-state]`: drop what pgferry created on the source, as its state records,
and create again on the target what it held back there (foreign keys, triggers, rules). The
cutover's fence on the source goes too: clean up once the application has left the source.

The slot is dropped only if pgferry created it, the publication only if pgferry created it; with
--drop-state the state schema on the target goes too. Refused while the daemon runs (slot active).
"""

from __future__ import annotations

import sys
from typing import Any

import psycopg2

from sink.state import quote_ident

from ..ddl import capture
from ..errors import PgferryError, first_line
from ..source import connect, describe_dsn, read_state
from ..sync import holdback
from . import control, fence


def run_cleanup(source: str, target: str, slot: str, schema: str, drop_state: bool) -> int:
    def read(cur: Any, s: str) -> Any:
        cur.execute(f"SELECT p.slot_created_by_pgferry, y.publication_created, y.publication "
                    f"FROM {s}.progress p LEFT JOIN {s}.sync y USING (slot_name) WHERE p.slot_name = %s",
                    (slot,))
        return cur.fetchone()

    row = read_state(target, schema, read)
    if row is None:
        raise PgferryError(f"no pgferry state for slot {slot!r} on target {describe_dsn(target)}: nothing to clean up")
    slot_created, pub_created, publication = row
    rec = control.read(target, schema, slot)
    if rec is not None and rec.fallback and rec.fallback.get("state") == "active":
        raise PgferryError("a fallback is active: the old source is kept in sync from the target and stays fenced. "
                           "`pgferry fallback stop` first (the migration is confirmed), or `pgferry rollback`")
    dropped = []
    src = connect(source, "source")
    src.autocommit = True
    try:
        with src.cursor() as cur:
            # a source made read-only by default (by its operator, or by a pgferry before 0.4)
            cur.execute("SET default_transaction_read_only = off")
            cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            found = cur.fetchone()
            if found and found[0]:
                raise PgferryError(f"slot {slot!r} is in use: stop `pgferry start` first (SIGTERM), then clean up")
            if found and slot_created:
                cur.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                dropped.append(f"slot {slot}")
            if pub_created and publication:
                cur.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(publication)}")
                dropped.append(f"publication {publication}")
        lifted = fence.lift(source, schema)
        if lifted:
            dropped.append(f"the cutover's fence ({len(lifted)} source table(s) take writes again)")
        if capture.remove(src, schema):
            dropped.append("the schema-change capture (event triggers)")
    except psycopg2.Error as exc:
        raise PgferryError(f"cleanup on source {describe_dsn(source)} failed after dropping "
                           f"{', '.join(dropped) or 'nothing'}: {first_line(exc)}") from None
    finally:
        src.close()
    # what pgferry held back on the target (replicator/sync/holdback.py): in place again, before the
    # state that records it may go
    restored = holdback.restore(target, schema, slot)
    if restored.objects:
        dropped.append(f"restored {len(restored.objects)} held-back foreign key(s), trigger(s) and rule(s) on the "
                       "target")
    if drop_state:
        dst = connect(target, "target")
        try:
            dst.cursor().execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
            dst.commit()
            dropped.append(f"state schema {schema}")
        finally:
            dst.close()
    print("pgferry cleanup: dropped " + (", ".join(dropped) if dropped else "nothing (pgferry created none of it)"),
          file=sys.stderr)
    if restored.invalid:
        raise PgferryError("; ".join(f"foreign key {h.name} on {h.table} was restored NOT VALID: {h.detail}"
                                     for h in restored.invalid)
                           + ". Fix those rows, then ALTER TABLE ... VALIDATE CONSTRAINT ...")
    return 0
