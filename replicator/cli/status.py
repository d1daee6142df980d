"""`pgferry status [--json]`: where the migration is, from any machine that reaches both databases.

Everything comes from the target's state schema and the source's catalog, so it works whether the
daemon runs or not. `lag_seconds` is the time since the stored progress last moved while the
target is behind (0 when caught up): the age of the oldest change not yet applied, as seen from
the progress row, which the daemon updates at least every second while it has work.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import msgspec

from decoder import Lsn
from sink.state import quote_ident, readable_name

from ..cutover import control as cutover_control
from ..cutover import fallback, fence
from ..source import connect, read_state
from ..stream import pause
from ..sync import holdback
from ..sync.copy import read_running_copies, table_sizes
from ..sync.holdback import HeldBack
from ..sync.plan import TableCopy
from ..sync.progress import CopyModel, Estimate, format_eta
from ..sync.progress_view import text_bar

if TYPE_CHECKING:
    from rich.console import RenderableType  # rich is imported when the view is drawn


class ConflictCount(msgspec.Struct):
    table: str
    kind: str
    count: int


class TableStatus(msgspec.Struct):
    name: str
    state: str
    rows: int | None
    # during the initial copy: how far this table is (100 once copied; a running one stays below
    # 100 until it has finished) and the rows the source's statistics expect (replicator/sync/progress.py)
    percent: float | None = None
    rows_estimate: int | None = None


class Status(msgspec.Struct):
    phase: str
    applied_lsn: str | None
    source_lsn: str
    lag_bytes: int | None
    lag_seconds: float | None
    rows_applied: int
    conflicts: int
    daemon_running: bool
    slot: str
    slot_wal_status: str | None
    slot_retained_wal_bytes: int | None
    slot_safe_wal_size: int | None
    last_source_commit: str | None
    cutover: str | None
    tables: list[TableStatus]
    conflicts_by_table: list[ConflictCount] = []
    wal_guard: str | None = None  # why the slot is in danger (max_retained_wal / min_safe_wal), or None
    # foreign keys, triggers and rules held back until cutover (replicator/sync/holdback.py), and their state
    held_back: list[HeldBack] = []
    # schema changes captured on the source, by what became of them (applied, skipped, rejected, not migrated)
    ddl: dict[str, int] = {}
    # the cutover's state (requested, cancelled, handed_off, done, undone), the source tables a
    # pgferry fence is up on, and what to run when a cutover was interrupted
    cutover_state: str | None = None
    fenced_tables: int = 0
    action: str | None = None
    # "reverse" once a cutover with --fallback is done: the new server streams back into the old
    # source; `fallback`: its state, slot, applied LSN, lag and the WAL the slot keeps on the new server
    direction: str = "forward"
    fallback: dict[str, Any] | None = None
    # `pgferry pause` or `verify --online`: who asked, since when, and where the daemon holds (None:
    # not yet); phase is "paused" while a running daemon holds
    pause: dict[str, Any] | None = None
    # during the initial copy (phase copy, or stopped in it): tables_done, tables, rows, bytes_done,
    # bytes_total (the tables' size on the source), percent, rate (bytes/s since the copy started;
    # None when no daemon copies), eta_seconds, running (per table being copied: table, percent,
    # rows, rows_estimate, bytes_done, bytes_total, eta_seconds)
    copy: dict[str, Any] | None = None


def collect(source: str, target: str, slot: str, schema: str,
            guard: tuple[int | None, int | None] = (None, None)) -> Status:
    """`guard`: (max_retained_wal, min_safe_wal) from the settings, for `wal_guard`."""
    src = connect(source, "source")
    try:
        with src.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()::text")
            (source_lsn,) = cur.fetchone()
            safe = "safe_wal_size" if src.server_version >= 130000 else "NULL::bigint"
            cur.execute(f"SELECT active, wal_status, pg_current_wal_lsn() - restart_lsn, {safe} "
                        "FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            slot_row = cur.fetchone()
            # during the initial copy the slot is not streamed yet: the daemon then shows as the
            # replication connection that holds the exported snapshot
            cur.execute("SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'walsender' "
                        "AND application_name = 'pgferry' AND datname = current_database()")
            (copying_walsender,) = cur.fetchone()
            fenced = fence.fenced_tables(cur)
        src.rollback()
        return _collect(src, source_lsn, slot_row, copying_walsender, fenced, source, target, slot, schema, guard)
    finally:
        src.close()


def _collect(src: Any, source_lsn: str, slot_row: Any, copying_walsender: bool, fenced: list, source: str,
             target: str, slot: str, schema: str, guard: tuple[int | None, int | None]) -> Status:
    def read(cur: Any, s: str) -> tuple:
        cur.execute(f"SELECT applied_lsn::text, rows_applied, updated_at, source_commit_time "
                    f"FROM {s}.progress WHERE slot_name = %s", (slot,))
        progress = cur.fetchone()
        # (copy_started_at: a column newer than the state schema may be)
        cur.execute(f"SELECT phase, extract(epoch FROM now() - (to_jsonb(y) ->> 'copy_started_at')::timestamptz) "
                    f"FROM {s}.sync y WHERE slot_name = %s", (slot,))
        sync = cur.fetchone()
        running = read_running_copies(cur) if sync is not None and sync[0] == "copy" else {}
        # rows of a table being copied: what its running COPYs have written so far
        cur.execute(f"""SELECT t.schema_name, t.table_name, t.state,
                CASE WHEN t.state = 'copying' THEN (
                    SELECT sum(p.tuples_processed) FROM pg_stat_progress_copy p
                    JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = t.schema_name AND c.relname = t.table_name) ELSE t.rows END,
                t.copied_at < now() - make_interval(secs => %s)
            FROM {s}.tables t WHERE t.slot_name = %s ORDER BY 1, 2""", (sync[1] if sync else None, slot))
        found = cur.fetchall()
        tables = [TableStatus(readable_name(n, t), st, None if r is None else int(r)) for n, t, st, r, _ in found]
        names = {readable_name(n, t): (n, t) for n, t, *_ in found}
        earlier = {readable_name(n, t) for n, t, _, _, before in found if before}
        cur.execute(f"SELECT state, handoff_lsn::text FROM {s}.control WHERE slot_name = %s", (slot,))
        control = cur.fetchone()
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{s}.conflicts",))
        conflicts = []
        if cur.fetchone()[0]:
            cur.execute(f"SELECT table_name, kind, count(*) FROM {s}.conflicts WHERE slot_name = %s "
                        "GROUP BY 1, 2 ORDER BY 1, 2", (slot,))
            conflicts = [ConflictCount(t, k, int(n)) for t, k, n in cur.fetchall()]
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{s}.held_back",))
        held = holdback.listing(cur, schema, slot) if cur.fetchone()[0] else []
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{s}.ddl",))
        ddl: dict[str, int] = {}
        if cur.fetchone()[0]:
            cur.execute(f"SELECT result, count(*) FROM {s}.ddl WHERE slot_name = %s GROUP BY 1 ORDER BY 1", (slot,))
            ddl = {r: int(n) for r, n in cur.fetchall()}
        return progress, sync, tables, control, conflicts, held, ddl, (running, names, earlier)

    found = read_state(target, schema, read)
    progress, sync, tables, control, conflicts, held, ddl, (copies, names, earlier) = (
        found if found is not None else (None, None, [], None, [], [], {}, ({}, {}, set())))
    running = bool(slot_row and slot_row[0]) or bool(copying_walsender and sync is not None and sync[0] != "streaming")
    holding = pause.read(target, schema, slot) if progress is not None else None
    record = cutover_control.read(target, schema, slot) if control else None
    if sync is not None and sync[0] == "done" and (record is None or record.state == "done"):
        phase = "done"
    elif progress is None:
        phase = "preflight"
    elif sync is not None and sync[0] != "streaming":
        phase = sync[0] if running else "stopped"
    elif holding is not None and holding.paused_lsn is not None and running:
        phase = "paused"
    else:
        phase = "streaming" if running else "stopped"
    copying = None
    if sync is not None and sync[0] == "copy" and tables:
        copying = copy_progress(src, tables, names, earlier, copies,
                                float(sync[1]) if sync[1] is not None and running else None)
    applied = progress[0] if progress else None
    lag_bytes = lag_seconds = None
    if applied is not None:
        lag_bytes = max(0, int(Lsn.parse(source_lsn)) - int(Lsn.parse(applied)))
        lag_seconds = 0.0
        if lag_bytes > 0 and progress[2] is not None:
            lag_seconds = round(max(0.0, (datetime.now(UTC) - progress[2]).total_seconds()), 3)
    return Status(
        phase=phase, applied_lsn=applied, source_lsn=source_lsn, lag_bytes=lag_bytes, lag_seconds=lag_seconds,
        rows_applied=int(progress[1]) if progress else 0, conflicts=sum(c.count for c in conflicts),
        daemon_running=running, slot=slot,
        slot_wal_status=slot_row[1] if slot_row else None,
        slot_retained_wal_bytes=int(slot_row[2]) if slot_row and slot_row[2] is not None else None,
        slot_safe_wal_size=int(slot_row[3]) if slot_row and slot_row[3] is not None else None,
        last_source_commit=progress[3].isoformat() if progress and progress[3] else None,
        cutover=f"{control[0]} at {control[1]}" if control and control[1] else (control[0] if control else None),
        tables=tables, conflicts_by_table=conflicts, wal_guard=_guard(slot_row, guard), held_back=held,
        ddl=ddl, cutover_state=control[0] if control else None, fenced_tables=len(fenced),
        action=cutover_control.advice(record, fenced),
        direction="reverse" if record is not None and record.state == "done" and record.fallback
        and record.fallback.get("state") == "active" else "forward",
        fallback=fallback.status(source, target, schema, record.fallback) if record and record.fallback else None,
        pause=None if holding is None else {
            "requested_by": holding.requested_by, "requested_at": holding.requested_at.isoformat(),
            "at_lsn": holding.at_lsn, "paused_lsn": holding.paused_lsn,
            "paused_since": holding.paused_since.isoformat() if holding.paused_since else None},
        copy=copying)


def copy_progress(src: Any, tables: list[TableStatus], names: dict[str, tuple[str, str]], earlier: set[str],
                  running: dict[str, tuple[int, int]], took: float | None) -> dict[str, Any]:
    """The initial copy's progress (replicator/sync/progress.py) from the tables' states, the
    COPYs running on the target (`running`) and the tables' sizes and row estimates on the source
    (now, not in the copy's snapshot: close enough for an estimate). `names`: each table's schema
    and name; `earlier`: tables copied before this copy started (not in its rate); `took`: seconds
    since it started (None: no daemon copies, so no rate). Sets each table's `percent` and
    `rows_estimate`, and shows a table whose COPY runs as copying."""
    sizes = table_sizes(src, [TableCopy(n, t) for n, t in names.values()])
    estimates = {t.name: Estimate(*sizes[t.name][1:]) if t.name in sizes else Estimate(0, None) for t in tables}
    model = CopyModel(estimates, 0.0)
    for t in tables:
        if t.state == "copied":
            model.finish(t.name, t.rows or 0, earlier=t.name in earlier)
    p = model.observe(took or 0.0, running)
    by_name = {r.name: r for r in p.running}
    for t in tables:
        t.rows_estimate = estimates[t.name].rows
        t.percent = 100.0 if t.state == "copied" else (by_name[t.name].percent if t.name in by_name else 0.0)
        if t.state == "pending" and t.name in by_name:  # a small table is not marked before its copy
            t.state, t.rows = "copying", by_name[t.name].rows
    fields = p.fields()
    if took is None:
        fields.update(rate=None, eta_seconds=None)
        for r in fields["running"]:
            r["eta_seconds"] = None
    return fields


def _guard(slot_row: Any, guard: tuple[int | None, int | None]) -> str | None:
    if not slot_row:
        return None
    retained, safe = slot_row[2], slot_row[3]
    if guard[0] and retained is not None and int(retained) > guard[0]:
        return f"the slot retains {int(retained) >> 20} MiB of WAL (max_retained_wal {guard[0] >> 20} MiB)"
    if guard[1] and safe is not None and int(safe) < guard[1]:
        return f"safe_wal_size is {int(safe) >> 20} MiB (min_safe_wal {guard[1] >> 20} MiB)"
    return None


def run_status(source: str, target: str, slot: str, schema: str, as_json: bool, out: IO[str] = sys.stdout,
               guard: tuple[int | None, int | None] = (None, None)) -> int:
    st = collect(source, target, slot, schema, guard)
    if as_json:
        out.write(msgspec.json.encode(st).decode() + "\n")
        return 0
    lines = [
        f"phase         {st.phase} (daemon {'running' if st.daemon_running else 'not running'})",
        f"applied LSN   {st.applied_lsn or '-'}   source LSN {st.source_lsn}",
        f"lag           {st.lag_bytes if st.lag_bytes is not None else '-'} bytes, "
        f"{st.lag_seconds if st.lag_seconds is not None else '-'} s",
        f"rows applied  {st.rows_applied}   conflicts {st.conflicts}",
        f"slot          {st.slot}: wal_status {st.slot_wal_status or 'missing'}, retains "
        f"{_mb(st.slot_retained_wal_bytes)}" + (f", safe_wal_size {_mb(st.slot_safe_wal_size)}"
                                                if st.slot_safe_wal_size is not None else ""),
    ]
    if st.copy:
        lines.append(f"copy          {copy_summary(st.copy)}")
    if st.ddl:
        lines.append("schema changes " + ", ".join(f"{n} {r}" for r, n in sorted(st.ddl.items())))
    if st.cutover:
        lines.append(f"cutover       {st.cutover}")
    if st.fenced_tables:
        lines.append(f"fence         up: {st.fenced_tables} source table(s) refuse writes")
    if st.pause:
        p = st.pause
        lines.append(f"pause         asked by {p['requested_by']}: " + (
            f"holding at {p['paused_lsn']} since {p['paused_since']}" if p["paused_lsn"] else "not holding yet"))
    if st.fallback:
        fb = st.fallback
        daemon = "streaming back" if fb.get("streaming") else "not running"
        lines.append(f"fallback      {fb['state']}" + (
            f": {fb['slot']} on the target, applied {fb.get('applied_lsn') or '-'}, lag {_mb(fb.get('lag_bytes'))}, "
            f"retains {_mb(fb.get('retained_wal_bytes'))} (daemon {daemon})" if fb["state"] == "active" else ""))
    if st.action:
        lines.append(f"TO DO         {st.action}")
    if st.wal_guard:
        lines.append(f"WAL GUARD     {st.wal_guard}")
    for c in st.conflicts_by_table:
        lines.append(f"  conflicts {c.table:<30} {c.kind:<16} {c.count}")
    running = {r["table"]: r for r in st.copy["running"]} if st.copy else {}
    for t in st.tables:
        text = f"  {t.name:<40} {t.state:<8} {t.rows if t.rows is not None else ''}"
        if t.percent is not None and t.state != "copied":
            text += f" ({t.percent:.1f}%" + (f", ETA {format_eta(running[t.name]['eta_seconds'])}"
                                            if t.name in running else "") + ")"
        lines.append(text)
    held = [h for h in st.held_back if h.state != "validated"]
    if held:
        lines.append(f"held back     {len(held)} until cutover (created, validated when the target takes over):")
    for h in held:
        lines.append(f"  {h.kind:<12} {h.name} on {h.table}: {h.state}" + (f" ({h.detail})" if h.detail else ""))
    out.write("\n".join(lines) + "\n")
    return 0


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def copy_summary(c: dict[str, Any]) -> str:
    """`status`'s line for the initial copy (`Status.copy`)."""
    rate = f", {c['rate'] / 1e6:,.1f} MB/s, ETA {format_eta(c['eta_seconds'])}" if c["rate"] else ""
    return (f"{c['percent']:.1f}% of ~{_mb(c['bytes_total'])}, {c['tables_done']}/{c['tables']} tables, "
            f"{c['rows']:,} rows" + rate)


def hold_best(st: Status, best: dict[str, float]) -> None:
    """`status --watch`: the copy's percents never go back from one refresh to the next (a COPY
    that has ended a moment before its table is marked copied, an estimate the source's
    autovacuum has just changed); `best` keeps the highest seen."""
    if st.copy is None:
        return
    st.copy["percent"] = best[""] = max(best.get("", 0.0), st.copy["percent"])
    for t in st.tables:
        if t.percent is not None:
            t.percent = best[t.name] = max(best.get(t.name, 0.0), t.percent)
    for r in st.copy["running"]:
        r["percent"] = best.get(r["table"], r["percent"])


def watch_status(source: str, target: str, slot: str, schema: str, interval: float,
                 iterations: int | None = None) -> int:
    """`status --watch`: a live terminal view, redrawn every `interval` seconds until Ctrl-C (or
    `iterations` refreshes): phase, LSNs, lag, apply and copy rates, per-table progress."""
    import time

    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=False)
    prev: tuple[float, Status] | None = None
    lags: list[int] = []  # the lag at each refresh, for the sparkline
    best: dict[str, float] = {}  # the copy's percents: never back
    n = 0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            now = time.monotonic()
            st = collect(source, target, slot, schema)
            hold_best(st, best)
            lags = ([*lags, st.lag_bytes] if st.lag_bytes is not None else lags)[-SPARK:]
            live.update(_view(st, prev, now, lags), refresh=True)
            prev = (now, st)
            n += 1
            if (iterations is not None and n >= iterations) or (st.phase == "done" and st.direction != "reverse"):
                return 0
            try:
                time.sleep(interval)
            except KeyboardInterrupt:
                return 0


SPARK = 40  # refreshes the lag sparkline shows
_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    """The values as a row of block characters, scaled to their own maximum (a trend, not numbers)."""
    top = max(values, default=0)
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, v * len(_BARS) // (top + 1))] for v in values)


def catch_up(st: Status, prev: tuple[float, Status] | None, now: float) -> str | None:
    """The catch-up ETA: lag over the rate at which it shrank since the last refresh."""
    if prev is None or st.lag_bytes is None or prev[1].lag_bytes is None or now <= prev[0]:
        return None
    if st.lag_bytes == 0:
        return "caught up"
    shrink = (prev[1].lag_bytes - st.lag_bytes) / (now - prev[0])
    if shrink <= 0:
        return "not shrinking"
    return f"{st.lag_bytes / shrink:,.0f} s at {shrink / 1e6:,.1f} MB/s"


def _view(st: Status, prev: tuple[float, Status] | None, now: float, lags: list[int] | None = None) -> RenderableType:
    from rich.console import Group
    from rich.table import Table

    rate = copy_rate = None
    if prev is not None and now > prev[0]:
        took = now - prev[0]
        rate = (st.rows_applied - prev[1].rows_applied) / took
        before = {t.name: t.rows or 0 for t in prev[1].tables}
        copy_rate = sum(max(0, (t.rows or 0) - before.get(t.name, 0)) for t in st.tables if t.state == "copying") / took
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("phase", f"{st.phase} (daemon {'running' if st.daemon_running else 'not running'})")
    head.add_row("applied / source", f"{st.applied_lsn or '-'} / {st.source_lsn}")
    head.add_row("lag", f"{_mb(st.lag_bytes)}, {st.lag_seconds if st.lag_seconds is not None else '-'} s"
                 + (f"  {sparkline(lags)}" if lags and len(lags) > 1 else ""))
    eta = catch_up(st, prev, now)
    if eta is not None and st.phase in ("streaming", "paused", "stopped"):
        head.add_row("catch-up", eta)
    head.add_row("rows applied", f"{st.rows_applied:,}" + (f"  ({rate:,.0f}/s)" if rate is not None else ""))
    head.add_row("slot", f"{st.slot}: {st.slot_wal_status or 'missing'}, retains {_mb(st.slot_retained_wal_bytes)}"
                 + (f", safe_wal_size {_mb(st.slot_safe_wal_size)}" if st.slot_safe_wal_size is not None else ""))
    if st.cutover:
        head.add_row("cutover", st.cutover)
    if st.fenced_tables:
        head.add_row("fence", f"up: {st.fenced_tables} source table(s) refuse writes")
    if st.pause:
        p = st.pause
        head.add_row("pause", f"asked by {p['requested_by']}: " + (f"holding at {p['paused_lsn']}" if p["paused_lsn"]
                                                                    else "not holding yet"))
    if st.fallback:
        fb = st.fallback
        head.add_row("fallback", f"{fb['state']}" + (
            f", streaming back: applied {fb.get('applied_lsn') or '-'}, lag {_mb(fb.get('lag_bytes'))}, the new "
            f"server keeps {_mb(fb.get('retained_wal_bytes'))} of WAL" + ("" if fb.get("streaming") else
                                                                           " [bold red](no daemon)[/]")
            if fb["state"] == "active" else ""))
    if st.action:
        head.add_row("to do", f"[bold red]{st.action}[/]")
    if st.copy:
        c = st.copy
        head.add_row("copy", f"[green]{text_bar(c['percent'])}[/] {c['percent']:.1f}%"
                     + (f"  ETA {format_eta(c['eta_seconds'])}" if c["rate"] else ""))
        head.add_row("copied", f"{_mb(c['bytes_done'])} of ~{_mb(c['bytes_total'])}, {c['tables_done']}/{c['tables']} "
                     f"tables, {c['rows']:,} rows" + (f", {c['rate'] / 1e6:,.1f} MB/s" if c["rate"] else ""))
    parts: list[RenderableType] = [head]
    if st.tables:
        tables = Table(title="tables" + (f" (copying {copy_rate:,.0f} rows/s)" if copy_rate else ""),
                       title_justify="left")
        tables.add_column("table")
        tables.add_column("state")
        tables.add_column("rows", justify="right")
        if st.copy:
            tables.add_column("%", justify="right")
            tables.add_column("ETA", justify="right")
        running = {r["table"]: r for r in st.copy["running"]} if st.copy else {}
        for t in st.tables:
            style = {"copied": "green", "copying": "yellow"}.get(t.state, "")
            cells = [t.name, f"[{style}]{t.state}[/]" if style else t.state,
                     f"{t.rows:,}" if t.rows is not None else ""]
            if st.copy:
                cells.append(f"{t.percent:.1f}%" if t.percent is not None else "")
                cells.append(format_eta(running[t.name]["eta_seconds"]) if t.name in running else "")
            tables.add_row(*cells)
        parts.append(tables)
    return Group(*parts)


def request_skip(target: str, slot: str, schema: str, lsn_text: str) -> int:
    """`pgferry skip --lsn X/Y`: the next start skips the source transaction committed at that LSN
    (its conflicting change stays in the dead-letter table)."""
    from sink import state

    from ..errors import UsageError

    try:
        lsn = Lsn.parse(lsn_text)
    except ValueError:
        raise UsageError(f"--lsn {lsn_text!r}: expected an LSN like 0/16B3748 (the commit LSN the stop "
                         "named)") from None
    dst = connect(target, "target")
    try:
        cur = dst.cursor()
        state.ensure_schema(cur, schema)
        cur.execute(f"INSERT INTO {quote_ident(schema)}.skip (slot_name, lsn) VALUES (%s, %s::pg_lsn) "
                    "ON CONFLICT DO NOTHING", (slot, str(lsn)))
        dst.commit()
    finally:
        dst.close()
    print(f"the next `pgferry start` skips the source transaction committed at {lsn} (slot {slot})")
    return 0
