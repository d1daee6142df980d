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
    r = subprocess.run([sys.executable, "-m", "bench.catchup", "--pairs", "15-18", "--scenarios", "oltp1,hot,full",
                        "--scale", "0.01", "--also", "--nice 0", "--target-role", "owner,superuser",
                        "--delay-ms", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "target role owner, link delay 1 ms each way", r.stdout
    assert [line.split()[:2] for line in lines if line.startswith("15->18")] == [
        ["15->18", "oltp1"], ["15->18", "hot"], ["15->18", "full"]], r.stdout
    assert sum("also1 = pgferry --nice 0 (target role owner):" in line for line in lines) == 3, r.stdout
    assert sum("as_superuser = pgferry  (target role superuser):" in line for line in lines) == 3, r.stdout
    assert "MISMATCH" not in r.stdout + r.stderr
