"""Sink errors, classified by what to do (DESIGN.md §5.5). Each carries LSN, xid and table where known."""

from __future__ import annotations

from decoder import Lsn


class SinkError(Exception):
    """Base: a change could not be applied."""

    def __init__(self, message: str, *, lsn: Lsn | None = None, xid: int | None = None,
                 table: str | None = None) -> None:
        super().__init__(message)
        self.lsn, self.xid, self.table = lsn, xid, table

    def __str__(self) -> str:
        where = [f"{k} {v}" for k, v in (("commit LSN", self.lsn), ("xid", self.xid), ("table", self.table))
                 if v is not None]
        base = super().__str__()
        return f"{base} ({', '.join(where)})" if where else base


class SchemaMismatch(SinkError):
    """Fatal: the target's tables do not fit what the source sends. Fix the schema, then start again."""


class ApplyError(SinkError):
    """Needs an operator: the target rejected a change (constraint, type, value too long...)."""

    batch_has_earlier = False  # the failed batch also held complete earlier source transactions
