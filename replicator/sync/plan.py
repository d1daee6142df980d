"""What the initial sync works on: its settings and the tables it copies."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sink.state import quote_ident, readable_name


@dataclass
class SyncConfig:
    source: str
    target: str
    publication: str
    slot: str
    schema: str
    tables: list[str] | None = None  # --tables: publish only these (schema.table or table)
    jobs: int = max(1, min(4, os.cpu_count() or 1))
    schema_copy: bool = True  # False: --no-schema, the target's tables are made by hand
    hold_back: bool = False  # --hold-back-constraints (replicator/holdback.py)
    progress_bars: bool = False  # the copy's progress as live bars (a terminal), else log lines
    progress_seconds: float = 5.0  # a progress log line every this many seconds


@dataclass
class TableCopy:
    schema: str
    name: str
    rows: int = 0
    bytes: int = 0  # the heap on the source (block ranges are cut from it)
    data_bytes: int = 0  # heap and TOAST: what the copy moves (progress, order, the summary)
    rows_estimate: int | None = None  # from the source's statistics (None: never analyzed): progress

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def display(self) -> str:
        """`schema.table` for messages, quoted where it must be (`public."My T"`)."""
        return readable_name(self.schema, self.name)
