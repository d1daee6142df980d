"""`pgferry preflight` (also run by `start`): everything that would stop or endanger a migration,
checked before anything is created, each finding with its severity and exact fix (docs/commands.md).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg2
import psycopg2.errors
import psycopg2.extras

from sink.relations import firing
from sink.state import readable_name_sql

from ..cutover import fence
from ..ddl.capture import can_capture
from ..errors import ConnectError, SourceNotReady, UsageError, first_line
from ..source import connect, describe_dsn, query_one, table_spec_sql
from ..sync import holdback
from ..sync.checks import Finding, replicability_findings
from .config import Settings

log = logging.getLogger("pgferry.preflight")

LONG_TRANSACTION = "5 minutes"


class Report(msgspec.Struct):
    ok: bool
    source: str
    target: str
    findings: list[Finding]


def check(st: Settings, for_start: bool = False) -> list[Finding]:
    """All findings for this source, target and settings. Connection failures are findings too
    (for_start: raised, as before anything else: exit 1, or 2 for a missing or malformed DSN)."""
    findings: list[Finding] = []
    src = _open(st.source, "source", findings, for_start)
    tgt = _open(st.target, "target", findings, for_start)
    try:
        if src is not None:
            findings += _source(src, st)
        if tgt is not None:
            findings += _target(tgt, st, src)
    finally:
        for c in (src, tgt):
            if c is not None:
                c.close()
    return findings


def _open(dsn: str, role: str, findings: list[Finding], for_start: bool) -> Any:
    try:
        return connect(dsn, role)
    except (UsageError, ConnectError) as exc:
        if for_start:
            raise
        findings.append(Finding(severity="error", side=role, check="connect", message=str(exc),  # type: ignore[arg-type]
                                fix=f"pass --{role} (or set PGFERRY_{role.upper()}) with a DSN that connects"))
        return None



def _source(src: Any, st: Settings) -> list[Finding]:
    out: list[Finding] = []
    where = describe_dsn(st.source)

    def add(severity: str, name: str, message: str, fix: str = "") -> None:
        out.append(Finding(severity=severity, side="source", check=name, message=message, fix=fix))  # type: ignore[arg-type]

    version, user, db, wal_level, superuser, replication, client = query_one(src, """
        SELECT current_setting('server_version'), current_user, current_database(), current_setting('wal_level'),
               r.rolsuper, r.rolreplication, coalesce(host(inet_client_addr()), 'local')
        FROM pg_roles r WHERE r.rolname = current_user""")
    add("info", "version", f"source {where}: PostgreSQL {version}, connected as {user}")
    if wal_level != "logical":
        add("error", "wal_level", f"source {where} has wal_level = {wal_level}; logical decoding needs "
                                  "wal_level = logical",
            "postgresql.conf: wal_level = logical (or ALTER SYSTEM SET wal_level = logical), then restart the server")
    slot_exists = bool(query_one(src, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (st.slot,))[0])
    slots_free, senders_free = query_one(src, """
        SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots),
               current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)""")
    # one slot for the stream, one temporary slot while a resumed copy takes a new snapshot
    needed = 0 if slot_exists else 1
    if slots_free < needed:
        add("error", "replication slots", f"no free replication slot on source {where} (max_replication_slots is "
                                          "used up)",
            "postgresql.conf: raise max_replication_slots (restart), or drop an unused slot: SELECT "
            "pg_drop_replication_slot('<name>')")
    elif slots_free < needed + 1:
        add("warning", "replication slots", "only one free replication slot: resuming an interrupted copy needs a "
                                            "second (temporary) one", "postgresql.conf: raise max_replication_slots")
    if senders_free < 1:
        add("warning", "wal senders", "every WAL sender is in use on the source (max_wal_senders)",
            "postgresql.conf: raise max_wal_senders (restart)")
    if not (superuser or replication):
        add("error", "privileges", f"role {user} on source {where} lacks the REPLICATION privilege",
            f"ALTER ROLE {user} WITH REPLICATION;  -- as a superuser")
    pub = query_one(src, "SELECT puballtables FROM pg_publication WHERE pubname = %s", (st.publication,))
    if pub is None and st.copy and st.tables:
        names = [table_spec_sql(t) for t in st.tables]  # as CREATE PUBLICATION names them
        (found,) = query_one(src, "SELECT array_agg(to_regclass(n) IS NOT NULL ORDER BY i) FROM unnest(%s::text[]) "
                             "WITH ORDINALITY AS u(n, i)", (names,))
        missing = [t for t, ok in zip(st.tables, found, strict=True) if not ok]
        if missing:
            add("error", "tables", f"--tables names {', '.join(missing)}, which source {where} does not have",
                "check the names: schema.table, or a table in the role's search_path")
    if pub is None:
        if not st.copy:
            add("error", "publication", f"publication {st.publication!r} does not exist on source {where}",
                f"CREATE PUBLICATION {st.publication} FOR ALL TABLES;  (or FOR TABLE ...), or pass --publication")
        elif not superuser and not st.tables:
            add("error", "publication", f"pgferry would create publication {st.publication} FOR ALL TABLES, which "
                                        "needs a superuser",
                f"as a superuser: CREATE PUBLICATION {st.publication} FOR ALL TABLES;  or pass --tables (tables "
                f"{user} owns)")
    tables = _published(src, st)
    unreadable = _tables_where(src, "NOT has_table_privilege(c.oid, 'SELECT')", tables)
    if unreadable:
        add("error", "privileges", f"role {user} cannot read {', '.join(unreadable[:10])}"
                                   f"{' ...' if len(unreadable) > 10 else ''} (the copy needs SELECT)",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA <schema> TO {user};")
    hidden = _tables_where(src, "c.relrowsecurity AND row_security_active(c.oid)", tables) if st.copy else []
    if hidden:
        add("error", "row security", f"row-level security hides rows of {', '.join(hidden[:10])}"
                                     f"{' ...' if len(hidden) > 10 else ''} from role {user}: the copy would miss "
                                     "them", f"ALTER ROLE {user} BYPASSRLS;  -- as a superuser (or copy as the "
                                             "tables' owner, where the policies are not forced)")
    out += replicability_findings(src, tables)
    notowned = [] if superuser else _tables_where(src, "NOT pg_has_role(c.relowner, 'USAGE')", tables)
    if notowned:
        add("warning", "cutover fence", f"role {user} does not own {', '.join(notowned[:10])}"
                                        f"{' ...' if len(notowned) > 10 else ''}: `pgferry cutover` cannot fence them "
                                        "(the fence is a trigger on each published table)",
            f"run the cutover as their owner or a superuser, or GRANT <owner> TO {user}; or cut over with "
            "--fence none once the writers are stopped")
    fenced = fence.fenced_tables(src.cursor())
    src.rollback()
    if fenced:
        add("warning", "cutover fence", f"{len(fenced)} table(s) of source {where} refuse writes: a cutover's fence "
                                        "is still up (an interrupted or failed cutover)",
            "pgferry cutover --undo  (lifts it), or pgferry cutover (tries again)")
    if superuser or replication:
        problem = _replication_connection(st.source)
        if problem:
            add("error", "pg_hba", f"a logical replication connection to source {where} fails: {problem}",
                f"pg_hba.conf: host {db} {user} {client if client != 'local' else '127.0.0.1'}/32 scram-sha-256  "
                "(a logical replication connection matches the database name, not the 'replication' keyword); "
                "then SELECT pg_reload_conf()")
    old = query_one(src, f"""SELECT count(*), max(now() - xact_start)::text FROM pg_stat_activity
        WHERE xact_start < now() - interval '{LONG_TRANSACTION}' AND pid <> pg_backend_pid()""")
    if old[0]:
        add("warning", "long transactions", f"{old[0]} transaction(s) open for over {LONG_TRANSACTION} (longest "
                                            f"{old[1]}): creating the slot waits until they end",
            "end them (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE ...) or wait")
    if st.ddl_capture:
        with src.cursor() as cur:
            why = can_capture(cur)
        if why is None:
            add("info", "schema changes", "schema changes on the source are captured (pgferry installs an event "
                                          "trigger in the source database; `pgferry cleanup` removes it) and applied "
                                          f"on the target where they happen (ddl = {st.ddl})")
        else:
            add("warning", "schema changes", f"schema changes on source {where} cannot be captured: {why}. Other "
                                             "changes (a rename, a type change) stop pgferry, naming what it saw; "
                                             "indexes, constraints, defaults, views, functions and types must be "
                                             "made on the target by hand",
                "connect as a superuser on the source, or make schema changes on both sides by hand")
    (size,) = query_one(src, "SELECT pg_database_size(current_database())")
    add("info", "size", f"database {db} is {_size(size)}; plan about {_size(1.5 * size)} free on the target "
                        "(tables, indexes, WAL during the copy)")
    return out


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _published(src: Any, st: Settings) -> list[str] | None:
    """The tables the migration covers: the publication's if it exists, else `--tables` (None: all)."""
    with src.cursor() as cur:
        cur.execute("""SELECT array(SELECT schemaname || '.' || tablename FROM pg_publication_tables t
            WHERE t.pubname = p.pubname) FROM pg_publication p WHERE p.pubname = %s""", (st.publication,))
        row = cur.fetchone()
    src.rollback()
    return st.tables if row is None else row[0]


def _tables_where(src: Any, condition: str, tables: list[str] | None) -> list[str]:
    """The user tables among `tables` (None: all) for which `condition` (SQL on pg_class c) holds."""
    with src.cursor() as cur:
        cur.execute(f"""SELECT {readable_name_sql("n.nspname", "c.relname")}
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname NOT LIKE 'pg_toast%%' AND {condition}
              AND (%s::text[] IS NULL OR n.nspname || '.' || c.relname = ANY(%s::text[]) OR c.relname = ANY(%s::text[]))
            ORDER BY n.nspname, c.relname""", (tables, tables, tables))
        rows = [r[0] for r in cur.fetchall()]
    src.rollback()
    return rows


def _replication_connection(dsn: str) -> str | None:
    try:
        conn = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection,
                                application_name="pgferry-preflight", connect_timeout=10)
    except psycopg2.Error as exc:
        return first_line(exc)
    conn.close()
    return None


def _target(tgt: Any, st: Settings, src: Any) -> list[Finding]:
    out: list[Finding] = []
    where = describe_dsn(st.target)

    def add(severity: str, name: str, message: str, fix: str = "") -> None:
        out.append(Finding(severity=severity, side="target", check=name, message=message, fix=fix))  # type: ignore[arg-type]

    version, num, user, db, can_create = query_one(tgt, """SELECT current_setting('server_version'),
        current_setting('server_version_num')::int, current_user, current_database(),
        has_database_privilege(current_database(), 'CREATE')""")
    add("info", "version", f"target {where}: PostgreSQL {version}, connected as {user}")
    read_only, in_recovery, source = query_one(tgt, """SELECT current_setting('transaction_read_only')::bool,
        pg_is_in_recovery(), (SELECT source FROM pg_settings WHERE name = 'default_transaction_read_only')""")
    if in_recovery:
        add("error", "read-only", f"target {where} is a standby (in recovery): nothing can be written there",
            "point --target at the primary")
    elif read_only:
        add("error", "read-only", f"role {user}'s transactions on target {where} are read-only "
                                  f"(default_transaction_read_only = on, set in the {source} settings): pgferry "
                                  "could not create its state, the tables or apply anything",
            f"ALTER ROLE {user} IN DATABASE {db} SET default_transaction_read_only = off;  (a role may set its own)")
    if src is not None:
        (src_num,) = query_one(src, "SELECT current_setting('server_version_num')::int")
        if num // 10000 < src_num // 10000:
            add("warning", "version", f"the target's major version ({num // 10000}) is older than the source's "
                                      f"({src_num // 10000}): the schema may use what the target lacks",
                "migrate to the same or a newer major version")
    schema_exists = query_one(tgt, "SELECT has_schema_privilege(n.oid, 'CREATE') FROM pg_namespace n "
                                   "WHERE nspname = %s", (st.state_schema,))
    if not can_create and not (schema_exists and schema_exists[0]):
        add("error", "privileges", f"role {user} on target {where}: pgferry needs CREATE on the target database for "
                                   f"its {st.state_schema!r} state schema and the tables",
            f"GRANT CREATE ON DATABASE {db} TO {user};")
    if not holdback.replica_role_allowed(tgt):
        _fires_on_apply(tgt, st, src, user, add)
    if src is not None and st.schema:
        with src.cursor() as cur:
            cur.execute("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'")
            used = {r[0] for r in cur.fetchall()}
        src.rollback()
        with tgt.cursor() as cur:
            cur.execute("SELECT name FROM pg_available_extensions")
            available = {r[0] for r in cur.fetchall()}
        tgt.rollback()
        missing = sorted(used - available)
        if missing:
            add("error", "extensions", f"the source uses extension(s) {', '.join(missing)} that the target cannot "
                                       "install", "install their packages on the target server first")
    if src is not None:
        _xml(src, tgt, st, where, add)
    _fallback(tgt, where, user, add)
    forced = (_tables_where(src, "c.relrowsecurity AND c.relforcerowsecurity", _published(src, st))
              if src is not None and st.schema else [])
    if forced and not query_one(tgt, "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")[0]:
        add("error", "row security", f"{', '.join(forced[:10])}{' ...' if len(forced) > 10 else ''} force row-level "
                                     f"security on their owner: on the target that is {user}, and the apply would "
                                     "stop at their first change",
            f"ALTER ROLE {user} BYPASSRLS;  -- as a superuser")
    tgt.rollback()
    return out


def _fallback(tgt: Any, where: str, user: str, add: Callable[..., None]) -> None:
    """Whether `cutover --fallback` could stream the target back into the source afterwards (an
    info finding: the fallback is optional; the cutover checks again and refuses without it)."""
    wal_level, may = query_one(tgt, "SELECT current_setting('wal_level'), (SELECT rolreplication OR rolsuper "
                                    "FROM pg_roles WHERE rolname = current_user)")
    missing = ([f"wal_level is {wal_level}"] if wal_level != "logical" else []) + (
        [f"role {user} may not replicate"] if not may else [])
    if missing:
        add("info", "fallback", f"`cutover --fallback` (a way back after the cutover) is not possible on target "
                                f"{where}: {' and '.join(missing)}",
            "; ".join(([] if wal_level == "logical" else ["ALTER SYSTEM SET wal_level = logical (restart)"])
                      + ([] if may else [f"ALTER ROLE {user} REPLICATION"])))
    else:
        add("info", "fallback", f"target {where} can stream back: `cutover --fallback` keeps a way back")


# a column of type xml: itself, an array of it or a domain over it
_XML_COLUMN = """EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      AND 'xml'::regtype IN (ty.oid, ty.typelem, ty.typbasetype))"""


def _xml(src: Any, tgt: Any, st: Settings, where: str, add: Callable[..., None]) -> None:
    """Tables with xml columns into a target server built without libxml: every xml value is
    refused there (the copy would stop midway, its slot left holding WAL)."""
    tables = _tables_where(src, _XML_COLUMN, _published(src, st))
    if not tables:
        return
    with tgt.cursor() as cur:
        try:
            cur.execute("SELECT '<x/>'::xml")
            supported = True
        except psycopg2.errors.FeatureNotSupported:
            supported = False
    tgt.rollback()
    if not supported:
        add("error", "xml", f"{', '.join(tables[:10])}{' ...' if len(tables) > 10 else ''} have xml columns, and "
                            f"target {where} was built without libxml: it refuses every xml value",
            "a target server built with libxml (e.g. Debian's postgresql-NN packages), or leave these tables "
            "out (--tables, or a publication without them)")


def _fires_on_apply(tgt: Any, st: Settings, src: Any, user: str, add: Callable[..., None]) -> None:
    """Without the replica role: what would fire during apply on the migrated tables, and the choices."""
    grant = f"GRANT SET ON PARAMETER session_replication_role TO {user};  -- PostgreSQL 15+, as a superuser"
    fires: list[str] = []
    if src is not None:
        with tgt.cursor() as cur:
            # a foreign key between two migrated tables once, on its own table
            fires = [f"{kind} {name} on {t}" for t, kind, name in
                     firing(cur, holdback.migrated_tables(src, st.publication, st.tables))
                     if " of " not in name]
        tgt.rollback()
    shown = ", ".join(fires[:20]) + (f" and {len(fires) - 20} more" if len(fires) > 20 else "")
    if not fires:
        add("info", "replica role", f"role {user} may not set session_replication_role = replica on the target; "
                                    "nothing fires on the migrated tables there"
                                    + (" (the foreign keys, triggers and rules of the schema pgferry copies are held "
                                       "back until cutover)" if st.schema else "") + ": set-based apply", grant)
    elif st.hold_back_constraints:
        add("info", "fires on apply", f"held back until cutover (--hold-back-constraints): {shown}")
    elif st.keep_constraints:
        add("warning", "fires on apply", f"kept (--keep-constraints), so they fire during apply: {shown}. Their "
                                         "tables are applied one by one (slower); a trigger writes what the stream "
                                         "also brings, a cascade deletes what the stream deletes again",
            f"{grant} or --hold-back-constraints")
    else:
        add("error", "fires on apply", f"role {user} may not set session_replication_role = replica on the target, "
                                       f"and these would fire during apply: {shown}. A trigger would write what the "
                                       "stream also brings, a cascade would delete what the stream deletes again, "
                                       "and their tables would be applied one by one (slow)",
            f"choose one: {grant} | --hold-back-constraints: pgferry records each definition in its state, drops "
            "it and creates it again at cutover (or cleanup) | --keep-constraints: they stay and fire, knowingly")


# -- commands --------------------------------------------------------------------------------
def run_preflight(st: Settings, as_json: bool) -> int:
    findings = check(st)
    errors = [f for f in findings if f.severity == "error"]
    report = Report(ok=not errors, source=describe_dsn(st.source) if st.source else "",
                    target=describe_dsn(st.target) if st.target else "", findings=findings)
    if as_json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    else:
        for f in sorted(findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
            print(f"{f.severity.upper():8} {f.side:7} {f.check:18} {f.message}")
            if f.fix:
                print(f"{'':35}fix: {f.fix}")
        warnings = sum(f.severity == "warning" for f in findings)
        print(f"preflight: {len(errors)} error(s), {warnings} warning(s)" + ("" if errors else ": ready to start"))
    return 1 if errors else 0


def preflight_for_start(st: Settings) -> None:
    """Run by `start`: warnings are logged, errors stop it (exit 1) before anything is created."""
    findings = check(st, for_start=True)
    for f in findings:
        if f.severity == "warning":
            log.warning("preflight: %s (fix: %s)", f.message, f.fix)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise SourceNotReady("preflight: " + "; ".join(f"{f.message} (fix: {f.fix})" for f in errors))


def print_setup_sql(st: Settings) -> int:
    """SQL for a least-privilege role that pgferry can run as (printed, not run)."""
    print("""-- On the SOURCE, as a superuser. Replace the password; keep the DSN's password out of shell history
-- (PGPASSWORD or ~/.pgpass).
CREATE ROLE pgferry WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO pgferry;                 -- repeat for every schema that is migrated
GRANT SELECT ON ALL TABLES IN SCHEMA public TO pgferry;  -- the initial copy reads every table
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO pgferry;  -- sequences are copied at the end and at cutover
-- ALTER ROLE pgferry BYPASSRLS;  -- only if tables have row-level security: else their copy fails
-- FOR ALL TABLES needs a superuser: create the publication now, so pgferry does not have to.""")
    print(f"CREATE PUBLICATION {st.publication} FOR ALL TABLES;")
    print("""-- pg_hba.conf on the source: a logical replication connection matches the DATABASE name:
--   host  <dbname>  pgferry  <pgferry's address>/32  scram-sha-256
-- postgresql.conf on the source: wal_level = logical (restart), max_replication_slots and
-- max_wal_senders with at least 2 free.

-- On the TARGET, as the database owner or a superuser:
CREATE ROLE pgferry WITH LOGIN PASSWORD 'change-me';
GRANT CREATE ON DATABASE <dbname> TO pgferry;            -- the state schema and the copied tables
GRANT SET ON PARAMETER session_replication_role TO pgferry;  -- PostgreSQL 15+: apply like native replication
-- `pgferry cutover` fences the source with a trigger on each published table (writes refused
-- for every role and session): run it as the tables' owner (GRANT <owner> TO pgferry) or a
-- superuser, or use --fence none.""")
    return 0

