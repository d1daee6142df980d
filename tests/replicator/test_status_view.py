"""The pieces of `status --watch` that are pure (replicator/cli/status.py): the lag sparkline,
the catch-up ETA, the copy's progress in the view."""

from __future__ import annotations

import re

from rich.console import Console

from replicator.cli.status import Status, TableStatus, _view, catch_up, hold_best, sparkline


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


def _copying(percent: float, orders: float) -> Status:
    st = _status(0, "copy")
    st.tables = [TableStatus("public.events", "copied", 60_000, 100.0, 60_000),
                 TableStatus("public.orders", "copying", 120_000, orders, 200_000)]
    st.copy = {"tables_done": 1, "tables": 2, "rows": 180_000, "bytes_done": 25_900_000, "bytes_total": 34_700_000,
               "percent": percent, "rate": 2_000_000, "eta_seconds": 9.0,
               "running": [{"table": "public.orders", "percent": orders, "rows": 120_000, "rows_estimate": 200_000,
                            "bytes_done": 0, "bytes_total": 0, "eta_seconds": 9.0}]}
    return st


def test_the_watch_view_shows_the_copys_bar_percent_and_eta_per_table():
    console = Console(width=120, record=True, color_system=None)
    console.print(_view(_copying(74.8, 60.0), None, 0.0))
    text = console.export_text()
    assert "copy              ██████████████████████░░░░░░░░ 74.8%  ETA 9 s" in text, text
    assert "25.9 MB of ~34.7 MB, 1/2 tables, 180,000 rows, 2.0 MB/s" in text, text
    assert re.search(r"public\.orders +│ copying +│ 120,000 │ +60\.0% │ 9 s", text), text
    assert re.search(r"public\.events +│ copied +│ +60,000 │ 100\.0% │", text), text


def test_the_watch_keeps_the_best_percent_seen():
    best: dict[str, float] = {}
    hold_best(_copying(74.8, 60.0), best)
    later = _copying(70.0, 55.0)  # e.g. the source's autovacuum has just raised the estimate
    hold_best(later, best)
    assert later.copy["percent"] == 74.8 and later.tables[1].percent == 60.0
    assert later.copy["running"][0]["percent"] == 60.0
