"""A captured schema change (replicator/ddl/capture.py) as the target replays it.

The message holds the client statement's whole text (`current_query()`). What is replayed is its
DDL statements only: a query string of several statements may also hold data changes, which reach
the target through the stream and must not run twice. What cannot be replayed faithfully is said,
never applied as something different:
- a command run from inside a function or a `DO` block (its text is the caller's);
- `SELECT ... INTO` (its rows come through the stream);
- a rewrite whose values the source computed and the WAL never shows: `ADD COLUMN` with a default
  that is not a constant (`random()`, `now()`, `nextval`, an identity or serial column) and
  `ALTER COLUMN TYPE ... USING` a volatile expression. Their tables are re-copied (`volatile`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
import psycopg2
import psycopg2.errors

from .state import quote_ident, readable_name, request_resync

log = logging.getLogger("pgferry.sink")

PREFIX = "pgferry.ddl"  # of the logical messages the source's capture emits

# first words of the statements replayed on the target
_DDL_WORDS = frozenset({"create", "alter", "drop", "comment", "grant", "revoke", "security", "reindex",
                        "cluster", "import"})
_CONCURRENTLY_DROP = re.compile(r"^(\s*drop\s+index\s+)concurrently\b", re.I)
_CONCURRENTLY_REINDEX = re.compile(r"^(\s*reindex\s*(?:\([^)]*\)\s*)?(?:index|table|schema|database|system)\s+)"
                                   r"concurrently\b", re.I)
_CREATE_INDEX_CONC = re.compile(r"^(\s*create\s+(?:unique\s+)?index\s+)concurrently\b", re.I)
_ADD_COLUMN = re.compile(r"\badd\s+(?:column\s+)?(?:if\s+not\s+exists\s+)?", re.I)
# a default whose value depends on when or where it is computed
_NOT_CONSTANT = re.compile(r"\(|\b(current_timestamp|current_date|current_time|localtime|localtimestamp|"
                           r"current_user|session_user|user|current_role|current_catalog|current_schema)\b", re.I)
_SERIAL = re.compile(r"\b(small|big)?serial[248]?\b|\bgenerated\s+(always|by\s+default)\s+as\s+identity\b", re.I)
_VOLATILE_USING = re.compile(r"\busing\b.*\b(random|now|clock_timestamp|statement_timestamp|timeofday|nextval|"
                             r"gen_random_uuid|uuid_generate_v[14]|txid_current|pg_current_xact_id)\b", re.I | re.S)


class DdlObject(msgspec.Struct, frozen=True):
    type: str | None = None
    identity: str | None = None
    schema: str | None = None
    table: str | None = None  # for an index: the table it is on


class DdlCommand(msgspec.Struct, frozen=True):
    tag: str
    query: str
    search_path: str = ""
    role: str = ""
    objects: list[DdlObject] = []
    dropped: list[DdlObject] = []


def parse(content: bytes) -> DdlCommand:
    return msgspec.json.decode(content, type=DdlCommand)


def split_statements(text: str) -> list[str]:
    """The statements of an SQL string, split at the semicolons outside quotes, dollar quotes,
    comments and parentheses; comments dropped, empty statements left out."""
    out: list[str] = []
    buf: list[str] = []
    i, n, depth = 0, len(text), 0
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c == "/" and text.startswith("/*", i):
            level, i = 1, i + 2
            while i < n and level:
                if text.startswith("/*", i):
                    level, i = level + 1, i + 2
                elif text.startswith("*/", i):
                    level, i = level - 1, i + 2
                else:
                    i += 1
            buf.append(" ")
            continue
        if c in "'\"":
            j = i + 1
            while j < n:
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                if c == "'" and text[j] == "\\" and i > 0 and text[i - 1] in "eE":
                    j += 2
                    continue
                j += 1
            buf.append(text[i:j + 1])
            i = j + 1
            continue
        if c == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", text[i:])
            if m and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
                tag = m.group(0)
                j = text.find(tag, i + len(tag))
                j = n if j < 0 else j + len(tag)
                buf.append(text[i:j])
                i = j
                continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == ";" and depth == 0:
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
            continue
        buf.append(c)
        i += 1
    stmt = "".join(buf).strip()
    if stmt:
        out.append(stmt)
    return out


def _first_word(stmt: str) -> str:
    m = re.match(r"\s*([A-Za-z]+)", stmt)
    return m.group(1).lower() if m else ""


def outside_transaction(stmt: str) -> str:
    """A statement that may not run in a transaction block on the source (`CONCURRENTLY`) as the
    target runs it, inside the batch's transaction (pgferry is the table's only writer there)."""
    for pattern in (_CREATE_INDEX_CONC, _CONCURRENTLY_DROP, _CONCURRENTLY_REINDEX):
        stmt = pattern.sub(r"\1", stmt, count=1)
    return stmt


class Replay(msgspec.Struct):
    """What the target runs for a command: `statements`, or `problem` (why it cannot be replayed)
    and `volatile` (tables whose data the command computed on the source: re-copy them)."""

    statements: list[str]
    problem: str | None = None
    volatile: list[str] = []


def replay(cmd: DdlCommand) -> Replay:
    stmts = split_statements(cmd.query)
    ddl = [outside_transaction(s) for s in stmts if _first_word(s) in _DDL_WORDS]
    if not ddl:
        first = _first_word(stmts[0]) if stmts else ""
        if first == "select" and cmd.tag in ("SELECT INTO", "CREATE TABLE AS"):
            return Replay([], f"{cmd.tag} ({_short(cmd.query)}) creates a table and its rows in one statement: create "
                              "it with CREATE TABLE ... AS ... WITH NO DATA instead, or re-sync the table")
        return Replay([], f"{cmd.tag} ran from inside {first.upper() or 'a statement'} ({_short(cmd.query)}): its "
                          "text is the caller's, which may also change data; apply the change on the target by hand")
    out: list[str] = []
    volatile: list[str] = []
    for s in ddl:
        if cmd.tag == "CREATE TABLE AS" and re.match(r"\s*create\s+(?:\w+\s+)*?table\b.*\bas\b", s, re.I | re.S):
            # its rows come through the stream: the table only
            s = re.sub(r"\s+with\s+data\s*$", "", s, flags=re.I)
            if not re.search(r"\bwith\s+no\s+data\s*$", s, re.I):
                s += " WITH NO DATA"
        out.append(s)
        if _first_word(s) == "alter" and re.match(r"\s*alter\s+table\b", s, re.I) and _computes_values(s):
            volatile.extend(o.identity for o in cmd.objects if o.type == "table" and o.identity)
    return Replay(out, None, volatile)


def _computes_values(stmt: str) -> bool:
    """Does this ALTER TABLE fill existing rows with values computed on the source?"""
    for m in _ADD_COLUMN.finditer(stmt):
        rest = stmt[m.end():]
        clause = re.split(r",\s*(?=add\b|alter\b|drop\b)", rest, maxsplit=1, flags=re.I)[0]
        if _SERIAL.search(clause):
            return True
        d = re.search(r"\bdefault\b(.*)", clause, re.I | re.S)
        if d and _NOT_CONSTANT.search(re.sub(r"'(?:[^']|'')*'", "''", d.group(1).split(" not null")[0])):
            return True
    return bool(_VOLATILE_USING.search(stmt))


def _short(text: str, limit: int = 120) -> str:
    one = " ".join(text.split()).rstrip("; ")
    return one if len(one) <= limit else one[:limit - 3] + "..."


def tables_of(objects: list[DdlObject]) -> list[str]:
    """The tables (names as SQL) that `objects` are, or belong to (an index, a constraint, a
    trigger, a column)."""
    out = []
    for o in objects:
        if not o.identity:
            continue
        if o.type == "table":
            out.append(o.identity)
        elif o.type == "index" and o.table:
            out.append(o.table)
        elif o.type in ("table constraint", "trigger") and " on " in o.identity:
            out.append(o.identity.split(" on ", 1)[1])
        elif o.type == "table column":
            out.append(o.identity.rsplit(".", 1)[0])
    return out


def touches(cmd: DdlCommand, tables: set[str] | None) -> bool:
    """With `--tables` (the migrated tables as schema.table), does the command concern them? A
    command on other tables (or their indexes) is not replayed; one on no table (a type, a
    function, a view) is."""
    if tables is None:
        return True
    named = tables_of([*cmd.objects, *cmd.dropped])
    return not named or any(n.replace('"', "") in tables for n in named)


def describe(cmd: DdlCommand) -> str:
    return f"{cmd.tag} ({_short(cmd.query)})"


def as_row(cmd: DdlCommand) -> dict[str, Any]:
    return {"tag": cmd.tag, "query": cmd.query, "search_path": cmd.search_path, "role": cmd.role}


# What the target says when a statement's effect is there already: the object (table, column,
# index, type, function, constraint, schema) exists, or, for a DROP, is gone.
_ALREADY = (psycopg2.errors.DuplicateTable, psycopg2.errors.DuplicateObject, psycopg2.errors.DuplicateColumn,
            psycopg2.errors.DuplicateSchema, psycopg2.errors.DuplicateFunction, psycopg2.errors.UndefinedTable,
            psycopg2.errors.UndefinedObject, psycopg2.errors.UndefinedColumn, psycopg2.errors.UndefinedFunction)


def _already_done(stmt: str, exc: psycopg2.Error) -> bool:
    """Is `exc` the target saying `stmt`'s effect is there already (not a real rejection)?"""
    word = _first_word(stmt)
    missing = isinstance(exc, (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedObject,
                               psycopg2.errors.UndefinedColumn, psycopg2.errors.UndefinedFunction))
    if missing:  # gone already: only for what drops it
        return word == "drop" or bool(re.match(r"\s*alter\s+table\b.*\bdrop\b", stmt, re.I | re.S))
    return word in ("create", "alter", "comment")


class SchemaChanges:
    """Applies captured schema changes in the sink's open target transaction, where they
    happened in the stream, and records each in the state's `ddl` table in that transaction: a
    change is applied exactly once, with the progress past it. One per Sink."""

    def __init__(self, cur: Any, schema: str, slot: str, policies: Any, resolver: Any, stats: Any,
                 policy: str = "apply") -> None:
        self.cur = cur
        self.schema = schema
        self.slot = slot
        self.policies = policies
        self.resolver = resolver
        self.stats = stats
        self.policy = policy  # apply | stop | skip
        self.table_policies: dict[str, str] = {}  # per table (readable name), over `policy`
        self.tables: set[str] | None = None  # with --tables: the migrated ones (schema.table); None: all
        self.volatile: list[str] = []  # tables to re-copy once this transaction is committed
        self.can_resync = True  # the stream loop re-copies `volatile` tables (else such a change stops)
        # without the replica role: holds back what a change makes fire, and keeps what is held
        # back in step with renames (replicator/sync/holdback.py: StreamHold), in the open transaction
        self.hold: Any = None

    def apply(self, cmd: DdlCommand, lsn: Any, xid: int | None, isolated: bool) -> bool:
        """Apply `cmd` (the caller wrote the changes before it). True when the target's schema
        changed (the caller re-reads its tables). `isolated`: its source transaction is alone in
        the batch (a failure then stops exactly there)."""
        from .errors import RETRYABLE, ApplyError, DdlStop

        where = dict(lsn=lsn, xid=xid)
        if not touches(cmd, self.tables):
            log.info("schema change on tables not migrated, not applied: %s", describe(cmd))
            self._record(cmd, lsn, xid, "not migrated", None)
            return False
        policy = self.policy_for(cmd)
        if policy == "skip":
            log.warning("schema change not applied (ddl = skip): %s at commit LSN %s", describe(cmd), lsn)
            self._record(cmd, lsn, xid, "skipped", "ddl = skip")
            return False
        if policy == "stop":
            raise DdlStop(f"a schema change arrived and ddl = stop: {describe(cmd)}. Apply it on the target, or "
                          "start with ddl = apply", **where)
        plan = replay(cmd)
        if plan.problem:
            raise DdlStop(f"a schema change cannot be replayed on the target: {plan.problem}", **where)
        if plan.volatile and not self.can_resync:
            raise DdlStop(f"a schema change filled {', '.join(plan.volatile)} with values computed on the source, "
                          f"which the WAL does not carry: {describe(cmd)}. Re-copy the table after it, or make "
                          "the change in two steps (ADD COLUMN, then UPDATE)", **where)
        cur = self.cur
        cur.execute("SELECT current_setting('search_path')")
        (own_path,) = cur.fetchone()
        cur.execute("SAVEPOINT pgferry_ddl")
        try:
            if self.hold is not None:
                self.hold.before(cur)
            cur.execute("SELECT set_config('search_path', %s, true)", (cmd.search_path or own_path,))
            already = []
            for stmt in plan.statements:
                cur.execute("SAVEPOINT pgferry_ddl_stmt")
                try:
                    cur.execute(stmt)
                except _ALREADY as exc:  # made on the target by hand already (after ddl = stop, say)
                    if not _already_done(stmt, exc):
                        raise
                    cur.execute("ROLLBACK TO SAVEPOINT pgferry_ddl_stmt")
                    already.append(exc.diag.message_primary or stmt)
                    continue
                cur.execute("RELEASE SAVEPOINT pgferry_ddl_stmt")
            cur.execute("SELECT set_config('search_path', %s, true)", (own_path,))
            if self.hold is not None:  # what the change made fire (a foreign key...): held back too
                held = self.hold.after(cur, tables_of(cmd.objects))
                if held:
                    log.info("held back until cutover (they would fire during apply): %s",
                             ", ".join(f"{i.kind} {i.name} on {i.table}" for i in held))
            cur.execute("RELEASE SAVEPOINT pgferry_ddl")
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT pgferry_ddl")  # (and the search_path with it)
            detail = exc.diag.message_primary or (exc.pgerror or str(exc)).strip().splitlines()[0]
            table = next((o.table or o.identity for o in cmd.objects if o.identity), None)
            skip = self.policies.for_table(table or "").apply_error == "skip" if self.policies else False
            if not skip and not isolated:
                # with earlier transactions in the batch: they commit first, this one fails alone
                err = ApplyError(f"the target rejected a schema change {describe(cmd)}: {detail}", table=table,
                                 **where)
                err.batch_has_earlier = True
                raise err from None
            self._dead_letter(cmd, lsn, xid, table or cmd.tag, detail, "skipped" if skip else "stopped",
                              separate=not skip)
            self.stats.ddl_counts["rejected"] = self.stats.ddl_counts.get("rejected", 0) + 1
            if skip:
                log.warning("the target rejected a schema change, skipped (apply_error = skip): %s: %s",
                            describe(cmd), detail)
                self._record(cmd, lsn, xid, "rejected", detail)
                return False
            raise ApplyError(f"the target rejected a schema change {describe(cmd)}: {detail}. It is in the "
                             f"{self.schema}.conflicts table; fix the target and start again (or set "
                             "apply_error = skip)", table=table, **where) from None
        if already and len(already) == len(plan.statements):
            log.warning("schema change at commit LSN %s is on the target already (%s), not made again: %s", lsn,
                        "; ".join(already), describe(cmd))
            self._record(cmd, lsn, xid, "already there", "; ".join(already))
        else:
            log.info("applied schema change at commit LSN %s: %s%s", lsn, describe(cmd),
                     f" (on the target already: {'; '.join(already)})" if already else "")
            self._record(cmd, lsn, xid, "applied", "; ".join(already) or None)
        for table in plan.volatile:  # re-copied once this transaction commits (replicator/sync/resync.py)
            log.warning("%s now holds values the source computed and the WAL does not carry: it is re-copied",
                        table)
            request_resync(cur, self.schema, self.slot, table, f"schema change at {lsn}: {describe(cmd)}")
        self.volatile.extend(plan.volatile)
        return True

    def policy_for(self, cmd: DdlCommand) -> str:
        """The ddl policy for `cmd`: that of the first table it names with one of its own, else
        the global one."""
        if self.table_policies:
            for name in tables_of([*cmd.objects, *cmd.dropped]):
                own = self.table_policies.get(readable_name(*name.replace('"', "").split(".", 1))
                                              if "." in name else name)
                if own is not None:
                    return own
        return self.policy

    def _record(self, cmd: DdlCommand, lsn: Any, xid: int | None, result: str, detail: str | None) -> None:
        self.stats.ddl_counts[result] = self.stats.ddl_counts.get(result, 0) + 1
        self.cur.execute(f"INSERT INTO {quote_ident(self.schema)}.ddl (slot_name, lsn, xid, tag, query, search_path, "
                         "result, detail) VALUES (%s, %s::pg_lsn, %s, %s, %s, %s, %s, %s)",
                         (self.slot, str(lsn) if lsn is not None else None, xid, cmd.tag, cmd.query,
                          cmd.search_path, result, detail))

    def _dead_letter(self, cmd: DdlCommand, lsn: Any, xid: int | None, table: str, detail: str,
                     resolution: str, separate: bool) -> None:
        from .conflicts import Conflict

        conflict = Conflict(kind="ddl_rejected", table=table, key={}, old=None, new=as_row(cmd), existing=None,
                            lsn=str(lsn) if lsn is not None else None, xid=xid, detail=detail)
        self.resolver._dead_letter([(conflict, resolution)], separate=separate)
