"""pytest-benchmark micro benches of the decoder (run: pytest bench/ --benchmark-enable)."""

from __future__ import annotations

import pytest

from bench.decode import (
    load_frames,
    load_payloads,
    pgferry_decode_all,
    pgferry_decode_frames,
    pypgoutput_decode_all,
)


@pytest.fixture(scope="module")
def payloads():
    return load_payloads()


def test_pgferry_decode(benchmark, payloads):
    assert benchmark(pgferry_decode_all, payloads) >= 100_000


def test_pgferry_decode_with_envelope(benchmark):
    frames = load_frames()
    assert benchmark(pgferry_decode_frames, frames) >= 100_000


def test_pypgoutput_decode(benchmark, payloads):
    pytest.importorskip("pypgoutput")
    assert benchmark.pedantic(pypgoutput_decode_all, args=(payloads,), rounds=2) >= 100_000
