"""The tree stays ruff-clean and type-checks (CI runs the tests, so it runs these too)."""

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


def test_types_check():
    """mypy on the packages (settings in pyproject.toml: [tool.mypy]), unused ignores included."""
    root = Path(__file__).parents[1]
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True, check=False)
    if res.returncode != 0 and "No module named mypy" in res.stderr:
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    assert res.returncode == 0, res.stdout + res.stderr
