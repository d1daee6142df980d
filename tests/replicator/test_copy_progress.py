"""The initial copy's progress (replicator/sync/progress.py, pure) and how it is shown
(progress_view.py): percent never goes backwards, ends at exactly 100%, a running table stays
below its estimate; the JSON log line carries the figures as fields."""

from __future__ import annotations

import json
import logging

from replicator.cli.logs import JsonFormatter
from replicator.sync.progress import CopyModel, Estimate, format_eta, fraction
from replicator.sync.progress_view import LogView, line


def test_a_running_table_counts_its_rows_against_the_estimate_capped_below_it():
    est = Estimate(bytes=1000, rows=100)
    assert fraction(50, 10, est) == 0.5
    assert fraction(150, 10, est) == 0.99  # the estimate was low: not 100% before it has finished
    assert fraction(0, 500, Estimate(1000, None)) == 0.5  # never analyzed: the COPY's bytes, the fallback
    assert fraction(10, 0, Estimate(0, None)) == 0.0


def test_percent_rises_monotonically_and_ends_at_exactly_100():
    m = CopyModel({"a": Estimate(3000, 300), "b": Estimate(1000, None)}, started=0.0)
    seen = []
    p = m.observe(1.0, {"a": (150, 0)})
    seen.append(p.percent)
    assert p.bytes_done == 1500 and p.percent == 37.5 and p.rate == 1500 and p.eta_seconds == 1.7
    assert [t.percent for t in p.running] == [50.0]
    seen.append(m.observe(2.0, {"a": (400, 0)}).percent)  # past its estimate: held at 99%
    assert seen[-1] == round(100 * 0.99 * 3000 / 4000, 1)
    seen.append(m.observe(2.5, {}).percent)  # its COPY has ended, not yet counted finished: kept
    m.finish("a", 400)
    seen.append(m.observe(3.0, {"b": (0, 2000)}).percent)  # b over its size: held below 100
    assert seen[-1] <= 99.9
    m.finish("b", 7)
    last = m.observe(4.0, {})
    seen.append(last.percent)
    assert seen == sorted(seen), seen
    assert last.percent == 100.0 and last.finished and last.bytes_done == last.bytes_total == 4000
    assert last.eta_seconds == 0.0 and last.rows == 407


def test_empty_tables_count_by_number_and_100_only_at_the_end():
    m = CopyModel({"a": Estimate(0, 0), "b": Estimate(0, 0)}, started=0.0)
    m.finish("a")
    assert m.observe(1.0, {}).percent == 50.0
    m.finish("b")
    assert m.observe(1.0, {}).percent == 100.0


def test_eta_formats():
    assert format_eta(None) == "?"
    assert format_eta(7.4) == "7 s"
    assert format_eta(125) == "2:05"
    assert format_eta(3723) == "1:02:03"


def test_a_progress_log_line_is_text_with_fields_in_json(caplog):
    m = CopyModel({"public.big": Estimate(10_000_000, 1000)}, started=0.0)
    p = m.observe(2.0, {"public.big": (250, 0)})
    assert line(p) == ("copy: 0/1 tables, 250 rows, 25.0% of ~10.0 MB, 1.2 MB/s, ETA 6 s; "
                       "copying public.big 25% (ETA 6 s)")
    caplog.set_level(logging.INFO, logger="pgferry.sync")
    view = LogView(5.0)
    view.show(p, 2.0)  # less than 5 s since the copy started: nothing yet
    assert not caplog.records
    view.show(p, 5.5)
    (rec,) = caplog.records
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == line(p) and out["event"] == "copy_progress"
    assert {k: out[k] for k in ("tables_done", "tables", "bytes_done", "bytes_total", "percent", "eta_seconds")} == {
        "tables_done": 0, "tables": 1, "bytes_done": 2_500_000, "bytes_total": 10_000_000, "percent": 25.0,
        "eta_seconds": 6.0}
    assert out["rate"] == 1_250_000 and out["running"][0]["table"] == "public.big"
