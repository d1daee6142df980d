"""SIGTERM/SIGINT as a flag the loops poll, plus a file descriptor that wakes their select()."""

from __future__ import annotations

import signal
import socket


class StopFlag:
    """Set by SIGTERM/SIGINT; wakes the loop's select() at once through a socketpair."""

    def __init__(self) -> None:
        self.set = False
        self.reload = False  # SIGHUP: re-read the configuration (the loop clears it)
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def request(self, *_: object) -> None:
        self.set = True
        self._wake()

    def drain(self) -> None:
        """Consume the wake-up bytes (after a reload: the loop keeps running)."""
        try:
            while self._r.recv(64):
                pass
        except OSError:
            pass

    def request_reload(self, *_: object) -> None:
        self.reload = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._w.send(b"x")
        except OSError:
            pass

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGHUP, self.request_reload)
