"""On-disk spool for streamed (in-progress) transactions.

With `streaming` on, the source sends a large transaction in blocks while it is still running
(Stream Start ... Stream Stop, repeated), and only later says Stream Commit or Stream Abort. The
blocks go to one file per top-level xid, as length-prefixed raw pgoutput messages, so memory stays
bounded whatever the transaction size; Stream Commit replays the file in order.

Subtransactions: changes are tagged with the (sub)xid that made them. When a subtransaction
aborts, the file is cut back to where that subxid's first change was written: everything after it
belongs to it or to subtransactions nested in it, which abort with it (the same rule as
PostgreSQL's own apply worker).

Each process spools into a directory of its own, `pgferry-spool-<host>-<pid>-<random>` in the
spool dir (default: the temp dir), removed when it exits. A process that was killed cannot remove
its own, so every start removes the directories of its host's pgferry processes that are gone
(their transactions are sent again by the source: what they spooled is of no use). Directories of
live processes, of other hosts sharing the spool dir, and of unknown names are left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sink import failpoints

_LEN = struct.Struct(">I")
log = logging.getLogger(__name__)
PREFIX = "pgferry-spool-"
_MINE: set[Path] = set()  # the spool directories this process made and still uses


class _Txn:
    __slots__ = ("count", "f", "path", "subxacts")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "w+b")  # lives until commit or abort
        self.subxacts: dict[int, int] = {}  # subxid -> file offset of its first message (in order)
        self.count = 0


class Spool:
    def __init__(self, directory: str | None = None) -> None:
        base = Path(directory or tempfile.gettempdir())
        remove_orphans(base)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_host_prefix()}{os.getpid()}-", dir=base))
        _MINE.add(self.dir)
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

    def reset(self) -> None:
        """Forget every open transaction (after a reconnect the server sends them again)."""
        for xid in list(self.txns):
            self._drop(xid)

    def close(self) -> None:
        self.reset()
        shutil.rmtree(self.dir, ignore_errors=True)
        _MINE.discard(self.dir)

    def __len__(self) -> int:
        return len(self.txns)


def _host_prefix() -> str:
    return f"{PREFIX}{socket.gethostname().replace('/', '_')}-"


def remove_orphans(base: Path) -> list[Path]:
    """Remove the spool directories in `base` of this host's pgferry processes that are gone."""
    prefix = _host_prefix()
    removed: list[Path] = []
    try:
        candidates = [d for d in base.iterdir() if d.name.startswith(prefix) and d.is_dir()]
    except OSError:
        return removed  # a missing spool dir: mkdtemp reports it
    for d in candidates:
        pid = d.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or d in _MINE or _alive(int(pid)):
            continue
        try:
            size = sum(f.stat().st_size for f in d.glob("*.spool"))
        except OSError:  # another pgferry starting at the same moment is removing it
            size = 0
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
            log.info("removed %s, left by pgferry process %s which is gone (%d bytes of in-progress "
                     "transactions the source sends again)", d, pid, size)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` exists, other than this one (a directory with this process's pid that
    it did not make is an earlier process's: in a container pgferry is often pid 1 at every start)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True
