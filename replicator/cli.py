"""The `pgferry` command line (DESIGN.md §3).

Exit codes: 0 ok, 1 the operation found a problem, 2 usage or configuration error. Expected
failures print one line `pgferry: error: ...` (what failed, what to do) and never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from sink.apply import BatchLimits

from .errors import EXIT_USAGE, PgferryError, UsageError


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=os.environ.get("PGFERRY_SOURCE", ""),
                   help="source DSN (libpq string or URI); default $PGFERRY_SOURCE")


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("PGFERRY_TARGET", ""),
                   help="target DSN (libpq string or URI); default $PGFERRY_TARGET")


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


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

    start = sub.add_parser("start", help="stream the source's changes into the target (resumes where it stopped)")
    _add_source(start)
    _add_target(start)
    start.add_argument("--publication", default="pgferry", help="publication to stream (default: pgferry)")
    start.add_argument("--slot", default="pgferry",
                       help="replication slot (default: pgferry); created on first start if missing")
    start.add_argument("--state-schema", default="pgferry", help="schema for pgferry's state on the target")
    start.add_argument("--no-copy", action="store_true",
                       help="the target already holds the data as of the slot's creation: only stream")
    start.add_argument("--no-schema", action="store_true",
                       help="the target's tables exist already (made by hand): copy data only")
    start.add_argument("--tables", default=None,
                       help="comma-separated tables to publish when pgferry creates the publication (default: all)")
    start.add_argument("--jobs", type=_positive(int), default=None,
                       help="tables copied at once (default: the number of CPUs, at most 4)")
    start.add_argument("--batch-rows", type=_positive(int), default=BatchLimits.rows,
                       help=f"commit a target batch after this many row changes (default {BatchLimits.rows})")
    start.add_argument("--batch-bytes", type=_positive(int), default=BatchLimits.bytes,
                       help=f"... or this many bytes of changes (default {BatchLimits.bytes >> 20} MiB)")
    start.add_argument("--batch-ms", type=_positive(float), default=500,
                       help="... or when the batch is this old, in milliseconds (default 500)")
    start.add_argument("--spool-dir", default=os.environ.get("PGFERRY_SPOOL_DIR") or None,
                       help="where large in-progress transactions are spooled (default: the temp dir)")
    start.add_argument("--network-timeout", type=_positive(float), default=30.0,
                       help="seconds of silence from the source (pings included) after which the connection is "
                            "presumed dead and re-opened (default 30)")
    start.add_argument("--message-hook", default=None, metavar="MODULE:FUNCTION",
                       help="call this function with each logical decoding message (pg_logical_emit_message); "
                            "transactional ones in commit order; after a crash one may come again. Default: ignored")
    start.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    def common(p: argparse.ArgumentParser) -> None:
        _add_source(p)
        _add_target(p)
        p.add_argument("--slot", default="pgferry", help="replication slot (default: pgferry)")
        p.add_argument("--state-schema", default="pgferry", help="pgferry's state schema on the target")

    status = sub.add_parser("status", help="phase, applied and source LSN, lag, tables (daemon running or not)")
    common(status)
    status.add_argument("--json", action="store_true", help="one JSON object")

    verify = sub.add_parser("verify", help="compare source and target per table; exit 1 on any difference")
    common(verify)
    verify.add_argument("--publication", default="pgferry", help="the published tables are compared")
    verify.add_argument("--tables", default=None, help="comma-separated subset of the published tables")
    verify.add_argument("--mode", choices=["count", "checksum"], default="checksum")
    verify.add_argument("--json", action="store_true", help="one JSON object")

    cutover = sub.add_parser("cutover", help="fence the source, hand off at one LSN, copy sequences, verify")
    common(cutover)
    cutover.add_argument("--publication", default="pgferry")
    cutover.add_argument("--fence", choices=["read-only", "none"], default="read-only",
                         help="read-only (default): the source database refuses writes for every role and open "
                              "sessions are ended; none: you stopped the writers yourself")
    cutover.add_argument("--timeout", type=_positive(float), default=60.0,
                         help="seconds to wait for the daemon to apply up to the handoff (default 60)")
    cutover.add_argument("--receipt", default=None, help="also write the JSON receipt to this file")

    cleanup = sub.add_parser("cleanup", help="drop the slot and publication pgferry created")
    common(cleanup)
    cleanup.add_argument("--drop-state", action="store_true", help="also drop the state schema on the target")

    demo = sub.add_parser("demo", help="migrate sample data between two embedded servers under live writes")
    demo.add_argument("--write-seconds", type=_positive(float), default=10.0,
                      help="how long the application keeps writing once streaming runs (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tail":
            from .tail import run_tail
            return run_tail(args.source, args.publication, args.slot)
        if args.command == "start":
            return _start(args)
        if args.command in ("status", "verify", "cutover", "cleanup"):
            return _admin(args)
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(args.write_seconds)
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


def _admin(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for role in ("source", "target"):
        if not getattr(args, role):
            raise UsageError(f"no {role} given: pass --{role} DSN or set PGFERRY_{role.upper()}")
    if args.command == "status":
        from .status import run_status
        return run_status(args.source, args.target, args.slot, args.state_schema, args.json)
    if args.command == "verify":
        from .verify import print_results, verify
        tables = [t.strip() for t in args.tables.split(",")] if args.tables else None
        results = verify(args.source, args.target, args.publication, tables, args.mode)
        return print_results(results, args.json)
    if args.command == "cutover":
        from .cutover import run_cutover
        return run_cutover(args.source, args.target, args.publication, args.slot, args.state_schema, args.fence,
                           args.timeout, args.receipt)
    from .cleanup import run_cleanup
    return run_cleanup(args.source, args.target, args.slot, args.state_schema, args.drop_state)


def load_hook(spec: str) -> Callable[..., object]:
    """`package.module:function` -> the function, or a UsageError naming what is wrong."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--message-hook {spec!r}: expected MODULE:FUNCTION, e.g. myhooks:on_message")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--message-hook {spec!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--message-hook {spec!r}: {module_name} has no function {attr}")
    return fn  # type: ignore[no-any-return]


def _start(args: argparse.Namespace) -> int:
    import logging

    from .stream import StreamConfig, run_stream

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if not args.target:
        raise UsageError("no target given: pass --target DSN or set PGFERRY_TARGET")
    if not args.source:
        raise UsageError("no source given: pass --source DSN or set PGFERRY_SOURCE")
    if not args.no_copy:
        from .sync import InitialSync, SyncConfig

        sync_cfg = SyncConfig(source=args.source, target=args.target, publication=args.publication, slot=args.slot,
                              schema=args.state_schema, schema_copy=not args.no_schema,
                              tables=[t.strip() for t in args.tables.split(",")] if args.tables else None)
        if args.jobs:
            sync_cfg.jobs = args.jobs
        InitialSync(sync_cfg).run()
        from sink import failpoints

        failpoints.hit("before_stream")  # the copy is done and recorded; streaming has not started
    cfg = StreamConfig(source=args.source, target=args.target, publication=args.publication, slot=args.slot,
                       schema=args.state_schema, spool_dir=args.spool_dir,
                       message_hook=load_hook(args.message_hook) if args.message_hook else None,
                       network_timeout=args.network_timeout,
                       limits=BatchLimits(rows=args.batch_rows, bytes=args.batch_bytes, seconds=args.batch_ms / 1000))
    return run_stream(cfg)


if __name__ == "__main__":
    sys.exit(main())
