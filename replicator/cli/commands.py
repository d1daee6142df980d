"""The `pgferry` command line (docs/commands.md).

Exit codes: 0 ok, 1 the operation found a problem, 2 usage or configuration error. Expected
failures print one line `pgferry: error: ...` (what failed, what to do) and never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import psycopg2

from sink.apply import BatchLimits

from ..errors import EXIT_PROBLEM, EXIT_USAGE, PgferryError, UsageError, first_line
from . import config

if TYPE_CHECKING:
    from ..cutover.fallback import Reverse

log = logging.getLogger("pgferry")


# Options that are also settings (replicator/cli/config.py) default to None here: None means "not
# given", so the environment and the config file can fill them in (flags > env > file > defaults).
def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="source DSN (libpq string or URI); default $PGFERRY_SOURCE")
    p.add_argument("--config", metavar="FILE", default=os.environ.get("PGFERRY_CONFIG"),
                   help="TOML settings file (see `pgferry config example`); default $PGFERRY_CONFIG")


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="target DSN (libpq string or URI); default $PGFERRY_TARGET")


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgferry",
        description="Move a live PostgreSQL database to another server through logical replication.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tail = sub.add_parser("tail", help="print the source's decoded changes as JSON lines")
    _add_source(tail)
    tail.add_argument("--publication", help="publication to stream (default: pgferry); it must exist")
    tail.add_argument("--slot", default=None,
                      help="use (or create) this permanent slot; default: a temporary slot that is gone on exit")
    tail.add_argument("--format", choices=["json"], default="json", help="output format (json lines)")

    start = sub.add_parser("start", help="stream the source's changes into the target (resumes where it stopped)")
    _add_source(start)
    _add_target(start)
    start.add_argument("--publication", help="publication to stream (default: pgferry)")
    start.add_argument("--slot", help="replication slot (default: pgferry); created on first start if missing")
    start.add_argument("--state-schema", help="schema for pgferry's state on the target (default: pgferry)")
    start.add_argument("--no-copy", action="store_true", default=None,
                       help="the target already holds the data as of the slot's creation: only stream")
    start.add_argument("--no-schema", action="store_true", default=None,
                       help="the target's tables exist already (made by hand): copy data only")
    start.add_argument("--hold-back-constraints", action="store_true", default=None,
                       help="where the target role may not set session_replication_role: record and drop the "
                            "foreign keys, user triggers and rules of the migrated tables, and create them again "
                            "at cutover or cleanup (pgferry does this for the schema it copies)")
    start.add_argument("--keep-constraints", action="store_true", default=None,
                       help="... or keep them: they fire during apply, their tables are applied one by one")
    start.add_argument("--tables", default=None,
                       help="comma-separated tables to publish when pgferry creates the publication (default: all)")
    start.add_argument("--ddl", choices=["apply", "stop", "skip"], default=None,
                       help="schema changes made on the source while migrating: apply them on the target where "
                            "they happened (default), stop before one, or skip them")
    start.add_argument("--no-ddl-capture", action="store_true", default=None,
                       help="do not install pgferry's event trigger on the source (schema changes are then "
                            "followed only as far as the stream shows them: added and dropped columns, new tables)")
    start.add_argument("--jobs", type=_positive(int), default=None,
                       help="tables copied at once (default: the number of CPUs, at most 4)")
    start.add_argument("--batch-rows", type=_positive(int),
                       help=f"commit a target batch after this many row changes (default {BatchLimits.rows})")
    start.add_argument("--batch-bytes", type=_positive(int),
                       help=f"... or this many bytes of changes (default {BatchLimits.bytes >> 20} MiB)")
    start.add_argument("--batch-ms", type=_positive(float),
                       help="... or when the batch is this old, in milliseconds (default 500)")
    start.add_argument("--spool-dir", help="where large in-progress transactions are spooled (default: the temp dir)")
    start.add_argument("--network-timeout", type=_positive(float),
                       help="seconds of silence from the source (pings included) after which the connection is "
                            "presumed dead and re-opened (default 30)")
    start.add_argument("--message-hook", metavar="MODULE:FUNCTION",
                       help="call this function with each logical decoding message (pg_logical_emit_message); "
                            "transactional ones in commit order; after a crash one may come again. Default: ignored")
    start.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    start.add_argument("--metrics-address", metavar="HOST",
                       help="the address the metrics endpoint listens on (default 0.0.0.0: every interface)")
    start.add_argument("--nice", type=int, metavar="0-19",
                       help="CPU priority below the database servers' on a shared host (default 10; 0: as started)")
    start.add_argument("--max-rows-per-second", type=_positive(float),
                       help="apply at most this many row changes per second (default: no limit; SIGHUP reloads)")
    start.add_argument("--max-bytes-per-second", type=_positive(float),
                       help="apply at most this many bytes of changes per second (default: no limit)")
    start.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: info")
    start.add_argument("--log-format", choices=["auto", "text", "json"],
                       help="auto (default): text on a terminal, JSON lines otherwise")
    start.add_argument("--progress-interval", type=_positive(float), metavar="SECONDS",
                       help="a copy progress log line every SECONDS when stderr is no terminal or the logs are "
                            "JSON (default 5; on a terminal with text logs: live bars)")

    def common(p: argparse.ArgumentParser) -> None:
        _add_source(p)
        _add_target(p)
        p.add_argument("--slot", help="replication slot (default: pgferry)")
        p.add_argument("--state-schema", help="pgferry's state schema on the target (default: pgferry)")

    status = sub.add_parser("status", help="phase, applied and source LSN, lag, tables (daemon running or not)")
    common(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", type=_positive(float), nargs="?", const=2.0, metavar="SECONDS",
                        help="a live view, redrawn every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--iterations", type=_positive(int), help="with --watch: stop after this many refreshes")

    verify = sub.add_parser("verify", help="compare source and target per table; exit 1 on any difference")
    common(verify)
    verify.add_argument("--publication", help="the published tables are compared (default: pgferry)")
    verify.add_argument("--tables", default=None, help="comma-separated subset of the published tables")
    verify.add_argument("--mode", choices=["count", "checksum"], default="checksum")
    verify.add_argument("--json", action="store_true", help="one JSON object")
    verify.add_argument("--online", action="store_true",
                        help="while the daemon streams: both sides as of one LSN (a source snapshot, the daemon "
                             "held there for an instant while the target's is taken), compared while both go on")
    verify.add_argument("--max-rate", type=_positive(float), default=None, metavar="ROWS",
                        help="with --online: read at most this many rows per second (both sides together)")
    verify.add_argument("--timeout", type=_positive(float), default=60.0,
                        help="with --online: seconds to wait for the daemon to hold at the LSN (default 60)")

    repair = sub.add_parser("repair", help="copy again the key ranges an online verify finds different (a dry run "
                                           "without --apply), then verify them again")
    common(repair)
    repair.add_argument("--publication", help="the published tables are compared (default: pgferry)")
    repair.add_argument("--tables", default=None, help="comma-separated subset of the published tables")
    repair.add_argument("--apply", action="store_true",
                        help="copy the differing ranges again (as of one LSN, the daemon held meanwhile); without "
                             "it, only list them")
    repair.add_argument("--json", action="store_true", help="one JSON object")
    repair.add_argument("--max-rate", type=_positive(float), default=None, metavar="ROWS",
                        help="the comparisons read at most this many rows per second (both sides together)")
    repair.add_argument("--timeout", type=_positive(float), default=60.0,
                        help="seconds to wait for the daemon to hold (default 60)")

    def handoff_flags(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("--publication", help="default: pgferry")
        p.add_argument("--fence", choices=["read-only", "none"], default="read-only",
                       help="read-only (default): every published table refuses writes from every session but "
                            "pgferry's (a trigger no role or setting bypasses; lifted on failure); none: you "
                            "stopped the writers yourself")
        p.add_argument("--fence-wait", type=_positive(float), default=5.0,
                       help="seconds the fence waits for writes in flight before it ends the sessions holding "
                            "them (default 5)")
        p.add_argument("--timeout", type=_positive(float), default=60.0,
                       help="seconds to wait for the daemon to apply up to the handoff (default 60)")
        p.add_argument("--receipt", default=None, help="also write the JSON receipt to this file")
        p.add_argument("--verify", choices=["checksum", "count", "online"], default="checksum",
                       help="how the tables are compared after the handoff, while the source is still fenced: "
                            "checksum (default) reads every row on both sides; count only counts them; online "
                            "(cutover only) compares every row while the daemon streams, before the fence (like "
                            "`verify --online`), and under the fence only the rows the source changed since: a "
                            "write downtime that does not grow with the database")
        p.add_argument("--max-rate", type=_positive(float), default=None, metavar="ROWS",
                       help="with --verify online: the comparison before the fence reads at most this many rows "
                            "per second (both sides together)")
        p.add_argument("--catch-up-rounds", type=_non_negative, default=4, metavar="N",
                       help="with --verify online: after the first comparison, compare the rows changed during it "
                            "while streaming, again and again while a round takes over a second, at most N times "
                            "(default 4; 0: none), so the fence waits only for what the last round left")
        p.add_argument("--pgbouncer", metavar="DSN", default=None,
                       help="the admin console of the PgBouncer the application reaches the source through "
                            "(e.g. 'host=10.0.0.5 port=6432 user=pgbouncer'): PAUSE it, then repoint its database "
                            "entry to the target and RESUME, so clients see a pause, not an error")
        p.add_argument("--pgbouncer-database", metavar="NAME", default=None,
                       help="PgBouncer's database entry to move (default: the source DSN's dbname)")
        p.add_argument("--pgbouncer-config", metavar="FILE", default=None,
                       help="PgBouncer's config file with that entry (default: the one it runs with, SHOW CONFIG)")
        p.add_argument("--pgbouncer-target", metavar="CONNINFO", default=None,
                       help="the entry's new settings, e.g. 'host=new port=5432 dbname=app user=app' (default: "
                            "host, port and dbname of --target; the entry's other settings stay)")
        p.add_argument("--switch-command", metavar="CMD", default=None,
                       help="a shell command that moves the application (DNS, a proxy, a flag), run once the "
                            "target verified, with PGFERRY_HANDOFF_LSN, PGFERRY_CUTOVER_ID and PGFERRY_TARGET_DSN "
                            "set; a failure undoes the cutover like a failed verify")
        p.add_argument("--switch-timeout", type=_positive(float), default=60.0,
                       help="seconds the switch command may take (default 60)")
        p.add_argument("--undo", action="store_true",
                       help="undo an interrupted or failed cutover: PgBouncer's entry and pause, the fence, the "
                            "handoff (refused once the application has moved)")

    cutover = sub.add_parser("cutover", help="fence the source, hand off at one LSN, copy sequences, verify")
    handoff_flags(cutover)
    cutover.add_argument("--fallback", action="store_true",
                         help="keep a way back: before the application is let onto the target, create a slot "
                              "there, and stream its writes back into the (still fenced) source")
    rollback = sub.add_parser("rollback", help="after a cutover with --fallback: hand back to the old source at "
                                               "one LSN (the cutover in reverse)")
    handoff_flags(rollback)
    fallback = sub.add_parser("fallback", help="`fallback stop`: the migration is confirmed; drop the reverse slot")
    fallback.add_argument("action", choices=["stop"])
    common(fallback)
    fallback.add_argument("--publication", help="default: pgferry")

    pause = sub.add_parser("pause", help="stop applying at the next source transaction boundary; the daemon keeps "
                                         "the slot, its position and the connection (`pgferry resume` goes on)")
    common(pause)
    pause.add_argument("--timeout", type=_positive(float), default=60.0,
                       help="seconds to wait for the daemon to hold (default 60)")
    resume = sub.add_parser("resume", help="go on applying after `pgferry pause`")
    common(resume)

    cleanup = sub.add_parser("cleanup", help="drop the slot and publication pgferry created")
    common(cleanup)
    cleanup.add_argument("--drop-state", action="store_true", help="also drop the state schema on the target")

    skip = sub.add_parser("skip", help="after a conflict stop: skip one source transaction (by its commit LSN) on "
                                       "the next start")
    common(skip)
    skip.add_argument("--lsn", required=True, help="the commit LSN the stop named, e.g. 0/16B3748")

    resync = sub.add_parser("resync", help="re-copy one table while streaming: a fresh snapshot of it, its "
                                           "earlier stream changes skipped (the running daemon does it)")
    common(resync)
    resync.add_argument("table", help="the table, as schema.table (or table, in the search path)")
    resync.add_argument("--timeout", type=_positive(float), default=600.0,
                        help="seconds to wait for the daemon to finish it (default 600)")
    resync.add_argument("--no-wait", action="store_true", help="ask for it and return")

    preflight = sub.add_parser("preflight", help="check source and target before a migration; each finding "
                                                 "with its fix; exit 1 on any error")
    common(preflight)
    preflight.add_argument("--publication", help="default: pgferry")
    preflight.add_argument("--tables", default=None, help="comma-separated tables to publish (default: all)")
    preflight.add_argument("--no-schema", action="store_true", default=None,
                           help="as `start --no-schema`: the target's tables exist already")
    preflight.add_argument("--hold-back-constraints", action="store_true", default=None, help="as `start`'s")
    preflight.add_argument("--keep-constraints", action="store_true", default=None, help="as `start`'s")
    preflight.add_argument("--json", action="store_true", help="one JSON object")
    preflight.add_argument("--print-setup-sql", action="store_true",
                           help="print the SQL for a least-privilege replication role instead")

    config = sub.add_parser("config", help="`config example`: a commented config file; `config show`: the "
                                           "effective settings (passwords masked)")
    config.add_argument("action", choices=["example", "show"])
    _add_source(config)
    _add_target(config)

    demo = sub.add_parser("demo", help="migrate sample data between two embedded servers under live writes")
    demo.add_argument("--write-seconds", type=_positive(float), default=10.0,
                      help="how long the application keeps writing once streaming runs (default 10)")
    demo.add_argument("--no-pgbouncer", action="store_true",
                      help="the application writes on the source directly, without the PgBouncer the demo "
                           "starts when pgbouncer is installed (the cutover then leaves moving it to you)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from ..local.demo import run_demo
            return run_demo(args.write_seconds, use_pgbouncer=not args.no_pgbouncer)
        settings = config.load(args.config, _flags(args))
        if args.command == "config":
            return _config(args, settings)
        if args.command == "tail":
            from .tail import run_tail
            return run_tail(settings.source, settings.publication, args.slot)
        if args.command == "start":
            return _start(settings, args)
        if args.command in ("status", "verify", "repair", "cutover", "rollback", "fallback", "cleanup", "preflight",
                            "skip", "resync", "pause", "resume"):
            return _admin(args, settings)
    except PgferryError as exc:
        print(f"pgferry: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except psycopg2.Error as exc:  # a server error no command expected (a connection lost mid-way...)
        if os.environ.get("PGFERRY_DEBUG"):  # where it came from, for a bug report
            import traceback

            traceback.print_exc()
        print(f"pgferry: error: {args.command}: {first_line(exc)}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away; silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return EXIT_USAGE


def _limits(st: config.Settings) -> BatchLimits:
    return BatchLimits(rows=st.batch_rows, bytes=st.batch_bytes, seconds=st.batch_ms / 1000)


def _flags(args: argparse.Namespace) -> dict[str, object]:
    """The settings the command line gave (None: not given)."""
    flags = dict(vars(args))
    if flags.pop("no_copy", None):
        flags["copy"] = False
    if flags.pop("no_schema", None):
        flags["schema"] = False
    if flags.pop("no_ddl_capture", None):
        flags["ddl_capture"] = False
    if isinstance(flags.get("tables"), str):
        flags["tables"] = [t.strip() for t in flags["tables"].split(",") if t.strip()]
    if args.command in ("verify", "repair"):
        flags.pop("tables", None)  # verify's --tables picks among the published tables: not a setting
    return flags


def _config(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.action == "example":
        sys.stdout.write(config.EXAMPLE)
        return 0
    import msgspec

    sys.stdout.write(msgspec.json.format(msgspec.json.encode(config.as_dict(settings))).decode() + "\n")
    return 0


def _admin(args: argparse.Namespace, settings: config.Settings) -> int:
    import logging

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "preflight":
        from .preflight import print_setup_sql, run_preflight
        if args.print_setup_sql:
            return print_setup_sql(settings)
        return run_preflight(settings, args.json)
    for role in ("target",) if args.command in ("skip", "resync") else ("source", "target"):
        if not getattr(settings, role):
            raise UsageError(f"no {role} given: pass --{role} DSN or set PGFERRY_{role.upper()}")
    src, dst, slot, schema = settings.source, settings.target, settings.slot, settings.state_schema
    if args.command == "skip":
        from .status import request_skip
        return request_skip(dst, slot, schema, args.lsn)
    if args.command == "resync":
        from ..sync.resync import run_resync
        return run_resync(dst, slot, schema, args.table, None if args.no_wait else args.timeout)
    if args.command == "status":
        from .status import run_status, watch_status
        if args.watch:
            return watch_status(src, dst, slot, schema, args.watch, args.iterations)
        return run_status(src, dst, slot, schema, args.json,
                          guard=(settings.max_retained_wal, settings.min_safe_wal))
    if args.command == "verify":
        from ..cutover.verify import print_results, verify
        tables = [t.strip() for t in args.tables.split(",")] if args.tables else None
        if args.online:
            from ..cutover.fallback import reverse_of
            from ..cutover.online import print_online, verify_online
            if reverse_of(src, dst, schema, slot) is not None:
                raise PgferryError("verify --online compares the forward direction; after a cutover with --fallback "
                                   "the daemon streams back: run `pgferry verify` against the servers swapped, or "
                                   "`pgferry rollback`, whose verify runs under its fence")
            res = verify_online(src, dst, settings.publication, slot, schema, tables, args.mode, args.timeout,
                                args.max_rate, progress=sys.stderr)
            return print_online(res, args.json)
        results = verify(src, dst, settings.publication, tables, args.mode)
        return print_results(results, args.json)
    if args.command == "repair":
        from ..cutover.fallback import reverse_of
        from ..cutover.repair import run_repair
        if reverse_of(src, dst, schema, slot) is not None:
            raise PgferryError("repair works on the forward direction, before the cutover")
        tables = [t.strip() for t in args.tables.split(",")] if args.tables else None
        return run_repair(src, dst, settings.publication, slot, schema, tables, args.apply, args.timeout,
                          args.max_rate, args.json)
    if args.command in ("cutover", "rollback"):
        from ..cutover.handoff import CutoverOptions, run_cutover, run_rollback
        opts = CutoverOptions(fence=args.fence, timeout=args.timeout, receipt_path=args.receipt,
                              verify_mode=args.verify, fence_wait=args.fence_wait, pgbouncer=args.pgbouncer,
                              pgbouncer_database=args.pgbouncer_database, pgbouncer_config=args.pgbouncer_config,
                              pgbouncer_target=args.pgbouncer_target, switch_command=args.switch_command,
                              switch_timeout=args.switch_timeout, fallback=getattr(args, "fallback", False),
                              online_max_rate=args.max_rate, online_rounds=args.catch_up_rounds)
        if args.command == "rollback":
            return run_rollback(src, dst, settings.publication, slot, schema, opts, undo=args.undo)
        return run_cutover(src, dst, settings.publication, slot, schema, opts, undo=args.undo)
    if args.command == "fallback":
        from ..cutover.fallback import run_fallback_stop
        return run_fallback_stop(src, dst, schema, slot)
    if args.command in ("pause", "resume"):
        from ..cutover.fallback import reverse_of
        from ..stream import pause

        reverse = reverse_of(src, dst, schema, slot)
        if reverse is not None:  # after a cutover with --fallback: the daemon streams back into the old source
            src, dst, slot = reverse.source, reverse.target, reverse.slot
        if args.command == "resume":
            found = pause.release(dst, schema, slot)
            print("pgferry resume: " + ("the daemon applies again" if found else "it was not paused"),
                  file=sys.stderr)
            return 0
        pause.request(dst, schema, slot, "pgferry pause")
        if not pause.daemon_streaming(src, slot):
            print("pgferry pause: no `pgferry start` streams now; the pause is recorded and holds once it starts "
                  "(`pgferry resume` withdraws it)", file=sys.stderr)
            return 0
        held = pause.wait_paused(dst, schema, slot, args.timeout, lambda: pause.daemon_streaming(src, slot))
        print(f"pgferry pause: paused at {held.paused_lsn}: nothing is applied until `pgferry resume`; the slot "
              "keeps the source's WAL meanwhile (`pgferry status` shows how much)", file=sys.stderr)
        return 0
    from ..cutover.cleanup import run_cleanup
    return run_cleanup(src, dst, slot, schema, args.drop_state)


def load_hook(spec: str, what: str = "--message-hook") -> Callable[..., object]:
    """`package.module:function` -> the function, or a UsageError naming what is wrong."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r}: expected MODULE:FUNCTION, e.g. myhooks:on_message")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} {spec!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{what} {spec!r}: {module_name} has no function {attr}")
    return fn


def _start(st: config.Settings, args: argparse.Namespace | None = None) -> int:
    from ..stream import metrics
    from . import logs
    from .priority import lower_priority

    lower_priority(st.nice)  # first: the threads started from here on inherit it
    json_logs = logs.setup(st.log_level, st.log_format)
    if not st.target:
        raise UsageError("no target given: pass --target DSN or set PGFERRY_TARGET")
    if not st.source:
        raise UsageError("no source given: pass --source DSN or set PGFERRY_SOURCE")
    if st.message_hook:  # a bad hook or conflict setting: an error before anything starts
        load_hook(st.message_hook)
    config.policies(st, load_hook)
    if st.metrics_port:
        metrics.serve(st.metrics_port, st, st.metrics_address)
    from ..cutover import fallback
    from ..cutover.control import check_start
    from .preflight import preflight_for_start

    reverse = fallback.reverse_of(st.source, st.target, st.state_schema, st.slot)
    if reverse is not None:  # after a cutover with --fallback: the new server's writes, back to the old
        return _stream(st, args, reverse)
    preflight_for_start(st)
    check_start(st.source, st.target, st.state_schema, st.slot)
    if st.ddl_capture:  # before the slot's snapshot: every schema change after it is captured
        from ..ddl.capture import install_for_start

        install_for_start(st.source, st.state_schema)
    if st.copy:
        from ..sync.initial import InitialSync, SyncConfig

        sync_cfg = SyncConfig(source=st.source, target=st.target, publication=st.publication, slot=st.slot,
                              schema=st.state_schema, schema_copy=st.schema, tables=st.tables,
                              hold_back=st.hold_back_constraints, progress_seconds=st.progress_interval,
                              progress_bars=not json_logs and sys.stderr.isatty())
        if st.jobs:
            sync_cfg.jobs = st.jobs
        metrics.STATE.phase = "copy"  # "schema" while the tables are created: the sync says so

        def phase(name: str) -> None:
            metrics.STATE.phase = name

        def progress(p: object) -> None:
            metrics.STATE.copy = p

        InitialSync(sync_cfg, on_phase=phase, on_progress=progress).run()
        from sink import failpoints

        failpoints.hit("before_stream")  # the copy is done and recorded; streaming has not started
    if st.hold_back_constraints:  # (the sync held back before its copy; this is for what came since)
        from ..sync.holdback import hold_migrated

        hold_migrated(st.source, st.target, st.state_schema, st.slot, st.publication, st.tables)
    return _stream(st, args, None)


def _stream(st: config.Settings, args: argparse.Namespace | None, reverse: Reverse | None) -> int:
    """Stream forward, or in reverse after a cutover with --fallback; a forward daemon whose handoff
    comes with a fallback turns around once the cutover has made the reverse slot."""
    from ..cutover import fallback
    from ..stream import metrics
    from ..stream.session import StreamConfig, run_stream
    from ..stream.stopflag import StopFlag
    from ..stream.throttle import Throttle

    hook = load_hook(st.message_hook) if st.message_hook else None

    def reload() -> tuple[object, BatchLimits]:
        """SIGHUP: the settings again (file, env, the same flags): budgets and batch limits."""
        fresh = config.load(args.config, _flags(args)) if args is not None else st
        return config.budgets(fresh), _limits(fresh)

    stop = StopFlag()
    stop.install()
    while True:
        source, target, publication, slot = ((st.source, st.target, st.publication, st.slot) if reverse is None
                                             else (reverse.source, reverse.target, reverse.publication, reverse.slot))
        throttle = metrics.STATE.throttle = Throttle(config.budgets(st))
        cfg = StreamConfig(source=source, target=target, publication=publication, slot=slot,
                           schema=st.state_schema, spool_dir=st.spool_dir, message_hook=hook,
                           network_timeout=st.network_timeout, policies=config.policies(st, load_hook),
                           limits=_limits(st), throttle=throttle, reload=reload, ddl=st.ddl,
                           keep_constraints=st.keep_constraints, dropped_columns=st.dropped_columns,
                           ddl_tables=config.ddl_tables(st))
        metrics.STATE.phase = "streaming"
        metrics.STATE.direction = "forward" if reverse is None else "reverse"
        metrics.STATE.streaming = (source, slot)
        guard = None
        if reverse is not None:
            log.info("streaming back: the new server's writes (slot %s) into the old source (fallback)", slot)
            if st.fallback_max_wal:
                guard = fallback.Guard(reverse, st.fallback_max_wal, stop).start()
        try:
            rc = run_stream(cfg, stop)
        finally:
            if guard is not None:
                guard.done.set()
        if guard is not None and guard.over:
            guard.drop_now(st.target, st.state_schema, st.slot)
        if rc != 0 or stop.set or reverse is not None:
            return rc
        reverse = fallback.await_reverse(st.source, st.target, st.state_schema, st.slot, stop)
        if reverse is None:
            return 0

