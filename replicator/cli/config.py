"""Settings: flags > environment (PGFERRY_<KEY>) > config file (`--config pgferry.toml`) > defaults.

Every layer is validated against the same msgspec Struct; a bad key or value is a usage error
(exit 2) that names the key, where it came from and the expected form. Passwords belong in the
DSN, `PGPASSWORD` or `~/.pgpass`; pgferry never prints a DSN's password (see `masked`).
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Annotated, Any, Literal, get_args, get_type_hints

import msgspec

from sink.apply import BatchLimits
from sink.state import readable_name

from ..errors import UsageError

_LIMITS = BatchLimits()

Positive = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Nice = Annotated[int, msgspec.Meta(ge=0, le=19)]


PolicyName = Literal["error", "skip", "overwrite", "keep-newer"]
SkipOrError = Literal["error", "skip"]


class TableConflicts(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    insert_exists: PolicyName | None = None
    update_missing: PolicyName | None = None  # overwrite / keep-newer on a missing row: insert it
    delete_missing: SkipOrError | None = None
    apply_error: SkipOrError | None = None
    newer_column: str | None = None


class ConflictSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    insert_exists: PolicyName = "error"
    update_missing: PolicyName = "skip"
    delete_missing: SkipOrError = "skip"
    apply_error: SkipOrError = "error"
    newer_column: str | None = None  # for keep-newer
    hook: str | None = None  # module:function deciding every conflict instead of the policies
    tables: dict[str, TableConflicts] = {}


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # connections
    source: str = ""
    target: str = ""
    # what to replicate and where pgferry keeps its state
    publication: str = "pgferry"
    slot: str = "pgferry"
    state_schema: str = "pgferry"
    tables: list[str] | None = None
    # schema changes on the source while migrating (sink/ddl.py): apply, stop before one, or skip;
    # captured by an event trigger pgferry installs on the source (a superuser's), else followed as
    # far as the stream shows them
    ddl: Literal["apply", "stop", "skip"] = "apply"
    ddl_capture: bool = True
    dropped_columns: Literal["keep", "drop"] = "keep"  # without capture: a column dropped on the source
    # [ddl_tables] "schema.table" = "skip" (file only): the ddl policy for changes to that table
    ddl_tables: dict[str, Literal["apply", "stop", "skip"]] = {}
    # initial sync
    copy: bool = True
    schema: bool = True
    jobs: Positive | None = None
    # what would fire during apply on a target without the replica role (replicator/sync/holdback.py):
    # hold it back until cutover, or keep it knowingly (it fires; applied one by one)
    hold_back_constraints: bool = False
    keep_constraints: bool = False
    # apply
    batch_rows: Positive = _LIMITS.rows  # the sink's defaults (sink.apply.BatchLimits), measured there
    batch_bytes: Positive = _LIMITS.bytes
    batch_ms: PositiveFloat = _LIMITS.seconds * 1000
    spool_dir: str | None = None
    network_timeout: PositiveFloat = 30.0
    message_hook: str | None = None
    # operation
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "text", "json"] = "auto"
    progress_interval: PositiveFloat = 5.0  # seconds between the copy's progress log lines
    metrics_port: Port | None = None
    metrics_address: str = "0.0.0.0"  # all interfaces (a container's port mapping needs them)
    nice: Nice = 10  # CPU priority below the servers' (replicator/cli/priority.py); 0: unchanged
    # throttling (changeable while running: edit the file, then SIGHUP)
    max_rows_per_second: PositiveFloat | None = None
    max_bytes_per_second: PositiveFloat | None = None
    max_retained_wal: Positive | None = None  # bytes: the WAL guard warns when the slot retains more
    min_safe_wal: Positive | None = None  # bytes: ... or when safe_wal_size falls under this
    lift_throttle_on_wal_danger: bool = True
    # bytes: after a cutover with --fallback, the reverse daemon drops the reverse slot (the way
    # back) when it keeps more WAL than this on the new server (warning at 80%); unset: never
    fallback_max_wal: Positive | None = None
    # [conflicts] and [conflicts.tables."schema.table"] (file only)
    conflicts: ConflictSettings = msgspec.field(default_factory=ConflictSettings)


FIELDS = Settings.__struct_fields__
NESTED = ("conflicts", "ddl_tables")  # sections: from the config file only

EXAMPLE = f"""\
# pgferry configuration. Precedence: command-line flags > environment variables
# (PGFERRY_<KEY>, e.g. PGFERRY_BATCH_ROWS=20000) > this file > the defaults shown here.
# Unknown keys are an error. Passwords: put them in PGPASSWORD or ~/.pgpass rather than
# here; pgferry never prints them.

# Source and target: libpq connection strings or URIs.
source = "host=old-db.example.com dbname=app user=pgferry"
target = "postgresql://pgferry@new-db.example.com/app"

# The publication and slot pgferry creates (or reuses) on the source, and the schema on the
# target where it keeps its progress and state.
publication = "pgferry"
slot = "pgferry"
state_schema = "pgferry"

# Publish only these tables (schema.table or table) when pgferry creates the publication.
# Default: all tables.
# tables = ["public.accounts", "public.orders"]

# Schema changes made on the source while migrating: "apply" them on the target at the
# position they happened, "stop" before one, or "skip" them. They are captured by an event
# trigger pgferry installs in the source database (it takes a superuser; `pgferry cleanup`
# removes it); without it, pgferry follows what the stream shows: added and dropped columns and
# new tables.
ddl = "apply"
ddl_capture = true
# Without capture, a column dropped on the source is kept on the target (made nullable), or
# "drop"ped there too.
dropped_columns = "keep"

# Initial sync: copy the data (false: the target already holds it as of the slot's creation)
# and the schema (false: the tables were made by hand; they are checked).
copy = true
schema = true
# Tables (or block ranges of big tables) copied at once. Default: CPUs, at most 4.
# jobs = 4
# A target role that may not set session_replication_role = replica would fire the target's
# foreign keys, user triggers and rules during apply. pgferry holds back those of the schema it
# copies until cutover; on tables made by hand (schema = false), choose: hold them back too
# (recorded in the state schema, dropped, created again at cutover or cleanup), or keep them
# knowingly (they fire; their tables are applied one by one).
hold_back_constraints = false
keep_constraints = false

# Apply: a target transaction commits after this many row changes, bytes of changes, or
# milliseconds, whichever comes first.
batch_rows = {_LIMITS.rows}
batch_bytes = {_LIMITS.bytes}
batch_ms = {_LIMITS.seconds * 1000}
# Where large in-progress transactions are spooled. Default: the temp directory.
# spool_dir = "/var/lib/pgferry/spool"
# Seconds of silence from the source after which the connection is re-opened.
network_timeout = 30.0
# Called with each pg_logical_emit_message() message, as MODULE:FUNCTION.
# message_hook = "myhooks:on_message"

# Logs: debug, info, warning or error; format auto (text on a terminal, JSON lines
# otherwise), text or json.
log_level = "info"
log_format = "auto"
# The initial copy's progress: live bars on a terminal with text logs; otherwise a log line
# (with structured fields in JSON logs) every progress_interval seconds.
progress_interval = 5.0
# Serve Prometheus metrics on this port. Default: off. metrics_address: the interface to listen on
# (default 0.0.0.0, all of them; 127.0.0.1 keeps the endpoint on this machine).
# metrics_port = 9187
# metrics_address = "127.0.0.1"
# CPU priority (nice value, 0-19) of the daemon: by default below the database servers', so that
# on a shared host the walsender feeding pgferry and the source's clients get the CPU first. When
# pgferry leads its own session (a service, setsid), its session's autogroup gets it too. 0: as
# started.
nice = 10

# Throttling: budgets for applied row changes and bytes per second (default: none), and the
# WAL guard: warn when the slot retains more than max_retained_wal bytes or safe_wal_size falls
# under min_safe_wal bytes, and then (lift_throttle_on_wal_danger) stop throttling until it
# recovers. Edit and send SIGHUP to the daemon to change them (and the batch limits) while it runs.
# max_rows_per_second = 20000
# max_bytes_per_second = 50000000
# max_retained_wal = 10737418240
# min_safe_wal = 1073741824
lift_throttle_on_wal_danger = true

# After `pgferry cutover --fallback`: the reverse daemon drops the fallback's slot on the new
# server (and the way back with it) when the slot keeps more WAL than this, e.g. because the old
# source is gone; a warning at 80%. Default: never.
# fallback_max_wal = 53687091200

# Conflicts: what to do when the target disagrees with a change. Policies: "error" (stop and
# name the change), "skip" (keep the target as it is), "overwrite" (the source row wins;
# for update_missing: insert it), "keep-newer" (the row with the greater newer_column wins).
# Every conflict not applied as sent is recorded in <state_schema>.conflicts.
[conflicts]
insert_exists = "error"
update_missing = "skip"
delete_missing = "skip"      # error or skip
apply_error = "error"        # error or skip: the target rejects one change (value too long, ...)
# newer_column = "updated_at"
# A Python function deciding every conflict instead (gets sink.conflicts.Conflict, returns
# sink.conflicts.Resolution):
# hook = "myhooks:resolve"

# Per table:
# [conflicts.tables."public.accounts"]
# insert_exists = "keep-newer"
# newer_column = "updated_at"
"""


def load(path: str | None, flags: dict[str, Any], environ: dict[str, str] | None = None) -> Settings:
    """The effective settings. `flags`: what the command line gave (None = not given)."""
    layers: dict[str, Any] = {}
    if path:
        layers.update(_from_file(path))
    layers.update(_from_env(os.environ if environ is None else environ))
    layers.update({k: v for k, v in flags.items() if v is not None and k in FIELDS})
    try:
        st = msgspec.convert(layers, Settings)
    except msgspec.ValidationError as exc:  # a flag's value (files and env were checked already)
        raise UsageError(f"invalid setting: {_explain(exc)}") from None
    if st.hold_back_constraints and st.keep_constraints:
        raise UsageError("hold_back_constraints and keep_constraints exclude each other: choose one "
                         "(--hold-back-constraints or --keep-constraints)")
    return st


def _from_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"config file {path}: {exc.strerror}") from None
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path}: expected key = value pairs")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys: "
                         f"{', '.join(FIELDS)} (see `pgferry config example`)")
    try:
        msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise UsageError(f"config file {path}: {_explain(exc)}") from None
    return raw


# PGFERRY_* variables that are not settings: the config file, the tools' and servers' locations,
# the accelerators' switch, fault injection (tests), PGFERRY_TEST_* (the tests' own), PGFERRY_DEBUG
# (tracebacks of unexpected server errors), and what a cutover's --switch-command is given (so it
# may run pgferry itself)
OTHER_ENV = re.compile(r"PGFERRY_(HANDOFF_LSN|CUTOVER_ID|TARGET_DSN|CONFIG|PG_DUMP|PG\d+_BINDIR|PURE_PYTHON|FAILPOINT"
                       r"|DEBUG|SOAK_SECONDS|TEST_\w+)")


def _from_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    known = {f"PGFERRY_{k.upper()}" for k in FIELDS if k not in NESTED}
    unknown = sorted(n for n in environ if n.startswith("PGFERRY_") and n not in known and not OTHER_ENV.fullmatch(n))
    if unknown:  # a misspelt setting would be ignored otherwise, as an unknown TOML key is not
        close = {n: difflib.get_close_matches(n, sorted(known), 1) for n in unknown}
        named = ", ".join(f"{n} (did you mean {c[0]}?)" if c else n for n, c in close.items())
        raise UsageError(f"unknown environment variable(s) {named}: settings are PGFERRY_<KEY> for the keys of "
                         "`pgferry config example`")
    out: dict[str, Any] = {}
    for key in FIELDS:
        if key in NESTED:
            continue
        name = f"PGFERRY_{key.upper()}"
        text = environ.get(name)
        if text is None or text == "":
            continue
        value: Any = [t.strip() for t in text.split(",")] if key == "tables" else text
        try:
            # strict=False: the environment only holds strings ("20000" -> 20000, "false" -> False)
            converted = msgspec.convert({key: value}, Settings, strict=False)
        except msgspec.ValidationError as exc:
            raise UsageError(f"environment variable {name}={_shown(key, text)!r}: {_explain(exc)}") from None
        out[key] = getattr(converted, key)
    return out


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's 'Expected `int` >= 1, got `0` - at `$.batch_rows`' -> 'batch_rows: expected int >= 1, got 0'."""
    text = str(exc)
    m = re.match(r"(.*) - at `\$\.([a-z_]+)(.*)`$", text)
    if m and m.group(2) in NESTED:
        return f"{m.group(2)}{m.group(3)}: {m.group(1).replace('`', '')}"
    if not m:
        return text
    what, key, rest = m.groups()
    what = what.replace("`", "")
    if what.startswith("Invalid enum value"):
        choices = get_args(get_type_hints(Settings)[key])
        what = f"expected one of {', '.join(repr(c) for c in choices)}, got {what.split(' ', 3)[3]}"
    return f"{key}{rest}: {what[0].lower()}{what[1:]}"


def _shown(key: str, value: str) -> str:
    return masked(value) if key in ("source", "target") else value


def masked(dsn: str) -> str:
    """A DSN with its password replaced by ***."""
    dsn = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
    return re.sub(r"^(\w+://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def as_dict(settings: Settings) -> dict[str, Any]:
    """For `pgferry config show`: the settings, passwords masked."""
    out = msgspec.to_builtins(settings)
    for key in ("source", "target"):
        out[key] = masked(out[key])
    return out


def ddl_tables(st: Settings) -> dict[str, str]:
    """[ddl_tables] with its keys as the sink names tables (readable_name)."""
    return {(k if '"' in k or "." not in k else readable_name(*k.split(".", 1))): v
            for k, v in st.ddl_tables.items()}


def policies(st: Settings, load_hook: Any = None) -> Any:
    """The conflict settings as sink policies; keep-newer without a column is a usage error."""
    from sink.conflicts import Policies, TablePolicy

    c = st.conflicts
    default = TablePolicy(insert_exists=c.insert_exists, update_missing=c.update_missing,
                          delete_missing=c.delete_missing, apply_error=c.apply_error, newer_column=c.newer_column)
    tables = {}
    for key, t in c.tables.items():
        # as the sink names a table (readable_name): `public.accounts`, `public."My T"`; a key
        # written without quotes (`public.My T`) means the same table
        name = key if '"' in key or "." not in key else readable_name(*key.split(".", 1))
        tables[name] = TablePolicy(
            insert_exists=t.insert_exists or default.insert_exists,
            update_missing=t.update_missing or default.update_missing,
            delete_missing=t.delete_missing or default.delete_missing,
            apply_error=t.apply_error or default.apply_error,
            newer_column=t.newer_column or default.newer_column)
    for name, p in [("conflicts", default), *((f"conflicts.tables.{n!r}", p) for n, p in tables.items())]:
        if "keep-newer" in (p.insert_exists, p.update_missing) and not p.newer_column:
            raise UsageError(f"{name}: keep-newer needs newer_column (the column whose greater value wins)")
    hook = load_hook(c.hook, "conflicts.hook") if c.hook and load_hook is not None else None
    return Policies(default=default, tables=tables, hook=hook)


def budgets(st: Settings) -> Any:
    from ..stream.throttle import Budgets

    return Budgets(rows_per_second=st.max_rows_per_second, bytes_per_second=st.max_bytes_per_second,
                   max_retained_wal=st.max_retained_wal, min_safe_wal=st.min_safe_wal,
                   lift_throttle_on_wal_danger=st.lift_throttle_on_wal_danger)
