"""Errors that end a command with a clear message and a documented exit code (DESIGN.md §3):
1 = the operation found a problem (source not ready, differences, timeout),
2 = usage or configuration error (bad DSN, unreachable server, wrong password)."""

from __future__ import annotations

EXIT_PROBLEM = 1
EXIT_USAGE = 2


class PgferryError(Exception):
    """An expected failure: printed as one line (what failed and what to do), no traceback."""

    exit_code = EXIT_PROBLEM

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PgferryError):
    exit_code = EXIT_USAGE


class SourceNotReady(PgferryError):
    """The source is reachable but not set up for logical replication (exit 1)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libpq and server errors run to several lines)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
