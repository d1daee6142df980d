"""Daemon logs: text on a terminal, JSON lines otherwise (or as asked), one line per event.

JSON lines carry `ts` (UTC, ISO 8601), `level`, `logger`, `msg`, and `exc` for an exception; a
record logged with `extra={"fields": {...}}` adds those keys (e.g. the copy's progress,
replicator/sync/progress_view.py), which the text format leaves out.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import msgspec

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                                "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update((k, v) for k, v in fields.items() if k not in line)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


def setup(level: str = "info", fmt: str = "auto") -> bool:
    """Configure the root logger on stderr (replacing earlier handlers). True: JSON lines."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return use_json
