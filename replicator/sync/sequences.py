"""Sequence values onto the target: at cutover, as the last thing the source hands over."""

from __future__ import annotations

import logging

from sink.state import quote_ident

from ..source import connect

log = logging.getLogger("pgferry.sync")


def copy_sequences(source: str, target: str) -> list[tuple[str, int]]:
    """Every sequence's current value onto the target (identity, serial and standalone)."""
    src = connect(source, "source")
    dst = connect(target, "target")
    try:
        with src.cursor() as cur:
            cur.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences "
                        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND last_value IS NOT NULL")
            rows = cur.fetchall()
        names = [f"{quote_ident(schema)}.{quote_ident(name)}" for schema, name, _ in rows]
        dcur = dst.cursor()  # one statement for all (a database may have thousands); those the target lacks skipped
        dcur.execute("SELECT i, setval(to_regclass(name), value, true) FROM unnest(%s::text[], %s::bigint[]) "
                     "WITH ORDINALITY AS s(name, value, i) WHERE to_regclass(name) IS NOT NULL",
                     (names, [r[2] for r in rows]))
        out = [(f"{rows[i - 1][0]}.{rows[i - 1][1]}", int(rows[i - 1][2])) for i, _ in sorted(dcur.fetchall())]
        dst.commit()
    finally:
        src.close()
        dst.close()
    log.info("sequences: %d values copied", len(out))
    return out
