"""Showing the copy's progress (progress.py's `Progress`): live bars on a terminal, log lines
otherwise.

* `LogView`: a `copy: ...` line every few seconds and one at the end, on the `pgferry.sync`
  logger. The line carries the figures as structured fields too (`extra={"fields": ...}`), which
  the JSON log format writes as keys of its line (cli/logs.py) and the text format leaves out: the
  log format chooses, so Docker and systemd get the same lines as `--log-format text` on a terminal.
* `BarsView`: rich's progress bars on stderr, one per table being copied and one for the whole
  copy, with percent, rate and ETA; the daemon's other log lines print above them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Protocol

from .progress import Progress, format_eta

log = logging.getLogger("pgferry.sync")


class ProgressView(Protocol):
    def show(self, p: Progress, now: float) -> None: ...

    def close(self, p: Progress | None) -> None:
        """The copy has ended (`p`: its last look, None when it failed)."""


BAR_WIDTH = 30


def text_bar(percent: float, width: int = BAR_WIDTH) -> str:
    """`███████░░░░░░░`: a bar that reads the same without colours (a log, a pasted screen)."""
    full = min(width, max(0, int(width * percent / 100)))
    return "█" * full + "░" * (width - full)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def line(p: Progress) -> str:
    """The text of a progress log line."""
    text = (f"copy: {p.tables_done}/{p.tables} tables, {p.rows} rows, {p.percent:.1f}% of ~{_mb(p.bytes_total)}, "
            f"{_mb(p.rate or 0)}/s, ETA {format_eta(p.eta_seconds)}")
    if p.running:
        text += "; copying " + ", ".join(f"{t.name} {t.percent:.0f}% (ETA {format_eta(t.eta_seconds)})"
                                        for t in p.running)
    return text


class LogView:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last: float | None = None
        self.finished = False  # the 100% line is out (once only)

    def show(self, p: Progress, now: float) -> None:
        if self.last is None:
            self.last = now - p.elapsed  # the first line `seconds` after the copy started
        if now - self.last >= self.seconds:
            self.last = now
            self._emit(p)

    def close(self, p: Progress | None) -> None:
        if p is not None and p.finished:
            self._emit(p)

    def _emit(self, p: Progress) -> None:
        if self.finished:
            return
        self.finished = p.finished
        log.info("%s", line(p), extra={"fields": {"event": "copy_progress", **p.fields()}})


class BarsView:
    """rich.progress on stderr, refreshed on every look (twice a second)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress, TextColumn

        # (rich's BarColumn tells done from to do by colour only: pasted or without colours, a bar
        # at 1% looked full)
        self.bars = Progress(TextColumn("{task.description:<32}"), TextColumn("{task.fields[bar]}", style="green"),
                             TextColumn("{task.fields[percent]:>6}"), TextColumn("{task.fields[detail]}"),
                             console=Console(file=sys.stderr), auto_refresh=False, transient=False,
                             redirect_stderr=True, redirect_stdout=False)
        self.overall: Any = None
        self.tasks: dict[str, Any] = {}
        self._streams: list[tuple[logging.StreamHandler, Any]] = []

    def _start(self) -> None:
        real = sys.stderr
        self.bars.start()
        # The log handlers hold the real stderr: while the bars are up, their lines go through
        # rich's proxy (printed above the bars) instead of through the middle of them.
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is real and sys.stderr is not real:
                self._streams.append((h, h.setStream(sys.stderr)))
        self.overall = self.bars.add_task("all tables", total=100, percent="", detail="", bar=text_bar(0))

    def show(self, p: Progress, now: float) -> None:
        if self.overall is None:
            self._start()
        for name in [n for n in self.tasks if n not in {t.name for t in p.running}]:
            self.bars.remove_task(self.tasks.pop(name))
        for t in p.running:
            if t.name not in self.tasks:
                self.tasks[t.name] = self.bars.add_task(t.name, total=100, percent="", detail="", bar=text_bar(0))
            est = f"~{t.rows_estimate:,} rows" if t.rows_estimate else f"~{_mb(t.bytes_total)}"
            self.bars.update(self.tasks[t.name], completed=t.percent, percent=f"{t.percent:.1f}%",
                             bar=text_bar(t.percent), detail=f"{t.rows:,} of {est}  ETA {format_eta(t.eta_seconds)}")
        self.bars.update(self.overall, completed=p.percent, percent=f"{p.percent:.1f}%", bar=text_bar(p.percent),
                         description=f"all: {p.tables_done}/{p.tables} tables",
                         detail=f"{_mb(p.bytes_done)} of ~{_mb(p.bytes_total)}  {_mb(p.rate or 0)}/s  "
                                f"ETA {format_eta(p.eta_seconds)}")
        self.bars.refresh()

    def close(self, p: Progress | None) -> None:
        if p is not None:
            self.show(p, 0.0)
        if self.overall is not None:
            for name in list(self.tasks):
                self.bars.remove_task(self.tasks.pop(name))
            self.bars.refresh()
            self.bars.stop()
        for h, stream in self._streams:
            h.setStream(stream)
        self._streams.clear()
