"""The initial copy's progress: how far, how fast, how long still. Pure: no SQL, no output
(the sampling is in copy.py and cli/status.py, the drawing in progress_view.py).

How far a table's copy is comes from the target's `pg_stat_progress_copy`: the rows its COPY has
written (`tuples_processed`) against the rows the source's statistics expect (`reltuples` scaled
to the table's current size, as the planner does). Rows, not bytes: the COPY's `bytes_processed`
counts the wire format, not the table's size on disk (binary or text, the char(n) padding the
pump leaves out, TOAST compressed on disk and not in the COPY), so bytes against the source's size
ended a pgbench_accounts copy at about a quarter, and a table of compressible text far above 100%.
The row estimate is only off by the rows changed since the table's last VACUUM or ANALYZE. A table
never analyzed has none: for it (only), the COPY's bytes against its size on the source.

The whole copy weighs each table by its size on the source (heap and TOAST: `bytes_total`), so
`bytes_done` is in the same unit: a finished table counts its whole size, a running one its
fraction of it. Estimates can be exceeded, so a running table stays below `RUNNING_CAP` until it
has finished, nothing goes backwards (a COPY that has ended but not yet been counted as finished
keeps the best fraction seen), and the copy shows exactly 100% once every table has finished and
never before. The rate is the average since the copy started; the ETA is what is left at that
rate, or the ETA of the slowest table being copied where that is later (at the end of a copy one
big table often runs alone, slower than the tables did side by side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RUNNING_CAP = 0.99  # the most a table shows before its copy has finished (its estimate may be low)
OVERALL_CAP = 99.9  # the most the whole copy shows before every table has finished (percent)


@dataclass(frozen=True)
class Estimate:
    """A table's expected size: `bytes` on the source (heap and TOAST), `rows` from its statistics
    (None: never analyzed)."""

    bytes: int
    rows: int | None


@dataclass(frozen=True)
class TableProgress:
    name: str
    percent: float
    rows: int
    rows_estimate: int | None
    bytes_done: int
    bytes_total: int
    rate: float | None  # bytes (of bytes_total) per second, since it was first seen running
    eta_seconds: float | None

    def fields(self) -> dict[str, Any]:
        return {"table": self.name, "percent": self.percent, "rows": self.rows, "rows_estimate": self.rows_estimate,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes_total, "eta_seconds": self.eta_seconds}


@dataclass(frozen=True)
class Progress:
    """One look at the whole copy."""

    tables_done: int
    tables: int
    rows: int
    bytes_done: int
    bytes_total: int
    percent: float
    rate: float | None  # bytes per second
    eta_seconds: float | None
    elapsed: float
    running: list[TableProgress] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.tables_done >= self.tables

    def fields(self) -> dict[str, Any]:
        """The structured fields of a JSON log line (and `status --json`'s `copy`)."""
        return {"tables_done": self.tables_done, "tables": self.tables, "rows": self.rows,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes_total, "percent": self.percent,
                "rate": None if self.rate is None else round(self.rate), "eta_seconds": self.eta_seconds,
                "running": [t.fields() for t in self.running]}


def fraction(rows: int, nbytes: int, est: Estimate) -> float:
    """How far a running COPY of `rows` rows and `nbytes` bytes is, against `est` (capped)."""
    if est.rows:
        f = rows / est.rows
    elif est.bytes > 0:
        f = nbytes / est.bytes
    else:
        f = 0.0
    return max(0.0, min(RUNNING_CAP, f))


def eta(left: float, rate: float | None) -> float | None:
    return None if not rate or rate <= 0 else round(left / rate, 1)


def format_eta(seconds: float | None) -> str:
    """`1:02:03`, `4:05`, `7 s`; `?` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class CopyModel:
    """The copy's progress from the estimates and what is seen running. Not thread-safe: the
    caller serializes `finish` and `observe`."""

    def __init__(self, estimates: dict[str, Estimate], started: float) -> None:
        self.estimates = estimates
        self.started = started
        self.total = sum(e.bytes for e in estimates.values())
        self.finished: set[str] = set()
        self.rows_finished = 0
        self.earlier = 0  # bytes of tables finished before `started` (an earlier run): not in the rate
        self._best: dict[str, float] = {}  # table -> the highest fraction seen while it ran
        self._seen: dict[str, float] = {}  # table -> when it started: at the look before it was first seen
        self._last_look = started
        self._done = 0  # bytes_done last reported: it never goes backwards
        self._percent = 0.0

    def finish(self, name: str, rows: int = 0, earlier: bool = False) -> None:
        """`name` has been copied (`earlier`: before `started`)."""
        if name not in self.finished:
            self.finished.add(name)
            self.rows_finished += rows
            self._best.pop(name, None)
            if earlier and name in self.estimates:
                self.earlier += self.estimates[name].bytes

    def observe(self, now: float, running: dict[str, tuple[int, int]]) -> Progress:
        """`running`: table -> (rows, bytes) of its COPYs in progress."""
        tables: list[TableProgress] = []
        done = sum(self.estimates[n].bytes for n in self.finished if n in self.estimates)
        rows = self.rows_finished
        for name, (r, b) in running.items():
            if name in self.finished or name not in self.estimates:
                continue
            self._seen.setdefault(name, self._last_look)
            self._best[name] = max(self._best.get(name, 0.0), fraction(r, b, self.estimates[name]))
            rows += r
        for name, f in self._best.items():  # an ended COPY not finished yet keeps its best
            est = self.estimates[name]
            part = int(est.bytes * f)
            done += part
            if name in running:
                took = now - self._seen[name]
                rate = part / took if took > 0 else None
                tables.append(TableProgress(name, round(100 * f, 1), running[name][0], est.rows, part, est.bytes,
                                            rate, eta(est.bytes - part, rate)))
        complete = len(self.finished) >= len(self.estimates)
        if complete:
            done = self.total
        self._done = done = min(max(self._done, done), self.total)
        if complete:
            percent = 100.0
        elif self.total > 0:
            percent = min(OVERALL_CAP, 100 * done / self.total)
        else:
            percent = min(OVERALL_CAP, 100 * len(self.finished) / max(1, len(self.estimates)))
        self._percent = percent = max(self._percent, round(percent, 1))
        self._last_look = now
        took = now - self.started
        rate = (done - self.earlier) / took if took > 0 and done > self.earlier else None
        left = eta(self.total - done, rate)
        if left is not None:  # the copy does not end before its slowest running table (the tail runs alone)
            left = max([left, *(t.eta_seconds for t in tables if t.eta_seconds is not None)])
        return Progress(len(self.finished), len(self.estimates), rows, done, self.total, percent, rate,
                        0.0 if complete else left, round(took, 1), sorted(tables, key=lambda t: t.name))
