"""Sink errors, classified by what to do (docs/design.md, Errors). Each carries LSN, xid and table where known."""

from __future__ import annotations

import psycopg2
import psycopg2.errors

from decoder import Lsn

# -- the retry table: what a psycopg2 error means, for a batch and for the stream session --------
# The connection or the transaction is gone (the target undid the open batch): never a conflict or
# an apply error; the stream loop reconnects and resumes from the stored progress.
RETRYABLE: tuple[type[Exception], ...] = (
    psycopg2.OperationalError, psycopg2.InterfaceError,
    psycopg2.errors.SerializationFailure, psycopg2.errors.DeadlockDetected)
# Also retried by the stream loop with a new session: a server shutting down or starting up, a
# slot still held by the walsender of the session before.
SESSION_RETRYABLE: tuple[type[Exception], ...] = (
    psycopg2.errors.ObjectInUse, psycopg2.errors.AdminShutdown, psycopg2.errors.CrashShutdown,
    psycopg2.errors.CannotConnectNow)
# Never retried: the slot is gone or invalidated (the target must be re-synced).
SLOT_LOST: tuple[type[Exception], ...] = (psycopg2.errors.UndefinedObject,
                                          psycopg2.errors.ObjectNotInPrerequisiteState)


def retryable(exc: BaseException) -> bool:
    """May the stream loop reconnect and go on after `exc` (a psycopg2 error or an OSError)? Any
    other server error is retried too (with backoff, logged once): a disk full or too many
    connections passes; what never can, stops the daemon (SLOT_LOST)."""
    if isinstance(exc, (*RETRYABLE, *SESSION_RETRYABLE, OSError)):
        return True
    return isinstance(exc, psycopg2.DatabaseError) and not isinstance(exc, SLOT_LOST)


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


class DdlStop(SinkError):
    """Fatal: a schema change pgferry will not apply (ddl = stop, or one it cannot replay as it was)."""


class SchemaMismatch(SinkError):
    """Fatal: the target's tables do not fit what the source sends. Fix the schema, then start again."""


class ApplyError(SinkError):
    """Needs an operator: the target rejected a change (constraint, type, value too long...)."""

    batch_has_earlier = False  # the failed batch also held complete earlier source transactions


class ConflictError(ApplyError):
    """A conflict under the `error` policy (or a hook that said so): the daemon stops."""
