"""Resolving conflicts (sink/conflicts.py) inside the apply path.

Called by the set-based batch writer (netbatch.py) for rows an UPDATE or DELETE did not find and
inserts whose key exists, and by the change-by-change path. Resolutions other than `error` are
written in the batch's own target transaction, together with their dead-letter rows: a crash
repeats both or neither.

`error` in a set-based batch cannot name its transaction safely (the batch was reordered), so it
raises with `batch_has_earlier`: the stream loop re-applies those transactions one per batch,
change by change, and the conflict comes up again, precisely. Then its dead-letter row is written
through a separate connection (the batch is rolled back) and the daemon stops with the change's
LSN, xid, table, key and `pgferry skip --lsn` to move past it.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import psycopg2
import psycopg2.extras

from decoder import Lsn

from .conflicts import Conflict, Policies, Resolution, policy_resolution
from .errors import ConflictError
from .relations import TargetTable
from .state import quote_ident
from .stats import SinkStats

log = logging.getLogger("pgferry.sink")


class ConflictResolver:
    """The sink's conflict resolution (netbatch.Resolver): rows an update or delete did not find,
    inserts whose key exists, changes the target rejected. Each goes by its table's policy (or the
    hook), is counted in `stats` and recorded in the dead-letter table; `error` stops the daemon."""

    def __init__(self, cur: Any, schema: str, slot: str, policies: Policies, target_dsn: str | None,
                 stats: SinkStats) -> None:
        self.cur = cur  # the sink's target cursor: resolutions are part of the batch
        self.schema = schema
        self.slot = slot
        self.policies = policies
        self.target_dsn = target_dsn  # for dead-letter rows that must outlive a rolled-back batch
        self.stats = stats
        # True on the change-by-change path, where the transaction of each change is exact (a
        # conflict under `error` stops there); False in a set-based batch (it is re-run precisely)
        self.precise = False

    # -- the netbatch.Resolver protocol ------------------------------------------------------
    def missing(self, table: TargetTable, kind: str, items: list[tuple]) -> None:
        policy = self.policies.for_table(table.name).for_kind(kind)  # type: ignore[arg-type]
        dead = []
        for key, entry in items:
            _, row, lsn, xid = entry[:4]
            source = table.as_dict(row)
            conflict = Conflict(table=table.name, kind=kind, key=table.key_dict(key),
                                old=source if kind == "delete_missing" else None,
                                new=source if kind == "update_missing" else None,
                                existing=None, lsn=str(lsn) if lsn is not None else None, xid=xid)
            res = self._decide(conflict, policy)
            resolution = "skipped"
            if res.action == "error":
                self._stop(conflict, res)
            elif kind == "update_missing" and res.action in ("apply", "row"):
                values = res.row if res.action == "row" else source
                if values is not None and all(c.name in values for c in table.rel.columns):
                    self._insert_dict(table, values)
                    resolution = "inserted the source row"
                else:
                    resolution = "skipped: the source did not send every column (unchanged TOAST)"
            dead.append((conflict, resolution))
        self._dead_letter(dead)
        self.stats.missing_rows += len(items)
        log.warning("%s: %d row(s) to %s not found on the target; %s (conflict %s, see %s.conflicts)",
                    table.display, len(items), kind.split("_")[0], dead[0][1], kind, self.schema)

    def insert_exists(self, table: TargetTable, items: list[tuple]) -> None:
        policy = self.policies.for_table(table.name)
        newer = self._newer_index(table, policy.newer_column) if policy.insert_exists == "keep-newer" else None
        sets = table.update_cols
        dead: list[tuple[Conflict, str]] = []
        to_write: list[tuple[tuple, Conflict]] = []  # source rows that win
        for key, entry, existing in items:
            _, row, lsn, xid = entry[:4]
            conflict = Conflict(table=table.name, kind="insert_exists", key=table.key_dict(key), old=None,
                                new=table.as_dict(row), existing=existing, lsn=str(lsn) if lsn is not None else None,
                                xid=xid)
            if self.policies.hook is None and newer is not None:
                to_write.append(((*key, *(row[i] for i in sets)), conflict))  # decided by the server below
                self._count(conflict)
                continue
            res = self._decide(conflict, policy.insert_exists)
            if res.action == "error":
                self._stop(conflict, res)
            elif res.action == "apply":
                self._update_dict(table, key, conflict.new or {})
                dead.append((conflict, "overwrote the target row"))
            elif res.action == "row":
                self._update_dict(table, key, res.row or {})
                dead.append((conflict, "wrote the hook's row"))
            else:
                dead.append((conflict, "kept the target row"))
        if to_write:
            # keep-newer: one UPDATE that only touches rows whose column is older on the target
            page = [p for p, _ in to_write]
            sql = table.update_from(sets, newer=newer)
            from .netbatch import array_text  # late: netbatch imports this module's users

            self.cur.execute(sql, [array_text(col) for col in zip(*page, strict=True)])
            won = {r[0] - 1 for r in self.cur.fetchall()}
            col = policy.newer_column
            for n, (_, conflict) in enumerate(to_write):
                dead.append((conflict, f"overwrote the target row ({col} newer on the source)" if n in won
                             else f"kept the target row ({col} not older on the target)"))
        self._dead_letter(dead)
        log.warning("%s: %d inserted row(s) already on the target; %s (conflict insert_exists, see %s.conflicts)",
                    table.display, len(items), dead[0][1] if dead else "", self.schema)

    def apply_error(self, table: TargetTable, row: Any, lsn: Any, xid: int | None, detail: str) -> bool:
        """A change the target rejected (change-by-change path): True when the policy skips it."""
        policy = self.policies.for_table(table.name).apply_error
        conflict = Conflict(table=table.name, kind="apply_error", key={}, old=None, new=table.as_dict(row),
                            existing=None, lsn=str(lsn) if lsn is not None else None, xid=xid, detail=detail)
        res = self._decide(conflict, policy)
        if res.action == "error":
            return False
        self._dead_letter([(conflict, "skipped")])
        log.warning("%s: the target rejected a change (%s); skipped by the apply_error policy", table.display,
                    detail)
        return True

    # -- helpers -----------------------------------------------------------------------------
    def _count(self, conflict: Conflict) -> None:
        counted = (conflict.table, conflict.kind)
        self.stats.conflict_counts[counted] = self.stats.conflict_counts.get(counted, 0) + 1

    def _decide(self, conflict: Conflict, policy: str) -> Resolution:
        self._count(conflict)
        hook = self.policies.hook
        if hook is None:
            return policy_resolution(policy, conflict.kind)  # type: ignore[arg-type]
        try:
            res = hook(conflict)
        except Exception as exc:  # the hook's own failure stops the daemon with its message
            raise ConflictError(f"the conflict hook raised {type(exc).__name__}: {exc}", lsn=_lsn(conflict),
                                xid=conflict.xid, table=conflict.table) from None
        if not isinstance(res, Resolution):
            raise ConflictError(f"the conflict hook returned {res!r}, not a Resolution", lsn=_lsn(conflict),
                                xid=conflict.xid, table=conflict.table)
        return res

    def _stop(self, conflict: Conflict, res: Resolution) -> None:
        why = res.message or f"policy error for {conflict.kind}"
        if not self.precise:
            err = ConflictError(f"conflict {conflict.kind} in a batch ({why})", lsn=_lsn(conflict), xid=conflict.xid,
                                table=conflict.table)
            err.batch_has_earlier = True  # re-run change by change: the conflict comes back, precisely
            raise err
        self._dead_letter([(conflict, f"stopped: {why}")], separate=True)
        raise ConflictError(f"conflict {conflict.kind} on key {msgspec.json.encode(conflict.key).decode()}: {why}; "
                            f"the target row: {msgspec.json.encode(conflict.existing).decode()}. Fix the target, or "
                            f"skip this source transaction: pgferry skip --lsn {conflict.lsn}",
                            lsn=_lsn(conflict), xid=conflict.xid, table=conflict.table)

    def _newer_index(self, table: TargetTable, column: str | None) -> int:
        for i, c in enumerate(table.rel.columns):
            if c.name == column:
                return i
        raise ConflictError(f"keep-newer policy: table {table.name} has no column {column!r} (newer_column)",
                            table=table.name)

    def _insert_dict(self, table: TargetTable, values: dict[str, Any]) -> None:
        cols = [c.name for c in table.rel.columns if c.name in values]
        sql = (f"INSERT INTO {table.qualified} ({', '.join(quote_ident(c) for c in cols)}) OVERRIDING SYSTEM VALUE "
               f"VALUES ({', '.join(['%s'] * len(cols))})")
        self.cur.execute(sql, [values[c] for c in cols])

    def _update_dict(self, table: TargetTable, key: tuple, values: dict[str, Any]) -> None:
        keys = {table.rel.columns[i].name for i in table.key}
        cols = [c.name for i, c in enumerate(table.rel.columns) if c.name in values and c.name not in keys
                and table.settable[i]]
        if not cols:
            return
        where = " AND ".join(f"{table.names[i]} = %s" for i in table.key)
        self.cur.execute(f"UPDATE {table.qualified} SET {', '.join(f'{quote_ident(c)} = %s' for c in cols)} "
                         f"WHERE {where}", [values[c] for c in cols] + list(key))

    def _dead_letter(self, dead: list[tuple[Conflict, str]], separate: bool = False) -> None:
        if not dead:
            return
        enc = msgspec.json.encode
        rows = [(self.slot, c.lsn, c.xid, c.table, c.kind, enc(c.key).decode(), _json(c.old), _json(c.new),
                 _json(c.existing), resolution, c.detail) for c, resolution in dead]
        sql = (f"INSERT INTO {quote_ident(self.schema)}.conflicts (slot_name, lsn, xid, table_name, kind, key, "
               "old_row, new_row, target_row, resolution, detail) VALUES %s")
        template = "(%s, %s::pg_lsn, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s)"
        if not separate:
            psycopg2.extras.execute_values(self.cur, sql, rows, template=template)
            return
        if self.target_dsn is None:
            return
        side = psycopg2.connect(self.target_dsn, application_name="pgferry-conflicts")
        try:
            with side.cursor() as cur:
                psycopg2.extras.execute_values(cur, sql, rows, template=template)
            side.commit()
        finally:
            side.close()


def _lsn(conflict: Conflict) -> Lsn | None:
    return Lsn.parse(conflict.lsn) if conflict.lsn else None


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()

