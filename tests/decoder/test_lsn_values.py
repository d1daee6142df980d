from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from decoder import UNCHANGED, DecodeError, Lsn, decode_copy_data, encode_standby_status
from decoder.values import (
    Interval,
    convert,
    datetime_to_pg_epoch,
    parse_text_array,
    pg_epoch_to_datetime,
)


def test_lsn_round_trip_and_server_text_form():
    assert str(Lsn.parse("16/B374D848")) == "16/B374D848"
    assert str(Lsn(0x16B3748)) == "0/16B3748"  # as pg_lsn prints: no zero padding
    assert Lsn("FFFFFFFF/FFFFFFFF") == 2**64 - 1
    assert Lsn.parse("0/10") > Lsn.parse("0/F")
    assert f"{Lsn(255)}" == "0/FF" and repr(Lsn(255)) == "Lsn('0/FF')"
    for bad in ("", "12", "x/1", "1/", "/1", "123456789/0"):
        with pytest.raises(ValueError, match="not an LSN"):
            Lsn.parse(bad)
    with pytest.raises(ValueError):
        Lsn(-1)


def test_envelope_round_trip_of_feedback():
    msg = encode_standby_status(1, 2, 3, 4, True)
    assert msg[:1] == b"r" and len(msg) == 34
    with pytest.raises(DecodeError, match="unknown replication message tag 'r'"):
        decode_copy_data(msg)
    with pytest.raises(DecodeError, match="keepalive"):
        decode_copy_data(b"k" + b"\0" * 16)


@pytest.mark.parametrize(("text", "expected"), [
    ("{}", []),
    ("{1,2,3}", [1, 2, 3]),
    ("{NULL,2}", [None, 2]),
    ("{{1,2},{3,4}}", [[1, 2], [3, 4]]),
    ("[0:1]={5,6}", [5, 6]),
])
def test_text_int_arrays(text, expected):
    assert parse_text_array(text, int) == expected


def test_text_arrays_with_quotes_and_escapes():
    assert parse_text_array(r'{"a\\b","c\"d","NULL",NULL," x "}', str) == ["a\\b", 'c"d', "NULL", None, " x "]
    assert convert('{"{1}",x}', 1009) == ["{1}", "x"]


def test_conversions_text():
    assert convert("NaN", 1700).is_nan()
    assert convert("Infinity", 1700) == Decimal("Infinity")
    assert math.isnan(convert("NaN", 701)) and convert("-Infinity", 700) == -math.inf
    assert convert("2024-01-02 03:04:05.5-07:30", 1184) == datetime(2024, 1, 2, 10, 34, 5, 500000,
                                                                     tzinfo=UTC)
    assert convert("-infinity", 1082) == -math.inf
    assert convert("1 year -2 mons +3 days -04:05:06", 1186) == Interval(10, 3, -(4 * 3600 + 5 * 60 + 6) * 10**6)
    assert convert("\\x41ff", 17) == b"A\xff"
    assert convert("A\\\\\\001", 17) == b"A\\\x01"  # bytea_output = escape
    assert convert("whatever", 999999) == "whatever"  # unknown types fall back to text
    assert convert(None, 23) is None and convert(UNCHANGED, 23) is UNCHANGED
    with pytest.raises(DecodeError, match="type OID 23"):
        convert("x", 23)


def test_conversions_binary_numeric():
    # 12345.678 with dscale 5: digits 1, 2345, 6780 weight 1
    import struct
    b = struct.pack(">hhHH3h", 3, 1, 0, 5, 1, 2345, 6780)
    assert convert(b, 1700) == Decimal("12345.67800")
    assert convert(struct.pack(">hhHH", 0, 0, 0, 0), 1700) == Decimal(0)
    assert convert(struct.pack(">hhHH1h", 1, -1, 0x4000, 4, 5), 1700) == Decimal("-0.0005")
    assert convert(struct.pack(">hhHH1h", 1, 2, 0, 0, 7), 1700) == Decimal("700000000")


def test_pg_epoch():
    dt = pg_epoch_to_datetime(1_000_000)
    assert dt == datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert datetime_to_pg_epoch(dt) == 1_000_000
