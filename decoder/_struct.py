"""Precompiled big-endian readers, defined once (psycopg's `_struct.py` style), and the checked
reads of fixed layouts shared by the pgoutput parser and the envelope.

Names: U = unsigned, I = signed, F = float, digits = bits. Each `unpack_*` is a bound
`struct.Struct.unpack_from(buf, offset)`.
"""

import struct

from .errors import DecodeError, short

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
I16 = struct.Struct(">h")
I32 = struct.Struct(">i")
I64 = struct.Struct(">q")
F32 = struct.Struct(">f")
F64 = struct.Struct(">d")

unpack_u16 = U16.unpack_from
unpack_u32 = U32.unpack_from
unpack_u64 = U64.unpack_from

# Fixed layouts of whole messages (after the tag byte).
BEGIN = struct.Struct(">QqI")  # final lsn, commit time, xid
COMMIT = struct.Struct(">BQQq")  # flags, commit lsn, end lsn, commit time
STREAM_START = struct.Struct(">IB")  # xid, first segment
STREAM_COMMIT = struct.Struct(">IBQQq")  # xid, flags, commit lsn, end lsn, commit time
STREAM_ABORT = struct.Struct(">II")  # xid, subxid
STREAM_ABORT_V4 = struct.Struct(">IIQq")  # ... abort lsn, abort time (streaming = parallel)
BEGIN_PREPARE = struct.Struct(">QQqI")  # prepare lsn, end lsn, prepare time, xid (then gid)
PREPARE = struct.Struct(">BQQqI")  # flags, lsn, end lsn, time, xid (then gid)
ROLLBACK_PREPARED = struct.Struct(">BQQqqI")  # flags, prepare end, rollback end, 2 times, xid
COLUMN_TAIL = struct.Struct(">Ii")  # type oid, atttypmod
XLOGDATA = struct.Struct(">QQq")  # wal start, wal end, send time
KEEPALIVE = struct.Struct(">QqB")  # wal end, send time, reply requested
STANDBY_STATUS = struct.Struct(">cQQQqB")  # 'r', write, flush, apply, clock, reply requested


def unpack_exact(buf: bytes, blen: int, tag: str, st: struct.Struct, what: str) -> tuple[int, ...]:
    """A message that is exactly the tag byte and `st`: short or trailing bytes are errors."""
    if blen != 1 + st.size:
        if blen < 1 + st.size:
            raise short(tag, 1, st.size, blen - 1, what)
        raise DecodeError(f"{blen - 1 - st.size} unexpected trailing bytes after {what}", tag=tag,
                          offset=1 + st.size)
    return st.unpack_from(buf, 1)


def expect_end(pos: int, blen: int, tag: str) -> None:
    if pos != blen:
        raise DecodeError(f"{blen - pos} unexpected trailing bytes", tag=tag, offset=pos)
