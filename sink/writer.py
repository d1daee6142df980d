"""The batch writer: a full batch is written and committed on a thread of its own while the stream
loop reads and folds the next one. The target connection is the writer's until `join`, which
anything else that needs the connection calls first (and which raises the writer's error there,
in the caller's thread)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def active(self) -> bool:
        """A write was started and not joined yet."""
        return self._thread is not None

    def running(self) -> bool:
        """The write is still going (not finished, whatever its outcome)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, write: Callable[..., None], *args: Any) -> None:
        assert self._thread is None, "a write is running: join it first"
        self._thread = threading.Thread(target=self._run, args=(write, *args), name="batch-writer", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[..., None], *args: Any) -> None:
        try:
            write(*args)
        except BaseException as exc:  # raised by join(), in the stream loop's thread
            self._error = exc

    def join(self) -> None:
        """Wait for the write; raise its error here."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc
