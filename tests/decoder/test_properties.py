"""Property tests: whatever the bytes, the decoder returns a message or raises DecodeError."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from decoder import DecodeError, PgOutputDecoder, StreamAbort, decode_copy_data, decode_message
from decoder.messages import XLogData
from tests.decoder.test_golden import CAPTURES, load

TAGS = b"BCORYIUDTMSEcAbPKrpwkxZ\x00\xff"

# One real message of every kind (with its in_stream flag), from the captures.
SAMPLES: dict[str, tuple[bytes, bool]] = {}
for _name in CAPTURES:
    _dec = PgOutputDecoder()
    for _env in load(_name).wal:
        _flag = _dec.in_stream
        _msg = _dec.decode(_env.data)
        _key = f"{type(_msg).__name__}-{_flag}-{len(_env.data) > 9}"
        SAMPLES.setdefault(_key, (_env.data, _flag))
SAMPLE_LIST = sorted(SAMPLES.values())


def _decode_or_error(data: bytes, in_stream: bool) -> None:
    try:
        decode_message(data, in_stream)
    except DecodeError as exc:
        assert str(exc)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_only_raise_decode_error(data: bytes, in_stream: bool):
    _decode_or_error(data, in_stream)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(TAGS), st.binary(max_size=120), st.booleans())
def test_random_bodies_after_every_tag(tag: int, body: bytes, in_stream: bool):
    _decode_or_error(bytes([tag]) + body, in_stream)


def test_every_strict_prefix_of_a_real_message_is_rejected():
    assert len(SAMPLE_LIST) >= 19
    for data, in_stream in SAMPLE_LIST:
        for cut in range(len(data)):
            prefix = data[:cut]
            if data[0] == ord("A") and cut == 9:
                # A protocol-4 abort (25 bytes) cut to 9 is a valid protocol-2 abort.
                assert isinstance(decode_message(prefix, in_stream), StreamAbort)
                continue
            try:
                decode_message(prefix, in_stream)
            except DecodeError as exc:
                assert exc.offset is not None or exc.needed is not None or cut == 0
            else:
                raise AssertionError(f"prefix {cut}/{len(data)} of {data[:1]!r} decoded")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(SAMPLE_LIST), st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_rejected(sample: tuple[bytes, bool], extra: bytes):
    data, in_stream = sample
    if data[0] == ord("A") and len(data) == 9 and len(extra) == 16:
        return  # becomes a valid protocol-4 abort
    try:
        decode_message(data + extra, in_stream)
    except DecodeError:
        return
    raise AssertionError(f"{data[:1]!r} with {len(extra)} extra bytes decoded")


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(SAMPLE_LIST), st.integers(min_value=0, max_value=10_000), st.integers(0, 255))
def test_corrupted_real_messages_only_raise_decode_error(sample: tuple[bytes, bool], where: int, byte: int):
    data, in_stream = sample
    pos = where % len(data)
    _decode_or_error(data[:pos] + bytes([byte]) + data[pos + 1:], in_stream)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_envelope_random_bytes(data: bytes):
    try:
        env = decode_copy_data(data)
    except DecodeError:
        return
    if isinstance(env, XLogData):
        assert env.data == data[25:]


def test_decode_error_names_tag_offset_and_sizes():
    data = b"I" + struct.pack(">IcH", 1, b"N", 1) + b"t" + struct.pack(">I", 10) + b"abc"
    try:
        decode_message(data)
    except DecodeError as exc:
        assert (exc.tag, exc.offset, exc.needed, exc.present) == ("I", 13, 10, 3)
        assert "tag 'I'" in str(exc) and "needed 10 bytes, 3 present" in str(exc)
    else:
        raise AssertionError("decoded")


def test_unknown_tags_and_kinds_are_errors_not_skips():
    for bad in (b"Z", b"\x00", b"I" + struct.pack(">IcH", 1, b"N", 1) + b"x"):
        try:
            decode_message(bad)
        except DecodeError as exc:
            assert "unknown" in str(exc)
        else:
            raise AssertionError(bad)


def test_stream_state_errors():
    dec = PgOutputDecoder()
    try:
        dec.decode(b"E")
    except DecodeError as exc:
        assert "outside" in str(exc)
    dec.decode(b"S" + struct.pack(">IB", 7, 1))
    assert dec.in_stream and dec.stream_xid == 7
    try:
        dec.decode(b"S" + struct.pack(">IB", 8, 0))
    except DecodeError as exc:
        assert "inside" in str(exc)
