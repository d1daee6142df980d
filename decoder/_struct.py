"""Precompiled big-endian readers, defined once (psycopg's `_struct.py` style).

Names: U = unsigned, I = signed, digits = bits. Each `unpack_*` is a bound
`struct.Struct.unpack_from(buf, offset)`.
"""

import struct

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
I32 = struct.Struct(">i")
U64 = struct.Struct(">Q")
I64 = struct.Struct(">q")

unpack_u8 = U8.unpack_from
unpack_u16 = U16.unpack_from
unpack_u32 = U32.unpack_from
unpack_i32 = I32.unpack_from
unpack_u64 = U64.unpack_from
unpack_i64 = I64.unpack_from

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
