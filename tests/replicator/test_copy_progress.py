"""The initial copy's progress (replicator/sync/progress.py, pure) and how it is shown
(progress_view.py): percent never goes backwards, ends at exactly 100%, a running table stays
below its estimate; the JSON log line carries the figures as fields."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pytest

from replicator.cli.logs import JsonFormatter
from replicator.sync.progress import CopyModel, Estimate, format_eta, fraction
from replicator.sync.progress_view import LogView, line
from tests.pgplugin import ROOT, Daemon, Db, assert_same_tables, main_pair_only, pgferry, require_installed, wait_for
from tests.replicator.test_operability import _free_port, _metrics


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


def test_the_eta_is_no_earlier_than_the_slowest_running_tables():
    m = CopyModel({"a": Estimate(1000, 100), "b": Estimate(1000, 100)}, started=0.0)
    m.finish("a", 100)  # a copied fast: 1000 bytes in the first 2 s...
    p = m.observe(2.0, {"b": (10, 0)})  # ...b only 10% in those 2 s: 18 s to go on its own
    assert p.rate == 550 and p.running[0].eta_seconds == 18.0
    assert p.eta_seconds == 18.0  # not 900 / 550 = 1.6 s


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


def test_the_100_percent_line_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="pgferry.sync")
    m = CopyModel({"a": Estimate(10, 1)}, started=0.0)
    m.finish("a", 1)
    view = LogView(1.0)
    view.show(m.observe(2.0, {}), 2.0)  # a periodic line that happens to come after the last table
    view.close(m.observe(2.1, {}))
    (only,) = caplog.records
    assert only.getMessage() == "copy: 1/1 tables, 1 rows, 100.0% of ~0.0 MB, 0.0 MB/s, ETA 0 s"


# -- on real servers: `pgferry start` copying through a slow link (tests/tcpproxy.py's limit) ------
BIG_ROWS = 150_000  # ~16.5 MB of binary COPY data: ~14 s at RATE
RATE = 1_200_000  # bytes per second between pgferry and the source


def _slow_source(src: Db, tcp_proxy) -> str:
    """A big and a small table on the source, analyzed (their row estimates), and the DSN of a
    proxy in front of it that forwards RATE bytes a second: a steady copy of about 14 s."""
    src.execute("CREATE TABLE big (id int PRIMARY KEY, v text); "
                f"INSERT INTO big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, {BIG_ROWS}) g; "
                "CREATE TABLE small (id int PRIMARY KEY); INSERT INTO small SELECT generate_series(1, 1000); "
                "CREATE PUBLICATION pgferry FOR ALL TABLES")
    src.execute("VACUUM ANALYZE big, small")
    proxy = tcp_proxy(src)
    proxy.limit(RATE)
    return proxy.dsn_for(src.dsn)


def _json_lines(out: str) -> list[dict]:
    lines = []
    for raw in out.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def _ts(line: dict) -> float:
    return dt.datetime.fromisoformat(line["ts"]).timestamp()


@pytest.mark.pg
def test_copy_progress_rises_to_exactly_100_and_its_eta_holds(owner_pair, daemons, tcp_proxy):
    """`pgferry start` with JSON logs (not a terminal): a progress line a second with structured
    fields, percent never going back and ending at exactly 100 once both tables are in; the ETA
    taken mid-copy is within a factor of 2 of the time the copy really took to finish; the metrics
    carry the same figures."""
    src, dst = owner_pair
    main_pair_only(src, dst, "the copy's progress runs on 15 -> 18, the main case")
    source_dsn = _slow_source(src, tcp_proxy)
    port = _free_port()
    d = Daemon(src, dst, "--jobs", "1", "--progress-interval", "1", "--metrics-port", str(port),
               "--metrics-address", "127.0.0.1", source_dsn=source_dsn, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: '"event":"copy_progress"' in d.output() or not d.running(), 60, "a progress line")
    mid = _metrics(port)  # the same figures for Prometheus
    assert 0 < mid["pgferry_copy_percent"] < 100 and mid["pgferry_copy_tables"] == 2, mid
    assert mid["pgferry_copy_eta_seconds"] > 0 and mid["pgferry_copy_bytes_total"] > mid["pgferry_copy_bytes_done"]
    wait_for(lambda: '"msg":"copy: 2 tables' in d.output() or not d.running(), 60, "the copy to finish")
    assert d.running(), d.output()
    end = _metrics(port)
    assert end["pgferry_copy_percent"] == 100 and end["pgferry_copy_tables_done"] == 2, end
    lines = _json_lines(d.output())
    progress = [x for x in lines if x.get("event") == "copy_progress"]
    assert len(progress) >= 5, d.output()
    percents = [x["percent"] for x in progress]
    assert percents == sorted(percents), percents
    assert all(p < 100 for p in percents[:-1]) and percents[-1] == 100.0, percents
    last = progress[-1]
    assert last["tables_done"] == last["tables"] == 2 and last["bytes_done"] == last["bytes_total"] > 0
    assert last["eta_seconds"] == 0.0 and last["rows"] == BIG_ROWS + 1000
    assert [x["bytes_done"] for x in progress] == sorted(x["bytes_done"] for x in progress)
    assert last["msg"].startswith("copy: 2/2 tables, 151000 rows, 100.0% of ~")
    running = [r for x in progress for r in x["running"]]
    assert running and all(r["table"] == "public.big" and r["percent"] < 100 for r in running)
    # the ETA at mid-copy against when the big table's copy really finished
    finished = _ts(next(x for x in lines if x.get("msg", "").startswith("copied public.big")))
    mid = min(progress, key=lambda x: abs(x["percent"] - 50))
    actual = finished - _ts(mid)
    ratio = mid["eta_seconds"] / actual
    middle = [x["eta_seconds"] / (finished - _ts(x)) for x in progress if 25 <= x["percent"] <= 75]
    print(f"ETA at {mid['percent']}%: {mid['eta_seconds']} s; the copy finished {actual:.1f} s later "
          f"(ratio {ratio:.2f}; from 25% to 75%: {min(middle):.2f} to {max(middle):.2f}); {len(progress)} "
          f"progress lines, rate {mid['rate']} B/s")
    assert 0.5 <= ratio <= 2, (mid, actual)
    assert all(0.5 <= r <= 2 for r in middle), middle
    assert_same_tables(src, dst, {"big": ["id", "v"], "small": ["id"]})


def require_tmux() -> str:
    """tmux's path; skip without it, or fail under CI=true (.ci/run installs it)."""
    path = shutil.which("tmux")
    require_installed(path, "tmux is not installed (Debian: apt-get install tmux)")
    assert path is not None
    return path


class Tmux:
    """A tmux server of its own (its own socket), 120x40 windows; killed by its socket at the end."""

    def __init__(self) -> None:
        self.tmux = require_tmux()
        self.socket = f"pgferry-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = ""  # the socket's file, which the server leaves behind when it exits

    def run(self, *args: str) -> str:
        # (the server takes the environment of the command that starts it: the pytest run's
        # COLUMNS and LINES, if set, would fix the size programs in its windows see)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        r = subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True, text=True, timeout=10,
                           check=False, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self, name: str, argv: list[str]) -> int:
        """Run `argv` (exec'd: the pane's process is it) in a new session; its pid."""
        env = ["-e", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}"]
        self.run("new-session", "-d", "-x", "120", "-y", "40", "-s", name, "-c", str(ROOT), *env,
                 "exec " + shlex.join(argv) + " 2>&1 || sleep 600")
        pid, self.path = self.run("display-message", "-p", "-t", name, "#{pane_pid} #{socket_path}").split()
        return int(pid)

    def screen(self, name: str) -> str:
        return self.run("capture-pane", "-p", "-t", name)

    def wait(self, name: str, cond: Callable[[str], object], timeout: float, what: str) -> str:
        """The screen of `name` once `cond(screen)` holds; fails showing the screen on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(name)
            if cond(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}; the screen:\n{screen}")
            time.sleep(0.2)

    def kill(self) -> None:
        """Kill this server (only: by its socket) and remove the socket file it leaves behind."""
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)
        if self.path.endswith(self.socket):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


@pytest.fixture
def tmux():
    t = Tmux()
    yield t
    t.kill()


@pytest.mark.pg
def test_the_terminal_shows_bars_and_status_watch_the_copy(owner_pair, tcp_proxy, tmux):
    """What a person sees: `pgferry start` on a terminal (tmux) draws a bar per table being copied
    and one for the whole copy, with percent, rate and ETA; `pgferry status --watch` shows the copy's
    percent and ETA per table; `status --json` carries the figures while it copies."""
    src, dst = owner_pair
    main_pair_only(src, dst, "the copy's progress runs on 15 -> 18, the main case")
    source_dsn = _slow_source(src, tcp_proxy)
    cli = [sys.executable, "-m", "replicator.cli"]
    pid = tmux.start("copy", [*cli, "start", "--jobs", "1", "--source", source_dsn, "--target", dst.dsn])
    try:
        screen = tmux.wait("copy", lambda s: "public.big" in s and "ETA" in s and "all: 0/2 tables" in s and "%" in s,
                           60, "the copy's bars on the terminal")
        print("pgferry start, copying:\n" + screen.rstrip())
        bar_line = next(x for x in screen.splitlines() if "public.big" in x)
        assert re.search(r"public\.big +█*░+ +\d+\.\d% +[\d,]+ of ~[\d,]+ rows +ETA \d", bar_line), bar_line
        assert re.search(r"all: 0/2 tables +█*░+ +\d+\.\d% .* MB/s +ETA \d", screen), screen
        assert "Traceback" not in screen

        watch = tmux.start("watch", [*cli, "status", "--watch", "1", "--source", src.dsn, "--target", dst.dsn])

        screen = tmux.wait("watch", lambda s: re.search(r"copy +█*░+ \d+\.\d% +ETA \d", s) and "public.big" in s, 30,
                           "status --watch to show the copy")
        print("pgferry status --watch, copying:\n" + screen.rstrip())
        assert re.search(r"public\.big +│ copying +│ +[\d,]+ │ +\d+\.\d% │ +(\d+ s|\d+:\d\d)", screen), screen
        samples = []
        while not samples or (samples[-1]["phase"] == "copy" and samples[-1]["copy"]["percent"] < 100):
            r = pgferry("status", "--json", "--source", src.dsn, "--target", dst.dsn)
            assert r.returncode == 0, r.stderr
            samples.append(json.loads(r.stdout))
            assert len(samples) < 120, samples[-1]
        copies = [s["copy"] for s in samples if s["copy"]]
        assert len(copies) >= 2, samples
        first, last = copies[0], copies[-1]
        assert last["percent"] > first["percent"] and first["bytes_total"] == last["bytes_total"] > 0
        assert first["rate"] > 0 and first["eta_seconds"] > 0 and {"tables_done", "tables", "bytes_done"} <= set(first)
        big = next(t for t in samples[0]["tables"] if t["name"] == "public.big")
        assert big["rows_estimate"] == pytest.approx(BIG_ROWS, rel=0.1) and big["percent"] is not None

        screen = tmux.wait("copy", lambda s: re.search("all: 2/2 tables +█{30} 100.0%", s), 60,
                           "the copy to finish on the terminal")
        print("pgferry start, copied:\n" + screen.rstrip())
        os.kill(watch, signal.SIGINT)
    finally:
        os.kill(pid, signal.SIGTERM)  # it exits 0 after its final feedback (not our child: watch /proc)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "pgferry start to stop")
