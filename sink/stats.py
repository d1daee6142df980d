"""What the sink has done, for the stream loop's pacing and the metrics endpoint (which reads it
from another thread: plain counters and dicts, each update a single assignment, read as
snapshots). One object per daemon, handed to each session's sink, so counts go on across
reconnects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SinkStats:
    rows_applied: int = 0  # source row changes applied (in batches committed or being written)
    missing_rows: int = 0  # updates and deletes whose row the target did not have
    # source changes received per table and message type (the C fold increments these dicts too:
    # TargetTable.counts is one of them)
    op_counts: dict[str, dict[type, int]] = field(default_factory=dict)
    conflict_counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (table, kind) -> count
    ddl_counts: dict[str, int] = field(default_factory=dict)  # schema changes: applied, skipped, rejected
    applied_commit_time: float | None = None  # unix time of the last applied source commit
    on_batch: Callable[[int, float], None] | None = None  # (row changes, seconds) of each committed batch
