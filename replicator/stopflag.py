"""SIGTERM/SIGINT as a flag the loops poll, plus a file descriptor that wakes their select()."""

from __future__ import annotations

import signal
import socket


class StopFlag:
    """Set by SIGTERM/SIGINT; wakes the loop's select() at once through a socketpair."""

    def __init__(self) -> None:
        self.set = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def request(self, *_: object) -> None:
        self.set = True
        try:
            self._w.send(b"x")
        except OSError:
            pass

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)
