"""The replication envelope: CopyData payloads on a START_REPLICATION connection.

Server -> client: 'w' XLogData (WAL data carrying one pgoutput message) and 'k' primary keepalive.
Client -> server: 'r' standby status update (the feedback that moves the slot).
"""

from __future__ import annotations

from . import _struct as S
from .errors import DecodeError, short
from .lsn import lsn_unchecked as _lsn
from .messages import Keepalive, XLogData

_W, _K = 0x77, 0x6B


def decode_copy_data(buf: bytes | bytearray | memoryview) -> XLogData | Keepalive:
    """Decode one CopyData payload received in replication mode."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    blen = len(buf)
    if blen == 0:
        raise DecodeError("empty CopyData", offset=0, needed=1, present=0)
    tag = buf[0]
    if tag == _W:
        if blen < 1 + S.XLOGDATA.size:
            raise short("w", 1, S.XLOGDATA.size, blen - 1, "XLogData header")
        start, end, send_time = S.XLOGDATA.unpack_from(buf, 1)
        return XLogData(_lsn(start), _lsn(end), send_time, buf[1 + S.XLOGDATA.size:])
    if tag == _K:
        end, send_time, reply = S.unpack_exact(buf, blen, "k", S.KEEPALIVE, "keepalive")
        return Keepalive(_lsn(end), send_time, bool(reply))
    raise DecodeError(f"unknown replication message tag {chr(tag)!r} (0x{tag:02x})", tag=chr(tag), offset=0)


def encode_standby_status(write_lsn: int, flush_lsn: int, apply_lsn: int, clock: int,
                          reply_requested: bool = False) -> bytes:
    """'r' standby status update. `clock` is microseconds since 2000-01-01 UTC."""
    return S.STANDBY_STATUS.pack(b"r", write_lsn, flush_lsn, apply_lsn, clock, int(reply_requested))
