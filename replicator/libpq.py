"""The libpq that psycopg2 is linked with, for the initial copy's C pump (replicator/_cpump.c).

psycopg2 hands out its connections' `PGconn *` (`conn.pgconn_ptr`). Only the library that made
them may use them, so the pump gets that library's functions, found in this process's memory map
(psycopg2-binary bundles its own libpq; a source build uses the system's). `pump()` is None where
that is not possible (no C extension, not Linux, PGFERRY_PURE_PYTHON=1): the copy then runs through
psql processes instead.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

import psycopg2  # noqa: F401  (loads psycopg2's libpq into this process)

log = logging.getLogger("pgferry.sync")

FUNCTIONS = ("PQexec", "PQresultStatus", "PQresultErrorMessage", "PQclear", "PQgetResult", "PQgetCopyData",
             "PQputCopyData", "PQputCopyEnd", "PQfreemem", "PQerrorMessage", "PQcmdTuples", "PQconsumeInput",
             "PQsocket")  # bind()'s order (replicator/_libpq.h)


def psycopg2_libpq_path() -> str | None:
    """The path of the libpq mapped into this process for psycopg2, or None."""
    try:
        with open("/proc/self/maps") as f:
            fields = (line.split(None, 5) for line in f)
            paths = {x[5].strip() for x in fields if len(x) == 6}
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.basename(p).startswith("libpq") and ".so" in p)
    return found[0] if len(found) == 1 else None  # two libpq copies: cannot tell which is psycopg2's


@functools.cache
def _addresses() -> tuple[int, ...] | None:
    if os.environ.get("PGFERRY_PURE_PYTHON", "") not in ("", "0"):
        return None
    path = psycopg2_libpq_path()
    if path is None:
        log.debug("psycopg2's libpq not found in /proc/self/maps: no C data path")
        return None
    lib = ctypes.CDLL(path)  # already loaded: the same handle and functions psycopg2 uses
    return tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0 for name in FUNCTIONS)


@functools.cache
def bound(module: str) -> Any:
    """replicator.<module> (a C extension) bound to psycopg2's libpq, or None."""
    addresses = _addresses()
    if addresses is None:
        return None
    try:
        mod = importlib.import_module(f"replicator.{module}")
    except ImportError:
        return None
    mod.bind(*addresses)
    return mod


PUMP_MAX_SOURCES = 16  # _cpump.c's MAX_SOURCES: block ranges merged into one target COPY at most


def pump() -> Callable[[tuple[int, ...], int, tuple[bytes, ...], bytes, bool], tuple[int, Any]] | None:
    """`_cpump.pump` (the initial copy's data path), or None: copy through psql."""
    mod = bound("_cpump")
    return None if mod is None else mod.pump  # type: ignore[no-any-return]
