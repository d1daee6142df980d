"""pgoutput bytes -> typed messages. Pure: no sockets, no SQL, no catalog look-ups.

    from decoder import PgOutputDecoder, decode_copy_data
    env = decode_copy_data(copy_data)          # XLogData | Keepalive
    msg = PgOutputDecoder().decode(env.data)   # Begin | Insert | ... (see decoder.messages)
"""

from . import accel
from .accel import pure_python
from .envelope import decode_copy_data, encode_standby_status
from .errors import DecodeError
from .lsn import INVALID_LSN, Lsn
from .messages import (
    UNCHANGED,
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Keepalive,
    LogicalMessage,
    Message,
    Origin,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Unchanged,
    Update,
    Value,
    XLogData,
)
from .pgoutput import PgOutputDecoder, decode_message

__all__ = [
    "INVALID_LSN",
    "UNCHANGED",
    "Begin",
    "BeginPrepare",
    "Column",
    "Commit",
    "CommitPrepared",
    "DecodeError",
    "Delete",
    "Insert",
    "Keepalive",
    "LogicalMessage",
    "Lsn",
    "Message",
    "Origin",
    "PgOutputDecoder",
    "Prepare",
    "Relation",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "Type",
    "Unchanged",
    "Update",
    "Value",
    "XLogData",
    "accel",
    "decode_copy_data",
    "decode_message",
    "encode_standby_status",
    "pure_python",
]
