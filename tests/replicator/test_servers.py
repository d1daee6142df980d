"""The real-server harness itself: versions, wal_level, unprivileged server user."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgplugin import require_pgbouncer

pytestmark = pytest.mark.pg


def test_pair_is_logical_and_of_the_requested_versions(pair, request):
    src, dst = pair
    s_ver, t_ver = request.node.callspec.params["pair"]
    for db, ver in ((src, s_ver), (dst, t_ver)):
        assert db.execute("SHOW server_version_num")[0][0].startswith(str(ver))
        assert db.execute("SHOW wal_level")[0][0] == "logical"
        assert db.execute("SHOW listen_addresses")[0][0] == "127.0.0.1"
    assert src.server.port != dst.server.port
    if os.geteuid() == 0:
        owner = src.server.datadir.stat().st_uid
        assert owner != 0, "the server must not run as root"


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "replicator.cli", "demo", "--write-seconds", "2", *args],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "initial copy done" in res.stdout and "all equal: True" in res.stdout, res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    return res


def test_demo_command_runs_end_to_end():
    require_pgbouncer()  # without it the demo takes the path of the test below
    out = _demo().stdout
    # the application wrote through PgBouncer, paused at the cutover and went on on the target
    m = re.search(r"on the target since the cutover: (\d+) transactions committed, (\d+) failed", out)
    assert m and int(m.group(1)) > 0 and m.group(2) == "0", out
    assert "the clients paused" in out, out


def test_demo_without_pgbouncer_shows_the_fence_refusing_the_application():
    out = _demo("--no-pgbouncer").stdout
    assert "the application's writes after the fence were refused: pgferry: table" in out, out
    assert "is fenced" in out and "write downtime" in out, out
