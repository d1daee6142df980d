"""The optional C accelerators, chosen in one place.

pgferry has three, each with a pure-Python path that gives the same results (tests compare them):
`decoder._cdecode` (the hot pgoutput messages), `sink._cfold` (parse a change and fold it into the
batch) and `replicator.sync._cpump` (the initial copy's COPY-to-COPY pump). Each is used when it was
built (`pip install -e .` compiles them; a machine without a compiler gets none) unless
PGFERRY_PURE_PYTHON=1. `load` is the only import of them; `active()` says which are in use.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ACCELERATORS = ("decoder._cdecode", "sink._cfold", "replicator.sync._cpump")
_loaded: dict[str, bool] = {}


def pure_python() -> bool:
    """PGFERRY_PURE_PYTHON=1: use none of the optional C accelerators."""
    return os.environ.get("PGFERRY_PURE_PYTHON", "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The accelerator module `name` (one of ACCELERATORS), or None: use the Python path."""
    assert name in ACCELERATORS, name
    module = None
    if not pure_python():
        try:
            module = importlib.import_module(name)
        except ImportError:  # not built
            module = None
    _loaded[name] = module is not None
    return module


def active() -> dict[str, bool]:
    """Which accelerators the modules loaded so far use (name -> in use)."""
    return dict(_loaded)
