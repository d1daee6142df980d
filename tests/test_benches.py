"""The catch-up benchmark still runs end to end (tiny backlogs; no timing is asserted): it starts
its own servers, times native, pgferry, the ceiling and an `--also` variant, and compares both
targets with the source."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.pgplugin import ROOT

pytestmark = pytest.mark.pg


def test_catchup_bench_runs_every_consumer_and_the_targets_match():
    r = subprocess.run([sys.executable, "-m", "bench.catchup", "--pairs", "15-18", "--scenarios", "oltp,hot",
                        "--scale", "0.01", "--also", "--nice 0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("15->18")] == [["15->18", "oltp"],
                                                                                 ["15->18", "hot"]], r.stdout
    assert sum("also1 = pgferry --nice 0:" in line for line in lines) == 2, r.stdout
    assert "MISMATCH" not in r.stdout + r.stderr
