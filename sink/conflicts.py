"""Conflicts: when the target disagrees with a change, and what to do about it.

Kinds (detected at apply time, in set-based batches and change by change alike):

* ``insert_exists``: the row to insert is already on the target (same key);
* ``update_missing`` / ``delete_missing``: the row to update or delete is not on the target;
* ``apply_error``: the target rejects one change (a value too long, a check or unique
  constraint over other columns, a type error).

Policies, a default per kind and per table: ``error`` (stop, naming the change), ``skip`` (keep
the target as it is), ``overwrite`` (the source row wins: upsert), ``keep-newer`` (the row with the
greater value in a column the user names wins). Defaults follow native logical replication:
insert_exists and apply_error stop, update_missing and delete_missing are skipped and logged.

Every conflict that is not applied as sent is written to the dead-letter table
(`<state schema>.conflicts`) with the source's old and new row, the target's row and the
resolution. A hook (`module:function`) may decide instead of the policy: it receives a `Conflict`
and returns a `Resolution`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

Kind = Literal["insert_exists", "update_missing", "delete_missing", "apply_error"]
Policy = Literal["error", "skip", "overwrite", "keep-newer"]


@dataclass(frozen=True)
class TablePolicy:
    insert_exists: Policy = "error"
    update_missing: Policy = "skip"
    delete_missing: Policy = "skip"
    apply_error: Policy = "error"
    newer_column: str | None = None

    def for_kind(self, kind: Kind) -> Policy:
        return getattr(self, kind)


@dataclass
class Policies:
    default: TablePolicy = field(default_factory=TablePolicy)
    tables: dict[str, TablePolicy] = field(default_factory=dict)  # "schema.table" -> policy
    hook: Callable[[Conflict], Resolution] | None = None

    def for_table(self, name: str) -> TablePolicy:
        return self.tables.get(name, self.default)


class Conflict(msgspec.Struct, frozen=True):
    """What a hook receives. Rows map column names to their text values (None for NULL)."""

    table: str
    kind: str
    key: dict[str, Any]
    old: dict[str, Any] | None  # the source's old row (key columns, or all with REPLICA IDENTITY FULL)
    new: dict[str, Any] | None  # the source's new row (None for a delete)
    existing: dict[str, Any] | None  # the target's row (None when missing)
    lsn: str | None  # commit LSN of the source transaction
    xid: int | None
    detail: str | None = None  # the target's error, for apply_error


class Resolution(msgspec.Struct, frozen=True):
    """A hook's answer. action: `apply` (write the source row), `keep` (leave the target row),
    `row` (write `row`, a dict of column -> text value), `skip`, or `error` (stop, with `message`)."""

    action: Literal["apply", "keep", "row", "skip", "error"]
    row: dict[str, Any] | None = None
    message: str | None = None


APPLY = Resolution("apply")
KEEP = Resolution("keep")
SKIP = Resolution("skip")


def policy_resolution(policy: Policy, kind: Kind) -> Resolution:
    """What a policy decides for one conflict. keep-newer against an existing row is decided by
    the target in one statement (sink/resolve.py); here it only meets a missing row, which the
    source row replaces, as with overwrite."""
    if policy == "error":
        return Resolution("error")
    if policy == "skip" or kind == "delete_missing" or kind == "apply_error":
        return SKIP if kind != "insert_exists" else KEEP
    return APPLY
