"""The optional C parser (decoder/_cdecode.c) must agree with the pure-Python parser on every
input: same message where both decode, and None (defer to Python) where Python raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder import DecodeError, PgOutputDecoder, pgoutput
from tests.decoder.test_golden import CAPTURES, load
from tests.decoder.test_properties import SAMPLE_LIST

cdecode = pytest.importorskip("decoder._cdecode", reason="C accelerator not built (no compiler)")
HOT = set(b"BCIUD")


def _agree(data: bytes, in_stream: bool) -> None:
    fast = cdecode.decode(data, in_stream)
    try:
        slow = pgoutput.decode_message_py(data, in_stream)
    except DecodeError:
        assert fast is None, f"C decoded what Python rejects: {data!r}"
        return
    if fast is not None:
        assert fast == slow
        for f in fast.__struct_fields__:
            assert type(getattr(fast, f)) is type(getattr(slow, f)), f
    elif data[:1] and data[0] in HOT:
        raise AssertionError(f"C deferred a valid {chr(data[0])} message: {data!r}")


def test_in_use_unless_disabled():
    assert pgoutput.ACCELERATED


@pytest.mark.parametrize("name", CAPTURES)
def test_every_captured_message_agrees(name):
    dec = PgOutputDecoder()
    for env in load(name).wal:
        _agree(env.data, dec.in_stream)
        dec.decode(env.data)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(b"BCIUD"), st.binary(max_size=80), st.booleans())
def test_random_bodies_agree(tag: int, body: bytes, in_stream: bool):
    _agree(bytes([tag]) + body, in_stream)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(SAMPLE_LIST), st.integers(min_value=0, max_value=10_000), st.integers(0, 255),
       st.integers(-3, 3))
def test_corrupted_and_resized_real_messages_agree(sample: tuple[bytes, bool], where: int, byte: int, cut: int):
    data, in_stream = sample
    pos = where % len(data)
    data = data[:pos] + bytes([byte]) + data[pos + 1:]
    data = data[:cut] if cut < 0 else data + bytes(cut)
    _agree(data, in_stream)


def test_non_bytes_and_other_tags_defer():
    assert cdecode.decode(bytearray(b"B" + bytes(20)), False) is None
    assert cdecode.decode(b"", False) is None
    assert cdecode.decode(b"R\x00", False) is None


def test_the_c_parser_is_tried_once_per_message(monkeypatch):
    """A message the C parser declines (a Relation, say) is parsed once more, in Python: not
    handed to the C parser a second and third time on the way."""
    calls = []
    real = pgoutput._accelerated

    def counting(buf: bytes, in_stream: bool):
        calls.append(buf[:1])
        return real(buf, in_stream)

    monkeypatch.setattr(pgoutput, "_accelerated", counting)
    dec = PgOutputDecoder()
    seen = 0
    for env in load(CAPTURES[0]).wal:
        calls.clear()
        dec.decode(env.data)
        assert len(calls) == 1, (env.data[:1], calls)
        seen += 1
    assert seen
