"""Throttling: a rows/s budget holds over several seconds, a new budget takes effect on SIGHUP
without a restart, and the WAL guard warns and lifts the throttle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.pgplugin import ROOT, Daemon, main_pair_only, publish_same_table, wait_for

pytestmark = pytest.mark.pg


def _applied(dst) -> int:
    rows = dst.execute("SELECT rows_applied FROM pgferry.progress")
    return int(rows[0][0]) if rows else 0


def _rate_over(dst, seconds: float) -> tuple[float, int]:
    """Rows applied per second over a window of `seconds` (progress commits per batch)."""
    a, t0 = _applied(dst), time.monotonic()
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    b = _applied(dst)
    return (b - a) / (time.monotonic() - t0), b


def test_rows_budget_holds_and_a_new_budget_applies_on_sighup(pair, daemons, tmp_path):
    src, dst = pair
    main_pair_only(src, dst, "runs on 15 -> 18, the main case")
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cfg = tmp_path / "pgferry.toml"
    cfg.write_text("max_rows_per_second = 2000\n")
    d = Daemon(src, dst, "--config", str(cfg), "--batch-ms", "200")
    daemons.append(d)
    assert d.stop() == 0
    for k in range(40):  # 40,000 rows: 20 s at 2000 rows/s, well under a second unthrottled
        src.execute(f"INSERT INTO t SELECT g, 'x' FROM generate_series({k * 1000 + 1}, {(k + 1) * 1000}) g")
    d.start().wait_ready()
    wait_for(lambda: _applied(dst) > 0, 30, "the first batch")
    rate, done = _rate_over(dst, 4.0)
    assert rate <= 2000 * 1.25 + 500, f"{rate:.0f} rows/s over 4 s with a budget of 2000"
    assert rate >= 2000 * 0.5, f"{rate:.0f} rows/s: the throttle should not starve the stream"
    assert done < 40_000
    cfg.write_text("max_rows_per_second = 20000\n")
    assert d.proc is not None
    pid = d.proc.pid
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in d.output(), 10, "the reload")
    fast, _ = _rate_over(dst, 1.0)
    assert fast >= 2 * 2000 or _applied(dst) == 40_000, f"{fast:.0f} rows/s after raising the budget to 20000"
    d.wait_caught_up(timeout=60)
    assert d.running() and d.proc.pid == pid
    assert dst.execute("SELECT count(*) FROM t") == [(40_000,)]
    out = d.output()
    assert out.count("streaming from") == 2 and "throttle: 20000.0 rows/s" in out, out  # one per start


def test_wal_guard_warns_and_lifts_the_throttle(pair, daemons, tmp_path):
    src, dst = pair
    main_pair_only(src, dst, "runs on 15 -> 18, the main case")
    publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    cfg = tmp_path / "pgferry.toml"
    cfg.write_text("max_rows_per_second = 100\nmax_retained_wal = 1024\n")  # a tiny limit: in danger at once
    d = Daemon(src, dst, "--config", str(cfg))
    daemons.append(d)
    src.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 5000) g")
    wait_for(lambda: "WAL guard: the slot retains" in d.output(), 30, "the WAL guard")
    d.wait_caught_up(timeout=20)  # 5000 rows at 100 rows/s would take 50 s: the throttle is lifted
    assert "throttling lifted" in d.output()
    assert d.stop() == 0
    src.execute("INSERT INTO t SELECT g, 'y' FROM generate_series(5001, 6000) g")  # WAL the stopped slot keeps
    r = subprocess.run([sys.executable, "-m", "replicator.cli", "status", "--json", "--config", str(cfg), "--source",
                        src.dsn, "--target", dst.dsn], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "the slot retains" in json.loads(r.stdout)["wal_guard"], r.stdout + r.stderr
