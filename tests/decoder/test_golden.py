"""Golden tests: byte streams captured from real PostgreSQL 15 and 18 servers (see
golden/capture.py), decoded and checked field by field against the SQL in golden/scenarios.py."""

from __future__ import annotations

import functools
import gzip
import json
import math
import struct
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import pytest

from decoder import (
    UNCHANGED,
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Keepalive,
    LogicalMessage,
    Lsn,
    Origin,
    PgOutputDecoder,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    XLogData,
    decode_copy_data,
)
from decoder.values import Interval, convert

DATA = Path(__file__).parent / "golden" / "data"
CAPTURES = sorted(p.name[: -len(".bin.gz")] for p in DATA.glob("*.bin.gz"))


class Capture:
    def __init__(self, name: str) -> None:
        self.name = name
        self.meta = json.loads((DATA / f"{name}.json").read_text())
        raw = gzip.decompress((DATA / f"{name}.bin.gz").read_bytes())
        self.frames: list[bytes] = []
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack_from(">I", raw, pos)
            self.frames.append(raw[pos + 4:pos + 4 + n])
            pos += 4 + n
        self.envelopes = [decode_copy_data(f) for f in self.frames]
        dec = PgOutputDecoder()
        self.wal = [e for e in self.envelopes if isinstance(e, XLogData)]
        self.messages = [dec.decode(e.data) for e in self.wal]
        assert not dec.in_stream, "capture ends inside a streamed block"
        self.relations = {m.oid: m for m in self.messages if isinstance(m, Relation)}

    @property
    def proto(self) -> int:
        return int(self.meta["options"]["proto_version"])

    @property
    def binary(self) -> bool:
        return self.meta["options"].get("binary") == "true"

    def of(self, cls: type) -> list:
        return [m for m in self.messages if type(m) is cls]

    def rel(self, oid: int) -> Relation:
        return self.relations[oid]

    def changes(self, table: str) -> list:
        return [m for m in self.messages if isinstance(m, Insert | Update | Delete)
                and self.rel(m.relation_oid).name == table]

    def row(self, relation_oid: int, values: tuple) -> dict:
        rel = self.rel(relation_oid)
        return {c.name: convert(v, c.type_oid) for c, v in zip(rel.columns, values, strict=True)}


@functools.cache
def load(name: str) -> Capture:
    """Each capture is read and decoded once per session, whatever number of tests check it."""
    return Capture(name)


@pytest.fixture(scope="module", params=CAPTURES)
def cap(request) -> Capture:
    return load(request.param)


def captures_of(scenario: str) -> list[str]:
    return [c for c in CAPTURES if f"-{scenario}-" in c]


def test_captures_cover_both_servers_and_every_protocol_version():
    assert {c.split("-")[0] for c in CAPTURES} == {"pg15", "pg18"}
    assert {c for c in CAPTURES if c.startswith("pg15-basic-")} >= {f"pg15-basic-p{p}-{m}" for p in (1, 2, 3)
                                                                      for m in ("text", "binary")}
    assert {c for c in CAPTURES if c.startswith("pg18-basic-")} >= {f"pg18-basic-p{p}-{m}" for p in (1, 2, 3, 4)
                                                                      for m in ("text", "binary")}


def test_envelope_and_transaction_framing(cap: Capture):
    until = Lsn.parse(cap.meta["until"])
    assert any(isinstance(e, Keepalive) for e in cap.envelopes)
    last_keepalive = [e for e in cap.envelopes if isinstance(e, Keepalive)][-1]
    assert last_keepalive.wal_end >= until
    for e in cap.wal:
        assert e.wal_end >= e.wal_start or e.wal_start == 0
    # The capture ends with the marker message the capture script emitted at `until`.
    end = cap.messages[-1]
    assert isinstance(end, LogicalMessage) and end.prefix == "capture-end" and end.lsn == until
    assert not end.transactional
    # Begin/Commit pair up with matching LSNs and the commit's end LSN is after its commit LSN.
    open_begin = None
    for m in cap.messages:
        if isinstance(m, Begin):
            assert open_begin is None
            open_begin = m
        elif isinstance(m, Commit):
            assert open_begin is not None
            assert m.commit_lsn == open_begin.final_lsn and m.end_lsn > m.commit_lsn
            assert m.commit_time == open_begin.commit_time and m.flags == 0
            open_begin = None
    assert open_begin is None
    # Commit times are real: within a day of the capture's keepalive clock.
    for m in cap.of(Commit):
        assert abs(m.commit_time - last_keepalive.send_time) < 86_400_000_000


EXPECTED_ROW1 = {
    "id": 1, "i2": 1, "i4": 2, "i8": 3, "num": Decimal("12345.67800"), "num_nan": Decimal("1.5"),
    "f4": 1.25, "f8": 2.5, "b": True, "t": "hello", "vc": "vc", "ch": "abc", "by": b"\x00\x01\xff",
    "d": date(2024, 2, 29), "tm": time(13, 14, 15, 123456),
    "tmtz": time(13, 14, 15, tzinfo=timezone(timedelta(hours=2))),
    "ts": datetime(2024, 2, 29, 13, 14, 15, 500000),
    "tstz": datetime(2024, 2, 29, 13, 14, 15, 500000, tzinfo=UTC),
    "iv": Interval(14, 3, ((4 * 60 + 5) * 60 + 6) * 1_000_000 + 700_000),
    "u": UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), "j": {"a": [1, 2]}, "jb": {"b": None},
    "ai": [1, None, 3], "at": ["x", 'a "q" b', None, "NULL", "", ","], "a2": [[1, 2], [3, 4]],
}
EXPECTED_ROW2 = {
    "id": 2, "i2": -32768, "i4": -(2**31), "i8": -(2**63), "num": Decimal("-99999.99999"),
    "f8": -math.inf, "b": False, "t": "żółw ☃ 𝄞", "vc": "", "ch": "   ", "by": b"",
    "d": math.inf, "tm": time(0, 0), "tmtz": time(0, 0, tzinfo=UTC), "ts": -math.inf,
    "tstz": math.inf, "iv": Interval(0, -1, -1_000_000), "u": UUID(int=0), "j": [], "jb": "s",
    "ai": [], "at": [], "a2": [[None, 2], [3, None]],
}


@pytest.mark.parametrize("name", captures_of("basic"))
def test_basic_types_rows(name):
    cap = load(name)
    inserts = [m for m in cap.changes("types") if isinstance(m, Insert)]
    assert len(inserts) == 3
    r1, r2, r3 = (cap.row(m.relation_oid, m.new) for m in inserts)
    assert {k: r1[k] for k in EXPECTED_ROW1} == EXPECTED_ROW1
    assert {k: r2[k] for k in EXPECTED_ROW2} == EXPECTED_ROW2
    assert r2["num_nan"].is_nan() and math.isnan(r2["f4"])
    # Enum: text in text mode; in binary mode its label bytes (unknown OID -> raw bytes).
    assert r1["m"] == (b"happy" if cap.binary else "happy")
    assert r3 == {"id": 3, **{k: None for k in r3 if k != "id"}}
    # Binary mode sends 'b' for every type with a send function (all of these), text mode 't'.
    kinds = {type(v) for v in inserts[0].new}
    assert kinds == ({bytes} if cap.binary else {str})


@pytest.mark.parametrize("name", captures_of("basic"))
def test_basic_catalog_messages(name):
    cap = load(name)
    types = cap.of(Type)
    assert [(t.namespace, t.name) for t in types] == [("public", "mood")]
    rels = {r.name: r for r in cap.relations.values()}
    assert rels["types"].namespace == "public"
    assert rels["types"].replica_identity == "d"
    assert [c.name for c in rels["types"].columns][:4] == ["id", "i2", "i4", "i8"]
    assert [c.is_key for c in rels["types"].columns].count(True) == 1 and rels["types"].columns[0].is_key
    cols = {c.name: c for c in rels["types"].columns}
    assert cols["num"].type_oid == 1700 and cols["num"].type_modifier == ((20 << 16) | 5) + 4
    assert cols["vc"].type_modifier == 10 + 4 and cols["t"].type_modifier == -1
    assert cols["m"].type_oid == types[0].oid
    assert rels["fullrow"].replica_identity == "f" and all(c.is_key for c in rels["fullrow"].columns)
    assert rels["byindex"].replica_identity == "i"
    assert [c.is_key for c in rels["byindex"].columns] == [True, True, False]


@pytest.mark.parametrize("name", captures_of("basic"))
def test_basic_updates_deletes_toast(name):
    cap = load(name)
    ups = [m for m in cap.changes("types") if isinstance(m, Update)]
    # UPDATE without key change: no old tuple. Key change 3 -> 10: 'K' with the old key.
    assert ups[0].old_kind is None and ups[0].old is None
    assert cap.row(ups[0].relation_oid, ups[0].new)["t"] == "updated"
    assert cap.row(ups[0].relation_oid, ups[0].new)["f8"] == math.inf
    assert ups[1].old_kind == "K"
    old = cap.row(ups[1].relation_oid, ups[1].old)
    assert old["id"] == 3 and all(v is None for k, v in old.items() if k != "id")
    assert cap.row(ups[1].relation_oid, ups[1].new)["id"] == 10
    (dl,) = [m for m in cap.changes("types") if isinstance(m, Delete)]
    assert dl.old_kind == "K" and cap.row(dl.relation_oid, dl.old)["id"] == 2

    ins, up = cap.changes("toasty")
    assert cap.row(ins.relation_oid, ins.new)["big"] == "x" * 10000
    assert up.new[2] is UNCHANGED and up.new[1] in ("n2", b"n2")

    f = cap.changes("fullrow")
    assert [type(m) for m in f] == [Insert, Insert, Insert, Update, Delete]
    assert f[3].old_kind == "O" and cap.row(f[3].relation_oid, f[3].old) == {"a": 1, "b": "dup"}
    assert cap.row(f[3].relation_oid, f[3].new) == {"a": 1, "b": "one"}
    assert f[4].old_kind == "O" and cap.row(f[4].relation_oid, f[4].old) == {"a": 2, "b": None}

    _ins, u, d = cap.changes("byindex")
    assert u.old_kind == "K" and cap.row(u.relation_oid, u.old) == {"a": 1, "b": 2, "c": None}
    assert cap.row(u.relation_oid, u.new) == {"a": 1, "b": 3, "c": "c"}
    assert d.old_kind == "K" and cap.row(d.relation_oid, d.old) == {"a": 1, "b": 3, "c": None}


@pytest.mark.parametrize("name", captures_of("basic"))
def test_basic_truncate_messages_origin(name):
    cap = load(name)
    truncs = cap.of(Truncate)
    names = [sorted(cap.rel(o).name for o in t.relation_oids) for t in truncs]
    assert names == [["child", "parent"], ["child", "parent"], ["ident"]]
    assert [(t.cascade, t.restart_identity) for t in truncs] == [(False, False), (True, False), (False, True)]
    msgs = [m for m in cap.of(LogicalMessage) if m.prefix == "golden"]
    assert [(m.transactional, m.content) for m in msgs] == [(True, b"in txn"), (False, b"\x00\xff")]
    assert all(m.xid is None for m in msgs)
    # The transactional message sits inside its transaction, before the commit.
    idx = cap.messages.index(msgs[0])
    assert isinstance(cap.messages[idx - 1], Begin)
    (origin,) = cap.of(Origin)
    assert origin.name == "golden_origin" and origin.commit_lsn == Lsn.parse("0/AB")
    idx = cap.messages.index(origin)
    assert isinstance(cap.messages[idx - 1], Begin)
    # Rolled-back and empty transactions send nothing: 20 committed transactions with changes.
    parents = [cap.row(m.relation_oid, m.new)["id"] for m in cap.changes("parent") if isinstance(m, Insert)]
    assert parents == [1, 5, 7]


def _replay(cap: Capture) -> dict[int, str]:
    """Apply the stream the way a subscriber must: spool streamed changes per xid, drop aborted
    subtransactions and transactions, apply at commit."""
    table: dict[int, str] = {}
    spool: dict[int, list] = {}
    current_top = None
    in_txn: list = []
    for m in cap.messages:
        if isinstance(m, StreamStart):
            current_top = m.xid
            spool.setdefault(m.xid, [])
        elif isinstance(m, StreamStop):
            current_top = None
        elif isinstance(m, Insert | Update | Delete):
            if current_top is not None:
                assert m.xid is not None
                spool[current_top].append(m)
            else:
                assert m.xid is None
                in_txn.append(m)
        elif isinstance(m, StreamAbort):
            if m.subxid == m.xid:
                spool.pop(m.xid)
            else:
                spool[m.xid] = [c for c in spool[m.xid] if c.xid != m.subxid]
        elif isinstance(m, StreamCommit):
            in_txn = spool.pop(m.xid)
        if isinstance(m, Commit | StreamCommit):
            for c in in_txn:
                row = cap.row(c.relation_oid, c.old if isinstance(c, Delete) else c.new)
                if isinstance(c, Delete):
                    del table[row["id"]]
                else:
                    table[row["id"]] = row["pad"]
            in_txn = []
    return table


@pytest.mark.parametrize("name", captures_of("stream"))
def test_stream_replay_matches_sql(name):
    cap = load(name)
    expected = {i: ("after" if i <= 1000 else "p" * 50) for i in range(1, 2001) if not 1001 <= i <= 1500}
    expected.update({i: "kept" for i in range(20001, 21001)})
    assert _replay(cap) == expected
    starts = cap.of(StreamStart)
    if cap.proto == 1:
        assert not starts
        return
    assert starts and starts[0].first_segment and not all(s.first_segment for s in starts)
    # Every change in a block carries the xid of its top transaction or a subtransaction.
    aborts = cap.of(StreamAbort)
    assert any(a.subxid != a.xid for a in aborts)  # ROLLBACK TO SAVEPOINT
    if name.startswith("pg15"):
        assert any(a.subxid == a.xid for a in aborts)  # the whole transaction rolled back
    parallel = cap.meta["options"].get("streaming") == "parallel"
    for a in aborts:
        assert (a.abort_lsn is not None) == parallel
        if parallel:
            assert a.abort_lsn > 0 and a.abort_time > 0
    commits = cap.of(StreamCommit)
    assert len(commits) == 2 and all(c.end_lsn > c.commit_lsn for c in commits)
    (streamed_msg,) = [m for m in cap.of(LogicalMessage) if m.prefix == "golden"]
    assert streamed_msg.transactional and streamed_msg.content == b"streamed"
    assert streamed_msg.xid == commits[1].xid


@pytest.mark.parametrize("name", captures_of("twophase"))
def test_two_phase(name):
    cap = load(name)
    bp = cap.of(BeginPrepare)
    pr = cap.of(Prepare)
    assert [b.gid for b in bp] == ["gid-commit", "gid-rollback"] == [p.gid for p in pr]
    for b, p in zip(bp, pr, strict=True):
        assert b.xid == p.xid and b.prepare_lsn == p.prepare_lsn and b.end_lsn == p.end_lsn
        assert b.prepare_time == p.prepare_time
    cps = cap.of(CommitPrepared)
    assert [c.gid for c in cps] == ["gid-commit", "gid-stream"]
    assert cps[0].xid == bp[0].xid and cps[0].commit_lsn > pr[0].end_lsn - 1
    (rb,) = cap.of(RollbackPrepared)
    assert rb.gid == "gid-rollback" and rb.xid == bp[1].xid and rb.prepare_end_lsn == pr[1].end_lsn
    assert rb.rollback_end_lsn > rb.prepare_end_lsn and rb.rollback_time >= rb.prepare_time
    (sp,) = cap.of(StreamPrepare)
    assert sp.gid == "gid-stream" and sp.xid == cps[1].xid and sp.end_lsn > sp.prepare_lsn
    streamed = [m for m in cap.messages if isinstance(m, Insert) and m.xid == sp.xid]
    assert len(streamed) == 2001
    vals = {cap.row(m.relation_oid, m.new)["id"] for m in streamed}
    assert vals == set(range(100, 2101))
