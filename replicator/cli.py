"""The `pgferry` command line (DESIGN.md §3).

Exit codes: 0 ok, 1 the operation found a problem, 2 usage or configuration error. Expected
failures print one line `pgferry: error: ...` (what failed, what to do) and never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import EXIT_USAGE, PgferryError


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=os.environ.get("PGFERRY_SOURCE", ""),
                   help="source DSN (libpq string or URI); default $PGFERRY_SOURCE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgferry",
        description="Move a live PostgreSQL database to another server through logical replication.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tail = sub.add_parser("tail", help="print the source's decoded changes as JSON lines")
    _add_source(tail)
    tail.add_argument("--publication", default="pgferry",
                      help="publication to stream (default: pgferry); it must exist")
    tail.add_argument("--slot", default=None,
                      help="use (or create) this permanent slot; default: a temporary slot that is gone on exit")
    tail.add_argument("--format", choices=["json"], default="json", help="output format (json lines)")

    demo = sub.add_parser("demo", help="start an embedded source, write sample changes and tail them")
    demo.add_argument("--changes", type=int, default=20, help="how many sample transactions to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tail":
            from .tail import run_tail
            return run_tail(args.source, args.publication, args.slot)
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args.changes)
    except PgferryError as exc:
        print(f"pgferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away; silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
