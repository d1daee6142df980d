"""Column values (text or binary format, as pgoutput sends them) -> Python values.

Not on the apply hot path: the sink writes values back to PostgreSQL in the format it received
them. This is for `pgferry tail`, hooks, conflict reports and verification.

Mapping (by type OID; unknown types fall back to text, or raw bytes in binary format):
  int2/int4/int8/oid -> int          numeric -> Decimal (NaN, ±Infinity as Decimal's)
  float4/float8 -> float (nan, ±inf) bool -> bool      text/varchar/bpchar/name/char -> str
  bytea -> bytes                     uuid -> UUID      json/jsonb -> parsed JSON
  date -> date, time -> time, timetz -> time with tzinfo, timestamp -> naive datetime,
  timestamptz -> aware datetime (UTC); ±infinity dates/timestamps -> float ±inf
  interval -> Interval(months, days, microseconds)   arrays -> nested lists (None for NULL)
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

from . import _struct as S
from .errors import DecodeError
from .messages import UNCHANGED

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_NAIVE = datetime(2000, 1, 1)
_PG_EPOCH_DATE = date(2000, 1, 1)
# PostgreSQL's ±infinity for dates and timestamps, in text and in binary (the extreme int32 day
# number / int64 microsecond count); Python has no infinite date, so they become float ±inf.
_TEXT_INFINITY = {"infinity": math.inf, "-infinity": -math.inf}
_DATE_INFINITY = {2**31 - 1: math.inf, -(2**31): -math.inf}
_TIMESTAMP_INFINITY = {2**63 - 1: math.inf, -(2**63): -math.inf}


class Interval(NamedTuple):
    """PostgreSQL's interval keeps months, days and microseconds apart (a month is not 30 days)."""

    months: int
    days: int
    microseconds: int

    def __str__(self) -> str:
        """PostgreSQL's own text form (IntervalStyle 'postgres'): '1 year 2 mons 3 days 04:05:06.7'."""
        parts = []
        years, mons = int(self.months / 12), self.months - int(self.months / 12) * 12
        for n, unit in ((years, "year"), (mons, "mon"), (self.days, "day")):
            if n:
                parts.append(f"{n} {unit}{'' if n == 1 else 's'}")
        if self.microseconds or not parts:
            sign = "-" if self.microseconds < 0 else ""
            h, rem = divmod(abs(self.microseconds), 3_600_000_000)
            m, rem = divmod(rem, 60_000_000)
            s, frac = divmod(rem, 1_000_000)
            clock = f"{sign}{h:02d}:{m:02d}:{s:02d}" + (f".{frac:06d}".rstrip("0") if frac else "")
            parts.append(clock)
        return " ".join(parts)


def pg_epoch_to_datetime(us: int) -> datetime:
    """Microseconds since 2000-01-01 UTC (commit times, send times) -> aware datetime."""
    return PG_EPOCH + timedelta(microseconds=us)


def datetime_to_pg_epoch(dt: datetime) -> int:
    delta = dt - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# -- text format ---------------------------------------------------------------------------------
def _t_bool(s: str) -> bool:
    return s == "t"


def _t_float(s: str) -> float:
    return float(s)  # accepts NaN, Infinity, -Infinity


def _t_numeric(s: str) -> Decimal:
    return Decimal(s)


def _t_bytea(s: str) -> bytes:
    if s.startswith("\\x"):
        return bytes.fromhex(s[2:])
    # bytea_output = escape: printable bytes as-is, \\ and \ooo octal escapes
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if s[i + 1] == "\\":
                out.append(0x5C)
                i += 2
            else:
                out.append(int(s[i + 1:i + 4], 8))
                i += 4
        else:
            out += c.encode()
            i += 1
    return bytes(out)


def _t_date(s: str) -> date | float:
    if s in _TEXT_INFINITY:
        return _TEXT_INFINITY[s]
    if s.endswith(" BC"):
        raise ValueError("BC dates are not representable in Python")
    return date.fromisoformat(s)


def _t_time(s: str) -> time:
    return time.fromisoformat(s)


def _fix_offset(s: str) -> str:
    # PostgreSQL prints +02 or +05:30 or +05:30:15; Python wants +HH:MM[:SS]
    m = re.search(r"([+-])(\d\d)(?::?(\d\d))?(?::?(\d\d))?$", s)
    if not m:
        return s
    off = f"{m.group(1)}{m.group(2)}:{m.group(3) or '00'}" + (f":{m.group(4)}" if m.group(4) else "")
    return s[:m.start()] + off


def _t_timetz(s: str) -> time:
    return time.fromisoformat(_fix_offset(s))


def _t_timestamp(s: str) -> datetime | float:
    if s in _TEXT_INFINITY:
        return _TEXT_INFINITY[s]
    return datetime.fromisoformat(s)


def _t_timestamptz(s: str) -> datetime | float:
    if s in _TEXT_INFINITY:
        return _TEXT_INFINITY[s]
    return datetime.fromisoformat(_fix_offset(s)).astimezone(UTC)


_IV_UNITS = {"year": 12, "years": 12, "mon": 1, "mons": 1, "day": 0, "days": 0}
_IV_PART = re.compile(r"([+-]?\d+) (years?|mons?|days?)|([+-])?(\d+):(\d\d):(\d\d)(?:\.(\d+))?")


def _t_interval(s: str) -> Interval:
    """IntervalStyle 'postgres' (the default): '1 year 2 mons 3 days 04:05:06.7', '-1 days -00:00:01'."""
    months = days = us = 0
    pos = 0
    s = s.strip()
    while pos < len(s):
        m = _IV_PART.match(s, pos)
        if not m:
            raise ValueError(f"unsupported interval text {s!r} (IntervalStyle must be 'postgres')")
        if m.group(1):
            n, unit = int(m.group(1)), m.group(2)
            if unit.startswith("day"):
                days += n
            else:
                months += n * _IV_UNITS[unit]
        else:
            frac = (m.group(7) or "").ljust(6, "0")[:6]
            v = ((int(m.group(4)) * 60 + int(m.group(5))) * 60 + int(m.group(6))) * 1_000_000 + int(frac or 0)
            us += -v if m.group(3) == "-" else v
        pos = m.end()
        while pos < len(s) and s[pos] == " ":
            pos += 1
    return Interval(months, days, us)


def _t_uuid(s: str) -> UUID:
    return UUID(s)


def _t_json(s: str) -> Any:
    return json.loads(s)


def parse_text_array(s: str, elem: Callable[[str], Any], delim: str = ",") -> list[Any]:
    """Array text format: {1,NULL,"a \\"q\\""} and nested {{1,2},{3,4}}, with an optional
    leading dimension decoration ([0:1]={...}). Quoted "NULL" is the string, unquoted NULL is None."""
    pos = 0
    if s.startswith("["):
        pos = s.index("=") + 1
    if s[pos] != "{":
        raise ValueError(f"not an array literal: {s!r}")

    def parse(pos: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        pos += 1  # '{'
        if s[pos] == "}":
            return out, pos + 1
        while True:
            c = s[pos]
            if c == "{":
                sub, pos = parse(pos)
                out.append(sub)
            elif c == '"':
                buf = []
                pos += 1
                while s[pos] != '"':
                    if s[pos] == "\\":
                        pos += 1
                    buf.append(s[pos])
                    pos += 1
                pos += 1
                out.append(elem("".join(buf)))
            else:
                end = pos
                while s[end] not in (delim, "}"):
                    end += 1
                tok = s[pos:end].strip()
                out.append(None if tok == "NULL" else elem(tok))
                pos = end
            if s[pos] == "}":
                return out, pos + 1
            pos += 1  # delimiter

    value, _ = parse(pos)
    return value


# -- binary format -------------------------------------------------------------------------------
# `.unpack` (not unpack_from): a value of the wrong length is an error, not silently cut.
_b_i16 = S.I16.unpack
_b_i32 = S.I32.unpack
_b_i64 = S.I64.unpack
_b_u32 = S.U32.unpack
_b_f32 = S.F32.unpack
_b_f64 = S.F64.unpack
_NUMERIC_HEAD = struct.Struct(">hhHH")
_NUMERIC_SPECIAL = {0xC000: Decimal("NaN"), 0xD000: Decimal("Infinity"), 0xF000: Decimal("-Infinity")}


def _b_numeric(b: bytes) -> Decimal:
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(b)
    if sign in _NUMERIC_SPECIAL:
        return _NUMERIC_SPECIAL[sign]
    digits = struct.unpack_from(f">{ndigits}h", b, 8)
    # Each digit is base 10000; weight is the power of 10000 of the first digit.
    s = "".join(f"{d:04d}" for d in digits) or "0"
    exp = (weight + 1 - ndigits) * 4
    value = Decimal(f"{'-' if sign == 0x4000 else ''}{s}E{exp}")
    return value.quantize(Decimal(1).scaleb(-dscale)) if dscale or exp < 0 else value


def _b_date(b: bytes) -> date | float:
    (d,) = _b_i32(b)
    if d in _DATE_INFINITY:
        return _DATE_INFINITY[d]
    return _PG_EPOCH_DATE + timedelta(days=d)


def _us_to_time(us: int, tz: timezone | None = None) -> time:
    h, rem = divmod(us, 3_600_000_000)
    m, rem = divmod(rem, 60_000_000)
    s, frac = divmod(rem, 1_000_000)
    return time(h % 24, m, s, frac, tzinfo=tz)  # 24:00:00 is valid in PostgreSQL, not in Python


def _b_time(b: bytes) -> time:
    return _us_to_time(_b_i64(b)[0])


def _b_timetz(b: bytes) -> time:
    us, zone = struct.unpack(">qi", b)
    return _us_to_time(us, timezone(timedelta(seconds=-zone)))  # zone is seconds west of UTC


def _b_timestamp(b: bytes) -> datetime | float:
    (us,) = _b_i64(b)
    if us in _TIMESTAMP_INFINITY:
        return _TIMESTAMP_INFINITY[us]
    return _PG_EPOCH_NAIVE + timedelta(microseconds=us)


def _b_timestamptz(b: bytes) -> datetime | float:
    (us,) = _b_i64(b)
    if us in _TIMESTAMP_INFINITY:
        return _TIMESTAMP_INFINITY[us]
    return pg_epoch_to_datetime(us)


def _b_interval(b: bytes) -> Interval:
    us, days, months = struct.unpack(">qii", b)
    return Interval(months, days, us)


def _b_jsonb(b: bytes) -> Any:
    if b[:1] != b"\x01":
        raise ValueError(f"unknown jsonb binary version {b[:1]!r}")
    return json.loads(b[1:])


_ARRAY_HEAD = struct.Struct(">iiI")


def parse_binary_array(b: bytes, elem: Callable[[bytes], Any]) -> list[Any]:
    ndim, _has_null, _elem_oid = _ARRAY_HEAD.unpack_from(b)
    if ndim == 0:
        return []
    dims = [struct.unpack_from(">ii", b, 12 + 8 * i)[0] for i in range(ndim)]
    pos = 12 + 8 * ndim
    flat: list[Any] = []
    for _ in range(math.prod(dims)):
        (ln,) = struct.unpack_from(">i", b, pos)
        pos += 4
        if ln < 0:
            flat.append(None)
        else:
            flat.append(elem(b[pos:pos + ln]))
            pos += ln
    for size in reversed(dims[1:]):
        flat = [flat[i:i + size] for i in range(0, len(flat), size)]
    return flat


def _utf8(b: bytes) -> str:
    return b.decode()


# OID -> (text parser, binary parser)
_SCALARS: dict[int, tuple[Callable[[str], Any], Callable[[bytes], Any]]] = {
    16: (_t_bool, lambda b: b == b"\x01"),
    17: (_t_bytea, bytes),
    18: (str, _utf8), 19: (str, _utf8), 25: (str, _utf8), 1042: (str, _utf8), 1043: (str, _utf8),
    20: (int, lambda b: _b_i64(b)[0]),
    21: (int, lambda b: _b_i16(b)[0]),
    23: (int, lambda b: _b_i32(b)[0]),
    26: (int, lambda b: _b_u32(b)[0]),
    700: (_t_float, lambda b: _b_f32(b)[0]),
    701: (_t_float, lambda b: _b_f64(b)[0]),
    1700: (_t_numeric, _b_numeric),
    1082: (_t_date, _b_date),
    1083: (_t_time, _b_time),
    1266: (_t_timetz, _b_timetz),
    1114: (_t_timestamp, _b_timestamp),
    1184: (_t_timestamptz, _b_timestamptz),
    1186: (_t_interval, _b_interval),
    2950: (_t_uuid, lambda b: UUID(bytes=b)),
    114: (_t_json, lambda b: json.loads(b)),
    3802: (_t_json, _b_jsonb),
}

# array OID -> element OID
ARRAY_ELEMENTS: dict[int, int] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1007: 23, 1016: 20, 1009: 25, 1014: 1042, 1015: 1043,
    1028: 26, 1021: 700, 1022: 701, 1231: 1700, 1182: 1082, 1183: 1083, 1270: 1266, 1115: 1114,
    1185: 1184, 1187: 1186, 2951: 2950, 199: 114, 3807: 3802,
}


def convert(value: object, type_oid: int) -> Any:
    """One column value as decoded (str = text format, bytes = binary format, None, UNCHANGED)
    -> a Python value. UNCHANGED and None pass through. Raises DecodeError naming the type OID
    if a value of a known type does not parse."""
    if value is None or value is UNCHANGED:
        return value
    try:
        if isinstance(value, str):
            elem_oid = ARRAY_ELEMENTS.get(type_oid)
            if elem_oid is not None:
                parser = _SCALARS[elem_oid][0]
                return parse_text_array(value, parser)
            pair = _SCALARS.get(type_oid)
            return pair[0](value) if pair else value
        if isinstance(value, bytes | bytearray | memoryview):
            b = bytes(value)
            elem_oid = ARRAY_ELEMENTS.get(type_oid)
            if elem_oid is not None:
                return parse_binary_array(b, _SCALARS[elem_oid][1])
            pair = _SCALARS.get(type_oid)
            return pair[1](b) if pair else b
    except (ValueError, IndexError, struct.error, KeyError) as exc:
        raise DecodeError(f"cannot convert value of type OID {type_oid}: {exc}") from None
    raise TypeError(f"not a decoded column value: {type(value).__name__}")
