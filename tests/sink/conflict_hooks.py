"""Conflict hooks used by the tests (loaded by the daemon as tests.sink.conflict_hooks:...)."""

from __future__ import annotations

from sink.conflicts import Conflict, Resolution


def resolve(c: Conflict) -> Resolution:
    key = c.key["id"]
    if c.kind == "insert_exists":
        return Resolution("apply") if key == "1" else Resolution("keep")
    if c.kind == "update_missing":
        return Resolution("row", row={"id": key, "v": "from-hook", "ver": "3"})
    if c.kind == "delete_missing":
        return Resolution("skip")
    return Resolution("error", message=f"hook refuses {c.kind}")


def refuse(c: Conflict) -> Resolution:
    raise ValueError(f"nope: {c.kind} on {c.key}")


def refuse_updates(c: Conflict) -> Resolution:
    if c.kind == "update_missing":
        return Resolution("error", message="updates must find their row")
    return Resolution("skip")
