"""Post-data after the copy: pg_dump's objects grouped per table (pure), then created `jobs` tables
at a time and resumed per table after a crash, on real servers."""

from __future__ import annotations

import pytest

from replicator.sync.postdata import SMALL_STATEMENTS_PER_TXN, SMALL_TABLE_BYTES, pack_small_groups, split_post_data
from tests.pgplugin import Daemon, Db

# The statements that make every kind of post-data object pg_dump writes for these tables.
OBJECTS = """
CREATE TABLE a (id int PRIMARY KEY, u text UNIQUE, v int);
CREATE INDEX a_v ON a (v) WHERE v > 0;
CREATE TABLE "Odd Name" (id int PRIMARY KEY, a_id int REFERENCES a(id));
ALTER TABLE "Odd Name" ADD CONSTRAINT pos CHECK (id > 0) NOT VALID;
CREATE FUNCTION trg() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER t1 BEFORE INSERT OR UPDATE OF v ON a FOR EACH ROW EXECUTE FUNCTION trg();
CREATE TABLE p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);
CREATE INDEX p_k ON p (k);
CREATE SCHEMA s2;
CREATE TABLE s2.b (id int, EXCLUDE USING btree (id WITH =));
CREATE STATISTICS st1 ON id, v FROM a;
CREATE RULE r1 AS ON DELETE TO s2.b DO INSTEAD NOTHING;
INSERT INTO a SELECT g, 'u' || g, g FROM generate_series(1, 200000) g;  -- 9 MB: a group of its own
INSERT INTO "Odd Name" SELECT g, g FROM generate_series(1, 5000) g;
INSERT INTO p SELECT g, g % 10 FROM generate_series(1, 3000) g;
INSERT INTO s2.b SELECT generate_series(1, 100);
"""

# What pg_dump 18 printed for them (post-data, --no-owner), shortened to what the split reads.
DUMP = """--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);

--
-- Name: Odd Name Odd Name_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public."Odd Name"
    ADD CONSTRAINT "Odd Name_pkey" PRIMARY KEY (id);


--
-- Name: a a_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.a
    ADD CONSTRAINT a_pkey PRIMARY KEY (id);


--
-- Name: Odd Name pos; Type: CHECK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE public."Odd Name"
    ADD CONSTRAINT pos CHECK ((id > 0)) NOT VALID;


--
-- Name: b b_id_excl; Type: CONSTRAINT; Schema: s2; Owner: -
--

ALTER TABLE ONLY s2.b
    ADD CONSTRAINT b_id_excl EXCLUDE USING btree (id WITH =);


--
-- Name: a_v; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX a_v ON public.a USING btree (v) WHERE (v > 0);


--
-- Name: p_k; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX p_k ON ONLY public.p USING btree (k);


--
-- Name: p1_k_idx; Type: INDEX ATTACH; Schema: public; Owner: -
--

ALTER INDEX public.p_k ATTACH PARTITION public.p1_k_idx;


--
-- Name: a t1; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER t1 BEFORE INSERT OR UPDATE OF v ON public.a FOR EACH ROW EXECUTE FUNCTION public.trg();


--
-- Name: Odd Name Odd Name_a_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public."Odd Name"
    ADD CONSTRAINT "Odd Name_a_id_fkey" FOREIGN KEY (a_id) REFERENCES public.a(id);


--
-- PostgreSQL database dump complete
--
"""


def test_post_data_splits_into_per_table_groups_and_the_rest_in_dump_order():
    pd = split_post_data(DUMP)
    assert "SET statement_timeout = 0;" in pd.preamble and "Name:" not in pd.preamble
    assert list(pd.groups) == ['public."Odd Name"', "public.a", "s2.b", "public.p"]
    assert pd.groups['public."Odd Name"'] == [
        'ALTER TABLE ONLY public."Odd Name"\n    ADD CONSTRAINT "Odd Name_pkey" PRIMARY KEY (id);',
        'ALTER TABLE public."Odd Name"\n    ADD CONSTRAINT pos CHECK ((id > 0)) NOT VALID;']
    assert pd.groups["public.a"] == ["ALTER TABLE ONLY public.a\n    ADD CONSTRAINT a_pkey PRIMARY KEY (id);",
                                     "CREATE INDEX a_v ON public.a USING btree (v) WHERE (v > 0);"]
    # what needs another object (FK, partition attach) or is not a per-table index or constraint
    assert [s.split()[:2] for s in pd.rest] == [["ALTER", "INDEX"], ["CREATE", "TRIGGER"], ["ALTER", "TABLE"]]
    assert "FOREIGN KEY" in pd.rest[-1] and "dump complete" not in pd.rest[-1]
    assert split_post_data("SET x = 1;\n").groups == {}


def test_small_tables_share_transactions_up_to_a_statement_bound():
    big, small, limit = SMALL_TABLE_BYTES, 1000, SMALL_STATEMENTS_PER_TXN
    groups = {"big": ["x"] * 3, "wide": ["x"] * limit, **{f"t{i}": ["x", "x"] for i in range(limit)}}
    size = {"big": big, "wide": small, **{f"t{i}": small for i in range(limit)}}
    units = pack_small_groups(list(groups), size, groups)
    assert units[:2] == [["big"], ["wide"]]  # a big table alone; so is a small one with as many statements
    rest = units[2:]
    assert [t for u in rest for t in u] == [f"t{i}" for i in range(limit)]  # every table once, in order
    assert all(sum(len(groups[t]) for t in u) <= limit for u in rest) and len(rest) == 2
    assert pack_small_groups([], {}, {}) == []


def _definitions(db: Db) -> list[str]:
    """Every index, constraint, trigger, rule and extended statistics object of the user's tables."""
    return [r[0] for r in db.execute("""
        SELECT 'index ' || pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END
        FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('public', 's2')
        UNION ALL SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace::regnamespace::text IN ('public', 's2') AND conrelid <> 0
            AND contype <> 'n'  -- PostgreSQL 18 lists NOT NULL constraints too
        UNION ALL SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
        UNION ALL SELECT 'rule ' || definition FROM pg_rules WHERE schemaname IN ('public', 's2')
        UNION ALL SELECT 'statistics ' || stxname FROM pg_statistic_ext
        ORDER BY 1""")]


@pytest.mark.pg
def test_post_data_killed_after_a_table_resumes_with_the_other_tables(pair, daemons):
    src, dst = pair
    src.psql(OBJECTS)
    d = Daemon(src, dst, "--jobs", "2", copy=True, ready=False, env={"PGFERRY_FAILPOINT": "mid_post_data"})
    daemons.append(d)
    assert d.wait_exit(timeout=120) == 99, d.output()
    done = sorted(r[0] for r in dst.execute("SELECT item FROM pgferry.post_data"))
    # a big table's group commits alone, the small tables' groups together: one of the two, not the rest
    assert done in (["public.a"], ['public."Odd Name"', "public.p", "public.p1", "s2.b"]), done
    assert dst.execute("SELECT post_data_done FROM pgferry.sync") == [(False,)]
    d.env.pop("PGFERRY_FAILPOINT")
    d.start()
    d.wait_ready()
    assert d.stop() == 0, d.output()
    out = d.output()
    assert "were created before" in out and "Traceback" not in out, out
    assert _definitions(dst) == _definitions(src)
    assert dst.execute("SELECT post_data_done FROM pgferry.sync") == [(True,)]
    assert len(dst.execute("SELECT item FROM pgferry.post_data")) == 6  # five tables (p1 too) and the rest
