"""The tree stays ruff-clean (CI runs the tests, so it runs this too)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_clean():
    root = Path(__file__).parents[1]
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    res = subprocess.run([*cmd, "check", str(root)], capture_output=True, text=True, check=False)
    if res.returncode != 0 and "No module named ruff" in res.stderr:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    assert res.returncode == 0, res.stdout + res.stderr
