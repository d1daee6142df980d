"""Decoder throughput, side by side with pypgoutput on the same captured bytes.

    python -m bench.decode          # prints messages/s, MB/s and the ratio
    pytest bench/ --benchmark-enable   # the same as pytest-benchmark micro benches

The stream (bench/data/stream-pg18.bin.gz, from bench/capture_stream.py) holds >100,000 changes
(inserts, updates, deletes of three tables) from a real PostgreSQL 18 server in text mode.
Both decoders get exactly the messages pypgoutput understands (Begin, Commit, Relation, Insert,
Update, Delete, Truncate), and the runs alternate so machine noise hits both alike.
"""

from __future__ import annotations

import gzip
import struct
import time
from collections.abc import Callable
from pathlib import Path

from decoder import PgOutputDecoder, XLogData, decode_copy_data
from decoder.pgoutput import ACCELERATED, decode_message_py

DATA = Path(__file__).parent / "data" / "stream-pg18.bin.gz"


def load_frames() -> list[bytes]:
    raw = gzip.decompress(DATA.read_bytes())
    frames, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from(">I", raw, pos)
        frames.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames


def load_payloads() -> list[bytes]:
    """pgoutput messages of the kinds pypgoutput decodes."""
    out = []
    for f in load_frames():
        env = decode_copy_data(f)
        if isinstance(env, XLogData) and env.data[:1] in (b"B", b"C", b"R", b"I", b"U", b"D", b"T"):
            out.append(env.data)
    return out


def pgferry_decode_all(payloads: list[bytes]) -> int:
    decode = PgOutputDecoder().decode
    for p in payloads:
        decode(p)
    return len(payloads)


def pgferry_pure_python_decode_all(payloads: list[bytes]) -> int:
    """The fallback parser alone (what runs when the C accelerator is not built)."""
    for p in payloads:
        decode_message_py(p)
    return len(payloads)


def pgferry_decode_frames(frames: list[bytes]) -> int:
    """The whole path from CopyData: envelope, then message."""
    decode = PgOutputDecoder().decode
    n = 0
    for f in frames:
        env = decode_copy_data(f)
        if type(env) is XLogData:
            decode(env.data)
            n += 1
    return n


def pypgoutput_decode_all(payloads: list[bytes]) -> int:
    import pypgoutput.decoders as d

    classes = {b"B": d.Begin, b"C": d.Commit, b"R": d.Relation, b"I": d.Insert, b"U": d.Update,
               b"D": d.Delete, b"T": d.Truncate}
    for p in payloads:
        classes[p[:1]](p)
    return len(payloads)


def _best(fn: Callable[[], int], rounds: list[float]) -> None:
    t = time.perf_counter()
    fn()
    rounds.append(time.perf_counter() - t)


def main(repeats: int = 5) -> None:
    payloads = load_payloads()
    frames = load_frames()
    nbytes = sum(map(len, payloads))
    ours: list[float] = []
    full: list[float] = []
    theirs: list[float] = []
    pure: list[float] = []
    for _ in range(repeats):
        _best(lambda: pgferry_decode_all(payloads), ours)
        _best(lambda: pgferry_pure_python_decode_all(payloads), pure)
        _best(lambda: pypgoutput_decode_all(payloads), theirs)
        _best(lambda: pgferry_decode_frames(frames), full)
    n = len(payloads)
    kinds = sorted({p[:1].decode() for p in payloads})
    print(f"stream: {n:,} messages ({', '.join(kinds)}), {nbytes / 1e6:.1f} MB; best of {repeats} alternating runs")
    label = "pgferry (C)" if ACCELERATED else "pgferry (no C)"
    for name, t in ((label, min(ours)), ("pgferry pure Py", min(pure)), ("pypgoutput 0.0.3", min(theirs))):
        print(f"  {name:<18} {t:7.3f} s  {n / t:>12,.0f} msg/s  {nbytes / t / 1e6:8.1f} MB/s")
    nf = len(frames)
    print(f"  {'pgferry+envelope':<18} {min(full):7.3f} s  {nf / min(full):>12,.0f} frames/s (all {nf:,} CopyData)")
    print(f"ratio pgferry / pypgoutput throughput: {min(theirs) / min(ours):.1f}x"
          f" (pure-Python parser alone: {min(theirs) / min(pure):.1f}x)")


if __name__ == "__main__":
    main()
