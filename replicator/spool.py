"""On-disk spool for streamed (in-progress) transactions.

With `streaming` on, the source sends a large transaction in blocks while it is still running
(Stream Start ... Stream Stop, repeated), and only later says Stream Commit or Stream Abort. The
blocks go to one file per top-level xid, as length-prefixed raw pgoutput messages, so memory stays
bounded whatever the transaction size; Stream Commit replays the file in order.

Subtransactions: changes are tagged with the (sub)xid that made them. When a subtransaction
aborts, the file is cut back to where that subxid's first change was written: everything after it
belongs to it or to subtransactions nested in it, which abort with it (the same rule as
PostgreSQL's own apply worker).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sink import failpoints

_LEN = struct.Struct(">I")


class _Txn:
    __slots__ = ("count", "f", "path", "subxacts")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "w+b")  # lives until commit or abort
        self.subxacts: dict[int, int] = {}  # subxid -> file offset of its first message (in order)
        self.count = 0


class Spool:
    def __init__(self, directory: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgferry-spool-", dir=directory))
        self.txns: dict[int, _Txn] = {}

    def append(self, xid: int, subxid: int | None, payload: bytes) -> None:
        """A message of a streamed block of top-level transaction `xid`, made by `subxid`."""
        t = self.txns.get(xid)
        if t is None:
            t = self.txns[xid] = _Txn(self.dir / f"{xid}.spool")
        if subxid is not None and subxid != xid and subxid not in t.subxacts:
            t.subxacts[subxid] = t.f.tell()
        t.f.write(_LEN.pack(len(payload)))
        t.f.write(payload)
        t.count += 1
        if t.count == 1000:
            failpoints.hit("during_spool")

    def abort(self, xid: int, subxid: int) -> None:
        """Stream Abort: the whole transaction (subxid == xid) or one subtransaction."""
        t = self.txns.get(xid)
        if t is None:
            return
        if subxid == xid:
            self._drop(xid)
            return
        offset = t.subxacts.get(subxid)
        if offset is None:
            return  # it wrote nothing we spooled
        t.f.truncate(offset)
        t.f.seek(offset)
        t.subxacts = {s: o for s, o in t.subxacts.items() if o < offset}

    def replay(self, xid: int) -> Iterator[bytes]:
        """Stream Commit: every spooled message in order, then the file is removed."""
        t = self.txns.get(xid)
        if t is None:
            return
        try:
            t.f.flush()
            t.f.seek(0)
            read = t.f.read
            while True:
                head = read(4)
                if not head:
                    break
                (n,) = _LEN.unpack(head)
                yield read(n)
        finally:
            self._drop(xid)

    def discard(self, xid: int) -> None:
        self._drop(xid)

    def _drop(self, xid: int) -> None:
        t = self.txns.pop(xid, None)
        if t is not None:
            t.f.close()
            t.path.unlink(missing_ok=True)

    def stats(self, xid: int) -> tuple[int, int]:
        """(messages, bytes) spooled for `xid`; the count includes messages cut by subtransaction aborts."""
        t = self.txns.get(xid)
        return (0, 0) if t is None else (t.count, t.f.tell())

    def bytes_on_disk(self) -> int:
        return sum(t.f.tell() for t in self.txns.values())

    def reset(self) -> None:
        """Forget every open transaction (after a reconnect the server sends them again)."""
        for xid in list(self.txns):
            self._drop(xid)

    def close(self) -> None:
        self.reset()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.txns)


def default_spool_dir() -> str | None:
    return os.environ.get("PGFERRY_SPOOL_DIR") or None
