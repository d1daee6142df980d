"""pgoutput message parser: bytes in, frozen typed messages out.

Protocol versions 1-4, text and binary tuple data. Every read is bounds-checked: a short buffer,
an unknown tag or kind, trailing bytes or invalid UTF-8 raise `DecodeError`; nothing is skipped.

Inside a streamed block (between Stream Start and Stream Stop) the server prefixes Relation, Type,
Insert, Update, Delete, Truncate and transactional Message with the xid of the (sub)transaction.
The bytes alone cannot say whether that prefix is present, so `decode_message` takes `in_stream`,
and `PgOutputDecoder` tracks it from the Stream Start / Stop messages it sees.

The change messages (Insert/Update/Delete) are the hot path: their parsers are written out
flat, with locals instead of helper calls per field.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _struct as S
from . import accel
from .errors import DecodeError, short
from .lsn import Lsn
from .lsn import lsn_unchecked as _lsn
from .messages import (
    UNCHANGED,
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
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
    Tuple,
    Type,
    Update,
)

_u16 = S.unpack_u16
_u32 = S.unpack_u32
_K, _O, _N = 0x4B, 0x4F, 0x4E  # 'K', 'O', 'N'
_TEXT, _NULL, _UNCHANGED, _BINARY = 0x74, 0x6E, 0x75, 0x62  # 't', 'n', 'u', 'b'


def _tuple(buf: bytes, pos: int, blen: int, tag: str) -> tuple[Tuple, int]:
    """TupleData at `pos`: Int16 column count, then per column a kind byte ('n', 'u', 't', 'b')
    and for 't'/'b' an Int32 length and the value."""
    if pos + 2 > blen:
        raise short(tag, pos, 2, blen - pos, "tuple column count")
    (n,) = _u16(buf, pos)
    pos += 2
    values: list[object] = []
    append = values.append
    for _ in range(n):
        if pos + 1 > blen:
            raise short(tag, pos, 1, blen - pos, "tuple column kind")
        kind = buf[pos]
        if kind == _TEXT or kind == _BINARY:
            if pos + 5 > blen:
                raise short(tag, pos + 1, 4, blen - pos - 1, "column value length")
            (ln,) = _u32(buf, pos + 1)
            pos += 5
            end = pos + ln
            if end > blen:
                raise short(tag, pos, ln, blen - pos, "column value")
            if kind == _TEXT:
                append(buf[pos:end].decode())
            else:
                append(buf[pos:end])
            pos = end
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _UNCHANGED:
            append(UNCHANGED)
            pos += 1
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r} (0x{kind:02x})", tag=tag, offset=pos)
    return tuple(values), pos  # type: ignore[arg-type]


def _tuple_fast(buf: bytes, pos: int, blen: int, tag: str) -> tuple[Tuple, int]:
    """The hot loop: no per-field bounds checks. Slicing past the end does not raise, so a
    short buffer shows as `pos > blen` at the end; any failure re-parses with the checked
    `_tuple` to report exactly where and what was short."""
    try:
        n = buf[pos] << 8 | buf[pos + 1]
        p = pos + 2
        out: list[object] = [None] * n
        for i in range(n):
            kind = buf[p]
            if kind == _TEXT:
                start = p + 5
                p = start + _u32(buf, p + 1)[0]
                out[i] = buf[start:p].decode()
            elif kind == _NULL:
                p += 1
            elif kind == _UNCHANGED:
                out[i] = UNCHANGED
                p += 1
            elif kind == _BINARY:
                start = p + 5
                p = start + _u32(buf, p + 1)[0]
                out[i] = buf[start:p]
            else:
                break
        else:
            if p <= blen:
                return tuple(out), p  # type: ignore[arg-type]
    except (IndexError, S.struct.error):
        pass
    return _tuple(buf, pos, blen, tag)


def _string(buf: bytes, pos: int, blen: int, tag: str, what: str) -> tuple[str, int]:
    end = buf.find(0, pos)
    if end < 0:
        raise DecodeError(f"{what}: string not NUL-terminated", tag=tag, offset=pos, needed=blen - pos + 1,
                          present=blen - pos)
    return buf[pos:end].decode(), end + 1


def _xid(buf: bytes, pos: int, blen: int, tag: str, in_stream: bool) -> tuple[int | None, int]:
    if not in_stream:
        return None, pos
    if pos + 4 > blen:
        raise short(tag, pos, 4, blen - pos, "xid")
    return _u32(buf, pos)[0], pos + 4


# -- the change messages (hot path) ------------------------------------------------------------
def _change_head(buf: bytes, blen: int, in_stream: bool, tag: str) -> tuple[int | None, int, int, int]:
    """A change message's start: (xid or None, relation oid, tuple marker, position after it)."""
    if in_stream:
        xid, pos = _xid(buf, 1, blen, tag, in_stream)
    else:
        xid, pos = None, 1
    if pos + 5 > blen:
        raise short(tag, pos, 5, blen - pos, "relation oid and tuple marker")
    return xid, _u32(buf, pos)[0], buf[pos + 4], pos + 5


def _insert(buf: bytes, blen: int, in_stream: bool) -> Insert:
    xid, rel, marker, pos = _change_head(buf, blen, in_stream, "I")
    if marker != _N:
        raise DecodeError(f"expected 'N' (new tuple), got {chr(marker)!r}", tag="I", offset=pos - 1)
    new, pos = _tuple_fast(buf, pos, blen, "I")
    if pos != blen:
        S.expect_end(pos, blen, "I")
    return Insert(xid, rel, new)


def _update(buf: bytes, blen: int, in_stream: bool) -> Update:
    xid, rel, marker, pos = _change_head(buf, blen, in_stream, "U")
    old_kind = None
    old = None
    if marker == _K or marker == _O:
        old_kind = "K" if marker == _K else "O"
        old, pos = _tuple_fast(buf, pos, blen, "U")
        if pos + 1 > blen:
            raise short("U", pos, 1, 0, "new tuple marker")
        marker = buf[pos]
        pos += 1
    if marker != _N:
        raise DecodeError(f"expected 'K', 'O' or 'N' tuple marker, got {chr(marker)!r}", tag="U", offset=pos - 1)
    new, pos = _tuple_fast(buf, pos, blen, "U")
    if pos != blen:
        S.expect_end(pos, blen, "U")
    return Update(xid, rel, old_kind, old, new)


def _delete(buf: bytes, blen: int, in_stream: bool) -> Delete:
    xid, rel, marker, pos = _change_head(buf, blen, in_stream, "D")
    if marker != _K and marker != _O:
        raise DecodeError(f"expected 'K' or 'O' tuple marker, got {chr(marker)!r}", tag="D", offset=pos - 1)
    old, pos = _tuple_fast(buf, pos, blen, "D")
    if pos != blen:
        S.expect_end(pos, blen, "D")
    return Delete(xid, rel, "K" if marker == _K else "O", old)


# -- transaction boundaries --------------------------------------------------------------------
_BEGIN_LEN = 1 + S.BEGIN.size
_COMMIT_LEN = 1 + S.COMMIT.size
_unpack_begin = S.BEGIN.unpack_from
_unpack_commit = S.COMMIT.unpack_from


def _begin(buf: bytes, blen: int, in_stream: bool) -> Begin:
    if blen == _BEGIN_LEN:
        final_lsn, commit_time, xid = _unpack_begin(buf, 1)
    else:
        final_lsn, commit_time, xid = S.unpack_exact(buf, blen, "B", S.BEGIN, "Begin")
    return Begin(_lsn(final_lsn), commit_time, xid)


def _commit(buf: bytes, blen: int, in_stream: bool) -> Commit:
    if blen == _COMMIT_LEN:
        flags, commit_lsn, end_lsn, commit_time = _unpack_commit(buf, 1)
    else:
        flags, commit_lsn, end_lsn, commit_time = S.unpack_exact(buf, blen, "C", S.COMMIT, "Commit")
    return Commit(flags, _lsn(commit_lsn), _lsn(end_lsn), commit_time)


def _origin(buf: bytes, blen: int, in_stream: bool) -> Origin:
    if blen < 9:
        raise short("O", 1, 8, blen - 1, "origin commit LSN")
    (lsn,) = S.unpack_u64(buf, 1)
    name, pos = _string(buf, 9, blen, "O", "origin name")
    S.expect_end(pos, blen, "O")
    return Origin(_lsn(lsn), name)


# -- catalog -----------------------------------------------------------------------------------
def _relation(buf: bytes, blen: int, in_stream: bool) -> Relation:
    xid, pos = _xid(buf, 1, blen, "R", in_stream)
    if pos + 4 > blen:
        raise short("R", pos, 4, blen - pos, "relation oid")
    (oid,) = _u32(buf, pos)
    namespace, pos = _string(buf, pos + 4, blen, "R", "namespace")
    name, pos = _string(buf, pos, blen, "R", "relation name")
    if pos + 3 > blen:
        raise short("R", pos, 3, blen - pos, "replica identity and column count")
    ident = chr(buf[pos])
    if ident not in "dnfi":
        raise DecodeError(f"unknown replica identity {ident!r}", tag="R", offset=pos)
    (ncols,) = _u16(buf, pos + 1)
    pos += 3
    cols = []
    for _ in range(ncols):
        if pos + 1 > blen:
            raise short("R", pos, 1, blen - pos, "column flags")
        flags = buf[pos]
        cname, pos = _string(buf, pos + 1, blen, "R", "column name")
        if pos + 8 > blen:
            raise short("R", pos, 8, blen - pos, "column type oid and modifier")
        type_oid, typmod = S.COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        cols.append(Column(flags, cname, type_oid, typmod))
    S.expect_end(pos, blen, "R")
    return Relation(xid, oid, namespace, name, ident, tuple(cols))  # type: ignore[arg-type]  # checked above


def _type(buf: bytes, blen: int, in_stream: bool) -> Type:
    xid, pos = _xid(buf, 1, blen, "Y", in_stream)
    if pos + 4 > blen:
        raise short("Y", pos, 4, blen - pos, "type oid")
    (oid,) = _u32(buf, pos)
    namespace, pos = _string(buf, pos + 4, blen, "Y", "namespace")
    name, pos = _string(buf, pos, blen, "Y", "type name")
    S.expect_end(pos, blen, "Y")
    return Type(xid, oid, namespace, name)


def _truncate(buf: bytes, blen: int, in_stream: bool) -> Truncate:
    xid, pos = _xid(buf, 1, blen, "T", in_stream)
    if pos + 5 > blen:
        raise short("T", pos, 5, blen - pos, "relation count and options")
    (nrels,) = _u32(buf, pos)
    options = buf[pos + 4]
    pos += 5
    if pos + 4 * nrels != blen:
        if pos + 4 * nrels > blen:
            raise short("T", pos, 4 * nrels, blen - pos, f"{nrels} relation oids")
        S.expect_end(pos + 4 * nrels, blen, "T")
    oids = S.struct.unpack_from(f">{nrels}I", buf, pos)
    return Truncate(xid, options, oids)


def _message(buf: bytes, blen: int, in_stream: bool) -> LogicalMessage:
    # The xid prefix is there for transactional messages in a streamed block; non-transactional
    # ones are emitted at decode time, outside any stream block.
    xid, pos = _xid(buf, 1, blen, "M", in_stream)
    if pos + 9 > blen:
        raise short("M", pos, 9, blen - pos, "flags and LSN")
    flags = buf[pos]
    (lsn,) = S.unpack_u64(buf, pos + 1)
    prefix, pos = _string(buf, pos + 9, blen, "M", "message prefix")
    if pos + 4 > blen:
        raise short("M", pos, 4, blen - pos, "content length")
    (ln,) = _u32(buf, pos)
    pos += 4
    if pos + ln > blen:
        raise short("M", pos, ln, blen - pos, "message content")
    S.expect_end(pos + ln, blen, "M")
    return LogicalMessage(xid, bool(flags & 1), _lsn(lsn), prefix, buf[pos:pos + ln])


# -- streaming ---------------------------------------------------------------------------------
def _stream_start(buf: bytes, blen: int, in_stream: bool) -> StreamStart:
    xid, first = S.unpack_exact(buf, blen, "S", S.STREAM_START, "Stream Start")
    return StreamStart(xid, bool(first))


def _stream_stop(buf: bytes, blen: int, in_stream: bool) -> StreamStop:
    S.expect_end(1, blen, "E")
    return StreamStop()


def _stream_commit(buf: bytes, blen: int, in_stream: bool) -> StreamCommit:
    xid, flags, commit_lsn, end_lsn, commit_time = S.unpack_exact(buf, blen, "c", S.STREAM_COMMIT, "Stream Commit")
    return StreamCommit(xid, flags, _lsn(commit_lsn), _lsn(end_lsn), commit_time)


def _stream_abort(buf: bytes, blen: int, in_stream: bool) -> StreamAbort:
    # Protocol 4 with streaming = parallel appends the abort LSN and time; the length tells.
    if blen == 1 + S.STREAM_ABORT_V4.size:
        xid, subxid, lsn, t = S.STREAM_ABORT_V4.unpack_from(buf, 1)
        return StreamAbort(xid, subxid, _lsn(lsn), t)
    xid, subxid = S.unpack_exact(buf, blen, "A", S.STREAM_ABORT, "Stream Abort")
    return StreamAbort(xid, subxid)


# -- two-phase ---------------------------------------------------------------------------------
def _gid(buf: bytes, pos: int, blen: int, tag: str) -> str:
    gid, pos = _string(buf, pos, blen, tag, "gid")
    S.expect_end(pos, blen, tag)
    return gid


def _head(buf: bytes, blen: int, tag: str, st: S.struct.Struct, what: str) -> tuple[int, ...]:
    if blen < 1 + st.size:
        raise short(tag, 1, st.size, blen - 1, what)
    return st.unpack_from(buf, 1)


def _begin_prepare(buf: bytes, blen: int, in_stream: bool) -> BeginPrepare:
    lsn, end, t, xid = _head(buf, blen, "b", S.BEGIN_PREPARE, "Begin Prepare")
    return BeginPrepare(_lsn(lsn), _lsn(end), t, xid, _gid(buf, 1 + S.BEGIN_PREPARE.size, blen, "b"))


def _prepare(buf: bytes, blen: int, in_stream: bool) -> Prepare:
    flags, lsn, end, t, xid = _head(buf, blen, "P", S.PREPARE, "Prepare")
    return Prepare(flags, _lsn(lsn), _lsn(end), t, xid, _gid(buf, 1 + S.PREPARE.size, blen, "P"))


def _commit_prepared(buf: bytes, blen: int, in_stream: bool) -> CommitPrepared:
    flags, lsn, end, t, xid = _head(buf, blen, "K", S.PREPARE, "Commit Prepared")
    return CommitPrepared(flags, _lsn(lsn), _lsn(end), t, xid, _gid(buf, 1 + S.PREPARE.size, blen, "K"))


def _rollback_prepared(buf: bytes, blen: int, in_stream: bool) -> RollbackPrepared:
    flags, pend, rend, pt, rt, xid = _head(buf, blen, "r", S.ROLLBACK_PREPARED, "Rollback Prepared")
    gid = _gid(buf, 1 + S.ROLLBACK_PREPARED.size, blen, "r")
    return RollbackPrepared(flags, _lsn(pend), _lsn(rend), pt, rt, xid, gid)


def _stream_prepare(buf: bytes, blen: int, in_stream: bool) -> StreamPrepare:
    flags, lsn, end, t, xid = _head(buf, blen, "p", S.PREPARE, "Stream Prepare")
    return StreamPrepare(flags, _lsn(lsn), _lsn(end), t, xid, _gid(buf, 1 + S.PREPARE.size, blen, "p"))


_PARSERS: dict[int, Callable[[bytes, int, bool], Message]] = {
    ord("I"): _insert, ord("U"): _update, ord("D"): _delete,
    ord("B"): _begin, ord("C"): _commit, ord("O"): _origin,
    ord("R"): _relation, ord("Y"): _type, ord("T"): _truncate, ord("M"): _message,
    ord("S"): _stream_start, ord("E"): _stream_stop, ord("c"): _stream_commit, ord("A"): _stream_abort,
    ord("b"): _begin_prepare, ord("P"): _prepare, ord("K"): _commit_prepared,
    ord("r"): _rollback_prepared, ord("p"): _stream_prepare,
}
_get = _PARSERS.get


def decode_message(buf: bytes | bytearray | memoryview, in_stream: bool = False) -> Message:
    """Decode one pgoutput message (the payload of one XLogData)."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    if _accelerated is not None:
        msg = _accelerated(buf, in_stream)
        if msg is not None:
            return msg
    return decode_message_py(buf, in_stream)


def decode_message_py(buf: bytes, in_stream: bool = False) -> Message:
    """The pure-Python parser: every message kind, and the precise error for malformed input."""
    blen = len(buf)
    if blen == 0:
        raise DecodeError("empty message", offset=0, needed=1, present=0)
    parser = _get(buf[0])
    if parser is None:
        raise DecodeError(f"unknown pgoutput message tag {chr(buf[0])!r} (0x{buf[0]:02x})", tag=chr(buf[0]),
                          offset=0)
    try:
        return parser(buf, blen, in_stream)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"invalid UTF-8 in a text value or name ({exc.reason} at byte {exc.start} of it)",
                          tag=chr(buf[0])) from None


def _load_accelerator() -> Callable[[bytes, bool], Message | None] | None:
    """The optional C parser for Begin/Commit/Insert/Update/Delete (decoder/_cdecode.c), unless
    PGFERRY_PURE_PYTHON=1 or it was not built. It returns None for anything it does not decode
    (other tags, any malformed input); the Python parser then decodes or reports the error."""
    _cdecode = accel.load("decoder._cdecode")
    if _cdecode is None:
        return None
    _cdecode.init(Insert, Update, Delete, Begin, Commit, Lsn, UNCHANGED)
    return _cdecode.decode


_accelerated = _load_accelerator()
ACCELERATED: bool = _accelerated is not None
"""True when the C parser is in use (see `_load_accelerator`)."""
decode_hot = _accelerated
"""The C parser itself, for a caller's hot loop: `decode_hot(buf: bytes, in_stream)` returns a
Begin/Commit/Insert/Update/Delete, or None (then use `PgOutputDecoder.decode`). None when not built."""


class PgOutputDecoder:
    """Stateful wrapper for a stream of messages: knows whether it is inside a streamed block, so
    it knows whether change messages carry an xid."""

    __slots__ = ("in_stream", "stream_xid")

    def __init__(self) -> None:
        self.in_stream = False
        self.stream_xid: int | None = None

    def decode(self, buf: bytes | bytearray | memoryview) -> Message:
        if _accelerated is not None and type(buf) is bytes:
            msg = _accelerated(buf, self.in_stream)
            if msg is not None:
                return msg  # never a Stream Start/Stop: the state below is unaffected
        return self.decode_py(buf)

    def decode_py(self, buf: bytes | bytearray | memoryview) -> Message:
        """`decode` without the C parser: for a message it declined (a caller that tried it first
        does not parse the message a third time)."""
        msg = decode_message_py(buf if type(buf) is bytes else bytes(buf), self.in_stream)
        t = type(msg)
        if t is StreamStart:
            if self.in_stream:
                raise DecodeError("Stream Start inside a streamed block (missing Stream Stop)", tag="S", offset=0)
            self.in_stream = True
            self.stream_xid = msg.xid  # type: ignore[union-attr]
        elif t is StreamStop:
            if not self.in_stream:
                raise DecodeError("Stream Stop outside a streamed block", tag="E", offset=0)
            self.in_stream = False
            self.stream_xid = None
        return msg
