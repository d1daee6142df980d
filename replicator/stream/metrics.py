"""Prometheus metrics (`--metrics-port`): read from the running daemon at scrape time.

Nothing is counted twice on the hot path: gauges and counters are read from the stream session
and its sink when Prometheus scrapes; only the batch histograms are observed as batches commit.
The slot's retained WAL comes from a short query on the source, at most every 10 s.
prometheus_client is imported only when the endpoint is served: it took 20-25 ms of the daemon's
140-160 ms of imports, and most runs have no --metrics-port.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from decoder import Delete, Insert, Truncate, Update

if TYPE_CHECKING:
    from ..cli.config import Settings
    from .session import Session

log = logging.getLogger("pgferry.metrics")

PHASES = ("preflight", "schema", "copy", "streaming", "paused", "stopped", "done")
OPS: dict[type, str] = {Insert: "insert", Update: "update", Delete: "delete", Truncate: "truncate"}



@dataclass
class State:
    phase: str = "preflight"
    session: Session | None = None
    settings: Settings | None = None
    throttle: Any = None  # replicator.throttle.Throttle
    direction: str = "forward"  # "reverse": the new server streamed back into the old (a fallback)
    streaming: tuple[str, str] | None = None  # (source DSN, slot) the daemon streams now
    copy: Any = None  # the initial copy's progress as last seen (replicator/sync/progress.py's Progress)


STATE = State()
_histograms: tuple[Any, Any] | None = None  # (rows, seconds) once the endpoint is served


def observe_batch(rows: int, seconds: float) -> None:
    if _histograms is not None:
        _histograms[0].observe(rows)
        _histograms[1].observe(seconds)


class _Slot:
    """The slot's retained WAL and safe_wal_size, queried at most every `every` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.at = 0.0
        self.values: tuple[int, int | None] | None = None
        self.lock = threading.Lock()

    def get(self, settings: Settings) -> tuple[int, int | None] | None:
        with self.lock:
            if time.monotonic() - self.at >= self.every or self.values is None:
                self.at = time.monotonic()
                self.values = self._query(settings)
            return self.values

    @staticmethod
    def _query(settings: Settings) -> tuple[int, int | None] | None:
        from ..source import slot_wal

        source, slot = STATE.streaming or (settings.source, settings.slot)
        found = slot_wal(source, slot, "pgferry-metrics")
        return None if found is None else (found[0] or 0, found[1])


class DaemonCollector:
    """A prometheus_client collector (duck-typed: registering needs only describe and collect)."""

    def __init__(self) -> None:
        self.slot = _Slot()

    def describe(self) -> list[Any]:
        return []  # so that registering does not run collect() (and query the source) before anything runs

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        phase = GaugeMetricFamily("pgferry_phase", "1 for the daemon's current phase", labels=["phase"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if p == STATE.phase else 0.0)
        yield phase
        direction = GaugeMetricFamily("pgferry_direction", "1 for the direction streamed: forward (source to "
                                      "target) or reverse (after a cutover with --fallback)", labels=["direction"])
        for d in ("forward", "reverse"):
            direction.add_metric([d], 1.0 if d == STATE.direction else 0.0)
        yield direction
        yield from _copy_metrics(GaugeMetricFamily)
        session = STATE.session
        sink = session.sink if session is not None else None
        if session is not None and sink is not None:
            applied = int(sink.stored)
            source = max(int(session.cur.wal_end or 0), applied) if session.cur is not None else applied
            yield GaugeMetricFamily("pgferry_applied_lsn", "Source LSN up to which everything is committed on "
                                    "the target (bytes)", value=applied)
            yield GaugeMetricFamily("pgferry_source_lsn", "The source's WAL end as last reported by the "
                                    "walsender (bytes)", value=source)
            yield GaugeMetricFamily("pgferry_lag_bytes", "Source WAL not yet applied", value=source - applied)
            lag = 0.0
            if source > applied and sink.stats.applied_commit_time is not None:
                lag = max(0.0, time.time() - sink.stats.applied_commit_time)
            yield GaugeMetricFamily("pgferry_lag_seconds", "Age of the last applied source commit while behind "
                                    "(0 when caught up)", value=lag)
            rows = CounterMetricFamily("pgferry_rows_applied", "Source row changes applied, per table and "
                                       "operation", labels=["table", "op"])
            for table, counts in list(sink.stats.op_counts.items()):
                for op, n in list(counts.items()):
                    rows.add_metric([table, OPS.get(op, "other")], n)
            yield rows
            conflicts = CounterMetricFamily("pgferry_conflicts", "Conflicts (changes the target disagreed with), "
                                            "per table and kind", labels=["table", "kind"])
            for (table, kind), n in list(sink.stats.conflict_counts.items()):
                conflicts.add_metric([table, kind], n)
            yield conflicts
            ddl = CounterMetricFamily("pgferry_schema_changes", "Schema changes captured on the source, by what "
                                      "became of them (applied, skipped, rejected, not migrated)", labels=["result"])
            for result, n in list(sink.stats.ddl_counts.items()):
                ddl.add_metric([result], n)
            yield ddl
        if STATE.throttle is not None:
            raised = 1.0 if STATE.throttle.wal_danger else 0.0
            yield GaugeMetricFamily("pgferry_wal_guard", "1 while the slot retains more WAL than allowed "
                                    "(max_retained_wal / min_safe_wal)", value=raised)
        if STATE.settings is not None and STATE.settings.source:
            slot = self.slot.get(STATE.settings)
            if slot is not None:
                yield GaugeMetricFamily("pgferry_slot_retained_wal_bytes", "WAL the source keeps for the slot",
                                        value=slot[0])
                if slot[1] is not None:
                    yield GaugeMetricFamily("pgferry_slot_safe_wal_size_bytes", "WAL the source can still write "
                                            "before the slot is in danger (max_slot_wal_keep_size)", value=slot[1])


def _copy_metrics(gauge: Any) -> Iterator[Any]:
    """The initial copy's progress, once it has started (kept at its last figures after it)."""
    p = STATE.copy
    if p is None:
        return
    yield gauge("pgferry_copy_percent", "The initial copy's progress (100 only once every table is copied)",
                value=p.percent)
    yield gauge("pgferry_copy_bytes_done", "The source size of what is copied (finished tables, running ones' "
                "share)", value=p.bytes_done)
    yield gauge("pgferry_copy_bytes_total", "The source size of the tables to copy", value=p.bytes_total)
    yield gauge("pgferry_copy_tables_done", "Tables copied", value=p.tables_done)
    yield gauge("pgferry_copy_tables", "Tables to copy", value=p.tables)
    yield gauge("pgferry_copy_rows", "Rows copied so far", value=p.rows)
    if p.eta_seconds is not None:
        yield gauge("pgferry_copy_eta_seconds", "Seconds the copy still needs at its rate", value=p.eta_seconds)


_started = False


def serve(port: int, settings: Settings, address: str = "0.0.0.0") -> None:
    """Start the HTTP endpoint (a daemon thread) on `address`."""
    global _started, _histograms
    STATE.settings = settings
    if _started:
        return
    from prometheus_client import REGISTRY, Histogram, start_http_server

    from ..errors import UsageError

    try:
        start_http_server(port, addr=address)
    except OSError as exc:  # in use, or an address this machine does not have
        raise UsageError(f"--metrics-address {address} --metrics-port {port}: {exc.strerror or exc}") from None
    _histograms = (
        Histogram("pgferry_batch_rows", "Source row changes per committed target batch",
                  buckets=(1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000)),
        Histogram("pgferry_batch_seconds", "Time to write and commit one target batch",
                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)))
    REGISTRY.register(DaemonCollector())
    _started = True
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
