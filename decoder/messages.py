"""Typed, frozen pgoutput messages.

Field names follow the PostgreSQL documentation ("Logical Replication Message Formats").
Times are kept as PostgreSQL sends them, microseconds since 2000-01-01 UTC (`*_time`), because
converting every commit time to a datetime costs more than the rest of a Begin message; use
`decoder.values.pg_epoch_to_datetime` where a datetime is wanted.

A column value has three states, never two:
  * ``None``       -- SQL NULL ('n')
  * ``UNCHANGED``  -- an unchanged TOASTed value the server did not send ('u'); never write it
  * a value        -- ``str`` for text format ('t'), ``bytes`` for binary format ('b')
"""

from __future__ import annotations

from typing import Final, Literal, TypeAlias

import msgspec

from .lsn import Lsn


class Unchanged:
    """The type of `UNCHANGED`: a TOASTed value that did not change and was not sent."""

    __slots__ = ()
    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

Value: TypeAlias = str | bytes | Unchanged | None
Tuple: TypeAlias = tuple[Value, ...]


class _Msg(msgspec.Struct, frozen=True, gc=False):
    pass


# -- transaction boundaries -------------------------------------------------------------------
class Begin(_Msg, tag="begin", frozen=True):
    final_lsn: Lsn
    commit_time: int
    xid: int


class Commit(_Msg, tag="commit", frozen=True):
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: int


class Origin(_Msg, tag="origin", frozen=True):
    commit_lsn: Lsn
    name: str


# -- catalog ---------------------------------------------------------------------------------
class Column(_Msg, frozen=True):
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Part of the replica identity (primary key, `USING INDEX`, or every column for FULL)."""
        return bool(self.flags & 1)


ReplicaIdentity: TypeAlias = Literal["d", "n", "f", "i"]


class Relation(_Msg, tag="relation", frozen=True):
    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: ReplicaIdentity
    columns: tuple[Column, ...]


class Type(_Msg, tag="type", frozen=True):
    xid: int | None
    oid: int
    namespace: str
    name: str


# -- changes ---------------------------------------------------------------------------------
class Insert(_Msg, tag="insert", frozen=True):
    xid: int | None
    relation_oid: int
    new: Tuple


class Update(_Msg, tag="update", frozen=True):
    """`old_kind` is 'K' (the old key, sent when a key column changed), 'O' (the whole old row,
    REPLICA IDENTITY FULL) or None (the key did not change: find the row by `new`)."""

    xid: int | None
    relation_oid: int
    old_kind: str | None
    old: Tuple | None
    new: Tuple


class Delete(_Msg, tag="delete", frozen=True):
    """`old_kind` is 'K' (key columns only, the rest NULL) or 'O' (the whole row)."""

    xid: int | None
    relation_oid: int
    old_kind: str
    old: Tuple


TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


class Truncate(_Msg, tag="truncate", frozen=True):
    xid: int | None
    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


class LogicalMessage(_Msg, tag="message", frozen=True):
    """`pg_logical_emit_message()`; `content` is the raw payload."""

    xid: int | None
    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes


# -- streaming of in-progress transactions (protocol 2+) ---------------------------------------
class StreamStart(_Msg, tag="stream_start", frozen=True):
    xid: int
    first_segment: bool


class StreamStop(_Msg, tag="stream_stop", frozen=True):
    pass


class StreamCommit(_Msg, tag="stream_commit", frozen=True):
    xid: int
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: int


class StreamAbort(_Msg, tag="stream_abort", frozen=True):
    """`subxid == xid` aborts the whole transaction, otherwise one subtransaction. `abort_lsn`
    and `abort_time` are sent by protocol 4 with `streaming = parallel` only."""

    xid: int
    subxid: int
    abort_lsn: Lsn | None = None
    abort_time: int | None = None


# -- two-phase commit (protocol 3+) ------------------------------------------------------------
class BeginPrepare(_Msg, tag="begin_prepare", frozen=True):
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_time: int
    xid: int
    gid: str


class Prepare(_Msg, tag="prepare", frozen=True):
    flags: int
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_time: int
    xid: int
    gid: str


class CommitPrepared(_Msg, tag="commit_prepared", frozen=True):
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_time: int
    xid: int
    gid: str


class RollbackPrepared(_Msg, tag="rollback_prepared", frozen=True):
    flags: int
    prepare_end_lsn: Lsn
    rollback_end_lsn: Lsn
    prepare_time: int
    rollback_time: int
    xid: int
    gid: str


class StreamPrepare(_Msg, tag="stream_prepare", frozen=True):
    flags: int
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_time: int
    xid: int
    gid: str


Message: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
    | StreamStart | StreamStop | StreamCommit | StreamAbort
    | BeginPrepare | Prepare | CommitPrepared | RollbackPrepared | StreamPrepare
)

# -- the replication envelope (CopyData payloads of START_REPLICATION) -----------------------------


class XLogData(_Msg, tag="xlogdata", frozen=True):
    """'w': WAL data. `data` is one pgoutput message."""

    wal_start: Lsn
    wal_end: Lsn
    send_time: int
    data: bytes


class Keepalive(_Msg, tag="keepalive", frozen=True):
    """'k': the server's heartbeat; `reply_requested` means answer now or be disconnected at
    `wal_sender_timeout`."""

    wal_end: Lsn
    send_time: int
    reply_requested: bool
