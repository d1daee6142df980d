"""The pieces of `status --watch` that are pure (replicator/cli/status.py): the lag sparkline and
the catch-up ETA."""

from __future__ import annotations

from replicator.cli.status import Status, catch_up, sparkline


def _status(lag: int | None, phase: str = "streaming") -> Status:
    return Status(phase=phase, applied_lsn="0/0", source_lsn="0/0", lag_bytes=lag, lag_seconds=0.0, rows_applied=0,
                  conflicts=0, daemon_running=True, slot="pgferry", slot_wal_status="reserved",
                  slot_retained_wal_bytes=0, slot_safe_wal_size=None, last_source_commit=None, cutover=None, tables=[])


def test_sparkline_shows_the_trend_scaled_to_its_maximum():
    assert sparkline([0, 0, 0]) == "▁▁▁"
    line = sparkline([0, 10, 20, 40, 80, 160])
    assert len(line) == 6 and line[0] == "▁" and line[-1] == "█"
    assert list(line) == sorted(line)  # rising values, rising bars
    assert sparkline([]) == ""


def test_catch_up_eta_is_the_lag_over_the_rate_it_shrinks_at():
    prev = (10.0, _status(100_000_000))
    assert catch_up(_status(80_000_000), prev, 12.0) == "8 s at 10.0 MB/s"  # 20 MB in 2 s, 80 MB left
    assert catch_up(_status(120_000_000), prev, 12.0) == "not shrinking"
    assert catch_up(_status(0), prev, 12.0) == "caught up"
    assert catch_up(_status(5), None, 12.0) is None  # the first refresh has no rate yet
