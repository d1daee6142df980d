"""Throttling: budgets for applied rows/s and bytes/s, and the source WAL guard.

The stream loop reads a burst of messages, then asks `Throttle.pace` how long to wait so that
rows and bytes stay within their budgets (token buckets holding one second of budget, so short
bursts pass and the long-run rate is the budget). Waiting means not reading: the walsender
buffers and, past its socket buffer, simply waits; nothing is lost.

The WAL guard watches the slot on the source: when it retains more WAL than `max_retained_wal`
or `safe_wal_size` falls under `min_safe_wal`, pgferry warns (logs, status, metrics) and, with
`lift_throttle_on_wal_danger`, stops throttling until the slot is out of danger, so the source's
disk does not fill because of a throttle.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("pgferry.throttle")


class TokenBucket:
    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.tokens = rate or 0.0
        self.at = time.monotonic()

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self.tokens = min(self.tokens, rate or 0.0)

    def take(self, n: float) -> float:
        """Spend n; the seconds to wait before going on (0 when within budget)."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass
class Budgets:
    rows_per_second: float | None = None
    bytes_per_second: float | None = None
    max_retained_wal: int | None = None  # bytes the slot may retain before the guard warns
    min_safe_wal: int | None = None  # safe_wal_size under which the guard warns
    lift_throttle_on_wal_danger: bool = True


class Throttle:
    def __init__(self, budgets: Budgets) -> None:
        self.rows = TokenBucket(budgets.rows_per_second)
        self.bytes = TokenBucket(budgets.bytes_per_second)
        self.budgets = budgets
        self.wal_danger: str | None = None  # why the guard is raised, or None
        self.lock = threading.Lock()

    def update(self, budgets: Budgets) -> None:
        with self.lock:
            if (budgets.rows_per_second, budgets.bytes_per_second) != (self.budgets.rows_per_second,
                                                                        self.budgets.bytes_per_second):
                log.info("throttle: %s rows/s, %s bytes/s", budgets.rows_per_second or "unlimited",
                         budgets.bytes_per_second or "unlimited")
            self.budgets = budgets
            self.rows.set_rate(budgets.rows_per_second)
            self.bytes.set_rate(budgets.bytes_per_second)

    def pace(self, rows: int, nbytes: int) -> float:
        """Seconds to wait after applying `rows` changes of `nbytes` bytes."""
        with self.lock:
            if self.wal_danger and self.budgets.lift_throttle_on_wal_danger:
                return 0.0
            return max(self.rows.take(rows), self.bytes.take(nbytes))

    @property
    def active(self) -> bool:
        return bool(self.budgets.rows_per_second or self.budgets.bytes_per_second)

    def check_wal(self, retained: int | None, safe: int | None) -> None:
        """Raise or clear the WAL guard from the slot's retained WAL and safe_wal_size."""
        b = self.budgets
        danger = None
        if b.max_retained_wal and retained is not None and retained > b.max_retained_wal:
            danger = f"the slot retains {retained >> 20} MiB of WAL (limit {b.max_retained_wal >> 20} MiB)"
        elif b.min_safe_wal and safe is not None and safe < b.min_safe_wal:
            danger = f"safe_wal_size is {safe >> 20} MiB (limit {b.min_safe_wal >> 20} MiB)"
        if danger and not self.wal_danger:
            log.warning("WAL guard: %s; %s", danger, "throttling lifted until it recovers"
                        if b.lift_throttle_on_wal_danger and self.active else "catch up before the source disk fills")
        elif self.wal_danger and not danger:
            log.info("WAL guard: the slot is out of danger again")
        self.wal_danger = danger


def wal_guard(dsn: str, slot: str, throttle: Throttle, done: threading.Event, every: float = 10.0) -> None:
    """Poll the slot's retained WAL and safe_wal_size (when a guard limit is set) until `done`."""
    from ..source import slot_wal

    wait = 0.0  # look at once, then every `every` seconds
    while not done.wait(wait):
        wait = every
        b = throttle.budgets
        if not (b.max_retained_wal or b.min_safe_wal):
            continue
        found = slot_wal(dsn, slot, "pgferry-guard")
        if found is not None:
            throttle.check_wal(*found)
