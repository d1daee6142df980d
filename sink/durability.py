"""Durability tracking: which stored progress is flushed to the target's WAL.

Batches commit asynchronously (synchronous_commit = off on pgferry's sessions): a commit returns
before its WAL is on disk. After each commit the target's current WAL insert position is noted
with the progress it recorded; once the target's flush position passes it, that progress is
durable, and only durable progress is confirmed to the source (`flush_lsn`), so a target crash
loses nothing the source has let go of."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from decoder import Lsn

POLL_EVERY = 0.02  # seconds between flush-position reads (the WAL writer flushes every wal_writer_delay)


class Durability:
    def __init__(self, cur: Any, end_read: Callable[[], None]) -> None:
        """`cur`: the target cursor; `end_read`: ends the read's implicit transaction where the
        caller allows it (never inside an open batch)."""
        self.cur = cur
        self.end_read = end_read
        self.durable_lsn = Lsn(0)  # progress whose commit is flushed on the target
        self._pending: deque[tuple[Lsn, Lsn]] = deque()  # (target WAL position, source progress)
        self._last_poll = 0.0

    def committed(self, progress: Lsn) -> None:
        """A commit recording `progress` returned."""
        # Any position at or after our commit record will do: the current insert position is one.
        insert, flushed = self._positions("pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text")
        self._pending.append((Lsn.parse(insert), progress))
        self._release(Lsn.parse(flushed))

    def poll(self) -> Lsn:
        """Re-read the flush position (at most every POLL_EVERY) for what is still pending."""
        now = time.monotonic()
        if self._pending and now - self._last_poll >= POLL_EVERY:
            self._last_poll = now
            (flushed,) = self._positions("pg_current_wal_flush_lsn()::text")
            self._release(Lsn.parse(flushed))
        return self.durable_lsn

    def _positions(self, select: str) -> tuple[str, ...]:
        self.cur.execute(f"SELECT {select}")
        row = self.cur.fetchone()
        self.end_read()
        return row

    def _release(self, flushed: Lsn) -> None:
        while self._pending and self._pending[0][0] <= flushed:
            _, progress = self._pending.popleft()
            if progress > self.durable_lsn:
                self.durable_lsn = progress
