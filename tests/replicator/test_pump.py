"""The initial copy's C pump (replicator/sync/_cpump.c) on real servers: several source ranges merged
into one target COPY, binary and text, an empty range, and a failing source."""

from __future__ import annotations

import psycopg2
import pytest

from replicator.sync import libpq
from tests.pgplugin import assert_same_tables

pytestmark = pytest.mark.pg

TABLE = "CREATE TABLE t (id int PRIMARY KEY, v text, b bytea, n numeric)"
COLUMNS = {"t": ["id", "v", "b", "n"]}


def _pump(src, dst, wheres: list[str], binary: bool, chunk: int = 1 << 16, trim: bytes = b"") -> tuple[int, object]:
    pump = libpq.pump()
    if pump is None:
        pytest.skip("the C pump is not built")
    fmt = "(FORMAT binary)" if binary else ""
    sources = [psycopg2.connect(src.dsn) for _ in wheres]
    target = psycopg2.connect(dst.dsn)
    try:
        target.cursor().execute("TRUNCATE t")
        rows, err = pump(tuple(c.pgconn_ptr for c in sources), target.pgconn_ptr,
                         tuple(f"COPY (SELECT * FROM t WHERE {w}) TO STDOUT {fmt}".encode() for w in wheres),
                         f"COPY t FROM STDIN {fmt}".encode(), binary, chunk, trim)
        if err is None:
            target.commit()
        return rows, err
    finally:
        for c in (*sources, target):
            c.close()


@pytest.mark.parametrize("chunk", [1 << 16, 100, 0], ids=["64kB", "100B", "per-row"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_ranges_read_side_by_side_arrive_in_one_copy(pair, binary, chunk):
    """Rows gathered into target messages of up to `chunk` bytes (100: most rows fill one, the big
    ones are larger than a message and go alone), or one message per row."""
    src, dst = pair
    src.execute(TABLE + "; INSERT INTO t SELECT g, 'v' || g || E'\\ttab' || CASE WHEN g % 5000 = 0 THEN "
                "repeat(md5(g::text), 5000) ELSE '' END, decode(md5(g::text), 'hex'), g / 7.0 "
                "FROM generate_series(1, 30000) g")
    dst.execute(TABLE)
    # three ranges, one of them empty (its stream is only a header and a trailer in binary)
    rows, err = _pump(src, dst, ["id <= 10000", "false", "id > 10000"], binary, chunk)
    assert err is None and rows == 30000
    assert_same_tables(src, dst, COLUMNS)


def test_a_chunk_size_out_of_range_is_refused(pair):
    src, dst = pair
    src.execute(TABLE)
    dst.execute(TABLE)
    with pytest.raises(ValueError, match="chunk"):
        _pump(src, dst, ["true"], True, -1)


def test_a_failing_source_leaves_the_target_copy_uncommitted(pair):
    src, dst = pair
    src.execute(TABLE + "; INSERT INTO t SELECT g, 'v', NULL, 1 FROM generate_series(1, 1000) g")
    dst.execute(TABLE)
    _, err = _pump(src, dst, ["id <= 500", "id / 0 = 1"], True)
    assert err is not None and err[0] == "source" and b"division by zero" in err[1], err
    assert dst.execute("SELECT count(*) FROM t") == [(0,)]


def _target_order(dst) -> list[int]:
    return [r[0] for r in dst.execute("SELECT id FROM t ORDER BY ctid")]


def test_a_fast_source_range_waits_its_turn_and_a_slow_one_gets_company(pair):
    """Later ranges start when the ones running are done, so a target that is the slower side gets
    the table in the source's order from one source backend at a time; when the running source
    leaves the pump waiting (here each of its rows takes 2 ms), the next range starts beside it
    and fills the gaps."""
    src, dst = pair
    src.execute(TABLE + "; INSERT INTO t SELECT g, 'v' || g, NULL, g FROM generate_series(1, 20000) g")
    dst.execute(TABLE)
    rows, err = _pump(src, dst, ["id <= 10000", "id > 10000"], True)
    assert err is None and rows == 20000
    assert _target_order(dst) == list(range(1, 20001))  # one range after the other

    slow = "id <= 500 AND pg_sleep(0.002) IS NOT NULL"  # >= 1 s for its 500 rows
    rows, err = _pump(src, dst, [slow, "id > 10000"], True)
    assert err is None and rows == 10500
    order = _target_order(dst)
    assert sorted(order) == [*range(1, 501), *range(10001, 20001)]
    # the second range's rows came in while the first was still sending
    assert order.index(10001) < order.index(500), "the second range waited for the slow first one"


PADDED = "CREATE TABLE t (id int PRIMARY KEY, c5 char(5), v text, c4 char(4), u bpchar, c9 char(9))"
SPACED = ["NULL", "''", "' '", "'ab  '", "' a b'", "'ż  '", "E'a\\t '", "E'\\\\ '"]  # NULL, '', ' ', ...


@pytest.mark.parametrize("chunk", [1 << 16, 0], ids=["64kB", "per-row"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "text"])
def test_char_n_columns_lose_their_padding_on_the_way_and_get_it_back(pair, binary, chunk):
    """The flagged columns (char(n)) are sent without their trailing spaces; the target's input
    pads them back, so every value is stored as on the source, byte for byte. Unflagged columns (a
    text, an unbounded bpchar) keep theirs."""
    src, dst = pair
    values = ", ".join(f"({i}, {a}, {a}, {a}, {a}, {a})" for i, a in enumerate(SPACED))
    src.execute(PADDED + f"; INSERT INTO t VALUES {values}; "
                "INSERT INTO t SELECT g, 'x' || g % 10, 'v  ', NULL, 'u ', '' FROM generate_series(100, 5000) g")
    dst.execute(PADDED)
    rows, err = _pump(src, dst, ["id < 3000", "id >= 3000"], binary, chunk, bytes([0, 1, 0, 1, 0, 1]))
    assert err is None and rows == 4901 + len(SPACED)
    stored = ("SELECT id, bpcharsend(c5), v, bpcharsend(c4), bpcharsend(u), bpcharsend(c9), "
              "octet_length(v), octet_length(u) FROM t ORDER BY id")
    assert dst.execute(stored) == src.execute(stored)
    assert dst.execute("SELECT octet_length(c9), octet_length(u) FROM t WHERE id = 3") == [(9, 4)]


def test_rows_with_another_column_count_than_the_trim_flags_are_refused(pair):
    src, dst = pair
    src.execute(TABLE + "; INSERT INTO t SELECT g, 'v', NULL, 1 FROM generate_series(1, 10) g")
    dst.execute(TABLE)
    for binary in (True, False):
        _, err = _pump(src, dst, ["true"], binary, trim=bytes([0, 1, 0]))
        assert err == ("source", b"a row of the source's COPY does not have the 3 columns asked for"), err
        assert dst.execute("SELECT count(*) FROM t") == [(0,)]
