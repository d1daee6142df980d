"""The libpq that psycopg2 is linked with, for the initial copy's C pump (replicator/sync/_cpump.c).

psycopg2 hands out its connections' `PGconn *` (`conn.pgconn_ptr`). Only the library that made
them may use them, so the pump gets that library's functions, found in this process's memory map
(psycopg2-binary bundles its own libpq; a source build uses the system's). `pump()` is None where
that is not possible (no C extension, not Linux, PGFERRY_PURE_PYTHON=1): the copy then runs through
psql processes instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import psycopg2  # noqa: F401  (loads psycopg2's libpq into this process)

from decoder import accel

log = logging.getLogger("pgferry.sync")

FUNCTIONS = ("PQexec", "PQresultStatus", "PQresultErrorMessage", "PQclear", "PQgetResult", "PQgetCopyData",
             "PQputCopyData", "PQputCopyEnd", "PQfreemem", "PQerrorMessage", "PQcmdTuples", "PQconsumeInput",
             "PQsocket")  # bind()'s order (replicator/sync/_libpq.h)


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


PUMP_MAX_SOURCES = 16  # _cpump.c's MAX_SOURCES: block ranges merged into one target COPY at most


@functools.cache
def pump() -> Callable[[tuple[int, ...], int, tuple[bytes, ...], bytes, bool, int, bytes], tuple[int, Any]] | None:
    """`_cpump.pump` (the initial copy's data path) bound to psycopg2's libpq, or None: copy
    through psql."""
    _cpump = accel.load("replicator.sync._cpump")
    if _cpump is None:
        return None
    path = psycopg2_libpq_path()
    if path is None:
        log.debug("psycopg2's libpq not found in /proc/self/maps: copying through psql")
        return None
    lib = ctypes.CDLL(path)  # already loaded: the same handle and functions psycopg2 uses
    _cpump.bind(*(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0 for name in FUNCTIONS))
    return _cpump.pump
