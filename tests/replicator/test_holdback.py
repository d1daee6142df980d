"""A target role that only owns its database: foreign keys, user triggers and rules are held back
during apply (nothing fires that native apply would not fire), created at cutover and validated,
restored by cleanup; with --no-schema the user chooses (grant, hold back, keep)."""

from __future__ import annotations

import json
import random
import threading
import time

import psycopg2
import pytest

from replicator.sync.postdata import split_post_data
from tests.pgplugin import Daemon, Db, assert_same_tables, pgferry, wait_for

pytestmark = pytest.mark.pg

# What a user's schema holds: a foreign key with ON DELETE CASCADE, an audit trigger (AFTER, writes
# another table), a trigger that modifies the row (BEFORE, sets updated_at) and a rule that writes
# another table. Each would make the target differ if it fired during apply.
SCHEMA = """
CREATE TABLE parent (id integer PRIMARY KEY, name text, updated_at timestamptz);
CREATE TABLE child (id integer PRIMARY KEY, pid integer REFERENCES parent ON DELETE CASCADE, v integer);
CREATE TABLE audit (id bigserial PRIMARY KEY, tbl text NOT NULL, op text NOT NULL, row_id integer);
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit (tbl, op, row_id)
    VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END $$;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at = clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER child_audit AFTER INSERT OR UPDATE OR DELETE ON child FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER parent_touch BEFORE INSERT OR UPDATE ON parent FOR EACH ROW EXECUTE FUNCTION touch();
CREATE RULE parent_delete_log AS ON DELETE TO parent
    DO ALSO INSERT INTO audit (tbl, op, row_id) VALUES ('parent', 'rule', OLD.id);
"""
TABLES = {"parent": ["id", "name", "updated_at"], "child": ["id", "pid", "v"], "audit": ["id", "tbl", "op", "row_id"]}
HELD = {("foreign key", "public.child", "child_pid_fkey"), ("trigger", "public.child", "child_audit"),
        ("trigger", "public.parent", "parent_touch"), ("rule", "public.parent", "parent_delete_log")}


class Work:
    """Random transactions over parent and child (seeded)."""

    def __init__(self, db: Db, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.conn = psycopg2.connect(db.as_superuser.dsn)
        cur = self.conn.cursor()
        cur.execute("SELECT coalesce(max(id), 0) FROM parent")
        (top,) = cur.fetchone()
        cur.execute("SELECT coalesce(max(id), 0) FROM child")
        (ctop,) = cur.fetchone()
        self.conn.rollback()
        self.next = max(top, ctop) + 1

    def close(self) -> None:
        self.conn.close()

    def _some(self, cur, table: str) -> int | None:
        cur.execute(f"SELECT id FROM {table} ORDER BY random() LIMIT 1")
        row = cur.fetchone()
        return row[0] if row else None

    def transaction(self) -> None:
        r, cur = self.rnd, self.conn.cursor()
        for _ in range(r.randint(1, 5)):
            op = r.random()
            if op < 0.25:
                cur.execute("INSERT INTO parent (id, name) VALUES (%s, %s)", (self.next, f"p{r.randint(0, 99)}"))
                self.next += 1
            elif op < 0.35:
                cur.execute("UPDATE parent SET name = %s WHERE id = %s", (f"u{r.randint(0, 99)}",
                                                                          self._some(cur, "parent")))
            elif op < 0.42:
                cur.execute("DELETE FROM parent WHERE id = %s", (self._some(cur, "parent"),))  # cascade + rule
            elif op < 0.72:
                pid = self._some(cur, "parent")
                if pid is not None:
                    cur.execute("INSERT INTO child VALUES (%s, %s, %s)", (self.next, pid, r.randint(0, 9)))
                    self.next += 1
            elif op < 0.85:
                cur.execute("UPDATE child SET v = v + 1 WHERE id = %s", (self._some(cur, "child"),))
            elif op < 0.92:
                cur.execute("UPDATE child SET pid = %s WHERE id = %s", (self._some(cur, "parent"),
                                                                        self._some(cur, "child")))
            else:
                cur.execute("DELETE FROM child WHERE id = %s", (self._some(cur, "child"),))
        self.conn.commit()

    def run(self, n: int, stop: threading.Event | None = None) -> None:
        for _ in range(n):
            if stop is not None and stop.is_set():
                return
            self.transaction()


def _firing(dst: Db) -> set[tuple[str, str, str]]:
    """What fires on the target's tables now: (kind, table, name)."""
    return {(k, f"public.{t}", n) for t, k, n in dst.execute(
        "SELECT t, kind, name FROM unnest(array['parent', 'child', 'audit']) t, LATERAL ("
        "SELECT 'trigger', tgname::text FROM pg_trigger WHERE tgrelid = t::regclass AND NOT tgisinternal "
        "UNION ALL SELECT 'rule', rulename::text FROM pg_rewrite "
        "WHERE ev_class = t::regclass AND rulename <> '_RETURN' "
        "UNION ALL SELECT 'foreign key', conname::text FROM pg_constraint WHERE contype = 'f' "
        "AND conrelid = t::regclass) x(kind, name)")}


def _fk_valid(dst: Db) -> bool:
    return dst.execute("SELECT convalidated FROM pg_constraint WHERE conname = 'child_pid_fkey'")[0][0]


def _status(src: Db, dst: Db) -> dict:
    r = pgferry("status", "--json", "--source", src.dsn, "--target", dst.dsn)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _works_on_the_target(dst: Db) -> None:
    """Triggers, the rule and the cascade act on the target once it takes over."""
    (before,) = dst.execute("SELECT count(*) FROM audit")[0]
    dst.execute("INSERT INTO parent (id, name) VALUES (-1, 'new'); INSERT INTO child VALUES (-1, -1, 0)")
    assert dst.execute("SELECT updated_at IS NOT NULL FROM parent WHERE id = -1")[0][0]  # parent_touch
    dst.execute("DELETE FROM parent WHERE id = -1")
    assert not dst.execute("SELECT 1 FROM child WHERE id = -1")  # ON DELETE CASCADE
    ops = [r[0] for r in dst.execute("SELECT op FROM audit ORDER BY id OFFSET %s", (before,))]
    assert sorted(ops) == ["DELETE", "INSERT", "rule"], ops  # child_audit twice, the rule once
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        dst.execute("INSERT INTO child VALUES (-2, -12345, 0)")


def test_owner_only_target_copies_streams_under_kills_and_cuts_over_with_everything_back(owner_pair, daemons,
                                                                                          tmp_path):
    src, dst = owner_pair
    src.psql(SCHEMA + "CREATE PUBLICATION pgferry FOR ALL TABLES;")
    w = Work(src, seed=11)
    w.run(150)  # in the copy
    d = Daemon(src, dst, "--batch-rows", "40", copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 120, "streaming")
    assert _firing(dst) == set(), "held back: nothing fires while pgferry applies"
    held = {(h["kind"], h["table"], h["name"]): h["state"] for h in _status(src, dst)["held_back"]}
    assert held == dict.fromkeys(HELD, "held"), held
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            w.run(100_000, stop)
        except BaseException as exc:
            errors.append(exc)
    th = threading.Thread(target=work, daemon=True)
    th.start()
    rnd = random.Random(3)
    try:
        for _ in range(3):
            time.sleep(rnd.uniform(0.3, 1.0))  # the moment of the kill, not a wait for a condition
            d.kill()
            d.start()
    finally:
        stop.set()
        th.join(60)
        w.close()
    assert not errors and not th.is_alive()
    d.wait_caught_up(timeout=120)
    assert_same_tables(src, dst, TABLES)
    assert _firing(dst) == set()
    out = d.output()
    assert "nothing fires on the published tables" in out and "applied one by one" not in out, out
    receipt_file = tmp_path / "receipt.json"
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--receipt", str(receipt_file))
    assert r.returncode == 0, r.stdout + r.stderr + d.output()
    receipt = json.loads(receipt_file.read_text())
    assert receipt["ok"] and receipt["constraints_ok"], receipt
    states = {(h["kind"], h["table"], h["name"]): h["state"] for h in receipt["held_back"]}
    assert states == {k: "validated" if k[0] == "foreign key" else "created" for k in HELD}, states
    assert receipt["held_back_created_s"] < receipt["write_downtime_s"]
    assert_same_tables(src, dst, TABLES)
    assert _firing(dst) == HELD and _fk_valid(dst)
    _works_on_the_target(dst)


def test_a_foreign_key_the_data_breaks_is_named_with_its_rows_and_the_handoff_stands(owner_pair, daemons, tmp_path):
    src, dst = owner_pair
    # Only child is migrated, not the parent rows its foreign key needs: the schema comes whole
    # (pg_dump), the parent's data does not.
    src.psql(SCHEMA + "CREATE PUBLICATION pgferry FOR TABLE child, audit;")
    Work(src, seed=12).run(50)
    d = Daemon(src, dst, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 120, "streaming")
    Work(src, seed=13).run(20)
    (orphans,) = src.execute("SELECT count(*) FROM child WHERE pid IS NOT NULL")[0]
    assert orphans > 0
    receipt_file = tmp_path / "receipt.json"
    r = pgferry("cutover", "--source", src.dsn, "--target", dst.dsn, "--receipt", str(receipt_file))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the handoff stands" in r.stderr and "foreign key child_pid_fkey on public.child is NOT VALID" in r.stderr
    assert "Traceback" not in r.stderr
    receipt = json.loads(receipt_file.read_text())
    fk = next(h for h in receipt["held_back"] if h["kind"] == "foreign key")
    assert fk["state"] == "invalid", fk
    assert fk["detail"].startswith(f"{orphans} row(s) of public.child reference no row of public.parent, e.g. ")
    assert "(pid)=(" in fk["detail"] and all(t["match"] for t in receipt["tables"]), receipt
    assert receipt["handoff_lsn"] and not receipt["constraints_ok"]
    assert dst.execute("SELECT state FROM pgferry.control")[0][0] == "done"
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):  # still fenced: the application moved
        src.execute("INSERT INTO child (id) VALUES (-100)")  # (the fence is on the published tables)
    assert _firing(dst) == HELD and not _fk_valid(dst)  # created, NOT VALID
    assert d.wait_exit(30) == 0


@pytest.mark.parametrize("choice", ["none", "grant", "hold-back", "keep"])
def test_no_schema_target_with_its_own_foreign_keys_and_triggers(owner_pair, daemons, choice):
    src, dst = owner_pair
    src.psql(SCHEMA + "CREATE PUBLICATION pgferry FOR ALL TABLES;")
    dst.psql(SCHEMA)  # made by hand, by the target role
    Work(src, seed=13).run(60)
    if choice == "none":
        r = pgferry("preflight", "--no-schema", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "fires on apply" in r.stdout, r.stdout
        for what in ("foreign key child_pid_fkey on public.child", "trigger child_audit on public.child",
                     "trigger parent_touch on public.parent", "rule parent_delete_log on public.parent",
                     "GRANT SET ON PARAMETER session_replication_role", "--hold-back-constraints",
                     "--keep-constraints"):
            assert what in r.stdout, (what, r.stdout)
        assert r.stdout.count("child_pid_fkey") == 1, r.stdout  # once, though it fires on both its tables
        r = pgferry("start", "--no-schema", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 1 and "--hold-back-constraints" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not src.execute("SELECT 1 FROM pg_replication_slots")  # nothing was created
        assert _firing(dst) == HELD
        r = pgferry("preflight", "--no-schema", "--hold-back-constraints", "--source", src.dsn, "--target", dst.dsn)
        assert r.returncode == 0, r.stdout
        r = pgferry("start", "--no-schema", "--hold-back-constraints", "--keep-constraints", "--source", src.dsn,
                    "--target", dst.dsn)
        assert r.returncode == 2 and "exclude each other" in r.stderr, r.stderr
        return
    flags = {"grant": [], "hold-back": ["--hold-back-constraints"], "keep": ["--keep-constraints"]}[choice]
    if choice == "grant":
        dst.as_superuser.execute(f"GRANT SET ON PARAMETER session_replication_role TO {dst.user}")
    if choice == "keep":  # the two that write audit rows would collide with the streamed ones
        dst.execute("DROP TRIGGER child_audit ON child; DROP RULE parent_delete_log ON parent")
    d = Daemon(src, dst, "--no-schema", *flags, copy=True, ready=False)
    daemons.append(d)
    wait_for(lambda: _status(src, dst)["phase"] == "streaming" or not d.running(), 120, "streaming")
    assert d.running(), d.output()
    w = Work(src, seed=14)
    try:
        w.run(150)
    finally:
        w.close()
    d.wait_caught_up()
    if choice == "keep":
        # knowingly: parent_touch overwrites the source's updated_at; the rest arrives, change by change
        assert "applied one by one" in d.output(), d.output()
        assert_same_tables(src, dst, {"parent": ["id", "name"], "child": TABLES["child"]})
        assert dst.execute("SELECT count(*) FROM parent p WHERE updated_at IS NOT NULL")[0][0] > 0
        assert _firing(dst) == HELD - {("trigger", "public.child", "child_audit"),
                                       ("rule", "public.parent", "parent_delete_log")} and _fk_valid(dst)
        assert d.stop() == 0
        return
    assert_same_tables(src, dst, TABLES)
    if choice == "grant":
        assert _firing(dst) == HELD  # untouched: the replica role keeps them from firing
        assert not _status(src, dst)["held_back"]
        assert d.stop() == 0
        return
    assert _firing(dst) == set()
    assert "nothing fires on the published tables" in d.output()
    assert d.stop() == 0
    r = pgferry("cleanup", "--source", src.dsn, "--target", dst.dsn, "--drop-state")
    assert r.returncode == 0 and "restored 4 held-back" in r.stderr, r.stderr
    assert _firing(dst) == HELD and _fk_valid(dst)
    dst.execute("SELECT setval('audit_id_seq', (SELECT max(id) FROM audit))")  # (a cutover copies sequences)
    _works_on_the_target(dst)


DUMP = """SET statement_timeout = 0;

--
-- Name: child child_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.child
    ADD CONSTRAINT child_pkey PRIMARY KEY (id);

--
-- Name: audit r; Type: RULE; Schema: public; Owner: -
--

CREATE RULE r AS
    ON INSERT TO public.audit
   WHERE (new.op = 'X'::text) DO INSTEAD NOTHING;

--
-- Name: parent p_always; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER p_always AFTER INSERT ON public.parent FOR EACH ROW EXECUTE FUNCTION public.aud();
ALTER TABLE public.parent ENABLE ALWAYS TRIGGER p_always;

--
-- Name: "My T" "on Insert"; Type: TRIGGER; Schema: public; Owner: -
--

CREATE CONSTRAINT TRIGGER "on Insert" AFTER INSERT ON public."My T" DEFERRABLE FOR EACH ROW EXECUTE FUNCTION f();

--
-- Name: child c_nv; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.child
    ADD CONSTRAINT c_nv FOREIGN KEY (pid) REFERENCES public.parent(id) NOT VALID;

--
-- Name: pp pp_pid_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE public.pp
    ADD CONSTRAINT pp_pid_fkey FOREIGN KEY (pid) REFERENCES public.parent(id) ON DELETE CASCADE;
"""


def test_post_data_holds_back_foreign_keys_triggers_and_rules_with_their_tables():
    pd = split_post_data(DUMP, hold=True)
    assert list(pd.groups) == ["public.child"] and pd.rest == []
    got = [(h.kind, h.table, h.name, h.was_valid) for h in pd.held]
    assert got == [("rule", "public.audit", "r", True), ("trigger", "public.parent", "p_always", True),
                   ("trigger", 'public."My T"', "on Insert", True), ("foreign key", "public.child", "c_nv", False),
                   ("foreign key", "public.pp", "pp_pid_fkey", True)], got
    assert pd.held[1].definition.endswith("ENABLE ALWAYS TRIGGER p_always")  # both statements, no semicolon
    assert not pd.held[4].definition.endswith(";")
    assert len(split_post_data(DUMP).rest) == 5 and not split_post_data(DUMP).held  # without hold: created
