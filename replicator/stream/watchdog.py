"""Notice a dead target while a statement waits on it.

TCP settles most failures (`tcp_user_timeout` for unacknowledged data, keepalives for a silent
peer), but not all: a middlebox that acknowledges and then drops everything, or a frozen server
behind a live kernel, leave a statement waiting forever. A statement that waits on a lock looks the
same from the client. So when a target statement has been running for `network_timeout`, the
watchdog opens a NEW connection to the target: if that fails too, the target is presumed dead and
the waiting connection's socket is shut down (the statement fails, the stream loop reconnects and
resumes from the stored progress); if it succeeds, the target is alive and pgferry keeps waiting.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions

from ..errors import first_line

log = logging.getLogger("pgferry.stream")


class WatchedCursor(psycopg2.extensions.cursor):
    """Stamps its connection's `busy_since` while a statement or COPY runs."""

    def execute(self, query: Any, vars: Any = None) -> Any:
        conn = self.connection
        conn.busy_since = time.monotonic()
        try:
            return super().execute(query, vars)
        finally:
            conn.busy_since = None

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> Any:
        conn = self.connection
        conn.busy_since = time.monotonic()
        try:
            return super().copy_expert(sql, file, size)
        finally:
            conn.busy_since = None


class WatchedConnection(psycopg2.extensions.connection):
    """A target connection whose statements and commits the watchdog can see."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.busy_since: float | None = None

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cursor_factory") is None:
            kwargs["cursor_factory"] = WatchedCursor
        return super().cursor(*args, **kwargs)

    def commit(self) -> None:
        self.busy_since = time.monotonic()
        try:
            super().commit()
        finally:
            self.busy_since = None


class TargetWatchdog:
    def __init__(self, conn: WatchedConnection, dsn: str, timeout: float) -> None:
        self.conn = conn
        self.dsn = dsn
        self.timeout = timeout
        self.presumed_dead: str | None = None  # why, once the connection was shut down
        self._done = threading.Event()
        self._probed_for: float | None = None  # the busy_since a probe last found alive
        self._thread = threading.Thread(target=self._run, name="target-watchdog", daemon=True)

    def start(self) -> TargetWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            since = self.conn.busy_since
            if since is None:
                continue
            waited = time.monotonic() - since
            if waited < self.timeout or (self._probed_for == since and waited < 2 * self.timeout):
                continue
            problem = self._probe()
            if problem is None:
                if self._probed_for != since:
                    log.info("a target statement has waited %.0f s; the target accepts new connections, so "
                             "pgferry keeps waiting (a lock held by another session?)", waited)
                self._probed_for = since  # alive: look again after another timeout
                continue
            if self.conn.busy_since != since:
                continue  # it finished while we probed
            self.presumed_dead = (f"no answer from the target for {waited:.0f} s and a new connection fails too "
                                  f"({problem}): presumed dead")
            log.warning("%s; closing the connection to reconnect", self.presumed_dead)
            try:
                sock = socket.socket(fileno=os.dup(self.conn.fileno()))
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
            return

    def _probe(self) -> str | None:
        try:
            probe = psycopg2.connect(self.dsn, application_name="pgferry-probe",
                                     connect_timeout=max(2, int(self.timeout / 2)))
        except psycopg2.Error as exc:
            return first_line(exc) or "no answer"
        probe.close()
        return None
