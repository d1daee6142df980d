"""replicator's errors, in one place: each ends a command with a one-line message (what failed and
what to do) and a documented exit code (docs/commands.md):
1 = the operation found a problem (source not ready, differences, timeout, a server unreachable),
2 = usage or configuration error (a bad flag, setting or DSN).
What the stream loop retries is decided by `sink.errors.retryable` (the one retry table); the
decoder's and the sink's own errors are in decoder/errors.py and sink/errors.py (imports flow
replicator -> sink -> decoder, so those packages cannot import this module)."""

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


class ConnectError(PgferryError):
    """A server could not be reached or refused the connection (exit 1, from every command: the
    server may be down or the network cut as well as a setting wrong; the message says which)."""


class SourceNotReady(PgferryError):
    """The source is reachable but not set up for logical replication (exit 1)."""


class CheckError(PgferryError):
    """Starting would break the source, or cannot work with this target (exit 1)."""


class SyncError(PgferryError):
    """The initial sync cannot go on (exit 1)."""


class CopyError(PgferryError):
    """A table could not be copied (exit 1)."""


class PostDataError(PgferryError):
    """Creating post-data objects on the target failed (exit 1)."""


class FatalError(PgferryError):
    """Stops the daemon (exit 1): retrying cannot help."""


class SessionRetry(Exception):
    """This stream session ended for a reason a reconnect can fix (no message for too long, the
    target's WAL flush stalled): the stream loop reconnects and resumes from the stored progress."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libpq and server errors run to several lines)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
