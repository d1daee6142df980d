"""deploy/: the Prometheus alerting rules pass promtool's check and their unit tests, the Grafana
dashboard is well formed and its queries parse, and every pgferry_* metric either names is one a
running daemon exposes (as the exposition names it: counters with `_total`, histograms' `_bucket`,
`_sum`, `_count`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replicator.local.servers import LocalServer
from tests.pgplugin import Daemon, main_pair_only, new_db, publish_same_table, require_installed, wait_for
from tests.replicator.test_operability import _free_port

ROOT = Path(__file__).parents[1]
RULES = ROOT / "deploy" / "prometheus" / "pgferry-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "pgferry-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "pgferry-dashboard.json"
METRIC = re.compile(r"\bpgferry_[a-z0-9_]*[a-z0-9]\b")


def _promtool() -> str:
    path = shutil.which("promtool")
    require_installed(path, "promtool is not installed (Debian: apt-get install prometheus)")
    assert path is not None
    return path


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _alerts() -> list[str]:
    """The rules file's alerting rules, each as its text (from `- alert:` to the next)."""
    text = RULES.read_text()
    return ["- alert:" + block for block in text.split("- alert:")[1:]]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row's


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets and the variables' queries."""
    out = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["definition"])
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_rules_pass_promtool_check():
    res = _run(_promtool(), "check", "rules", str(RULES))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_rules_unit_tests_pass():
    """deploy/prometheus/tests/: the lag, conflict, down, slot, pause and cutover alerts on input series."""
    res = _run(_promtool(), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_in_the_docs():
    alerts = _alerts()
    assert len(alerts) >= 8
    for alert in alerts:
        name = alert.split()[2]
        assert re.search(r"^\s+severity: (critical|warning)$", alert, re.M), name
        assert re.search(r"^\s+summary: ", alert, re.M) and re.search(r"^\s+description: ", alert, re.M), name
        found = re.search(r'^\s+runbook_url: "(docs/[\w.-]+\.md)#([\w-]+)"$', alert, re.M)
        assert found, name
        doc, anchor = ROOT / found[1], found[2]
        anchors = {_slug(line.lstrip("#")) for line in doc.read_text().splitlines() if line.startswith("#")}
        assert anchor in anchors, (name, found[0], sorted(anchors))


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    panels = list(_panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            if "pgferry_" in t["expr"] and "label_values" not in t["expr"]:
                assert 'job=~"$job", instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]


def test_dashboard_queries_parse(tmp_path):
    """Each query as a recording rule (Grafana's variables filled in) through promtool's parser."""
    promtool = _promtool()
    dashboard = json.loads(DASHBOARD.read_text())
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(_expressions(dashboard)):
        expr = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        if expr.startswith("label_values("):  # Grafana's own function: its selector is PromQL
            expr = expr[len("label_values("):].rpartition(",")[0]
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    res = _run(promtool, "check", "rules", str(rules))
    assert res.returncode == 0, res.stdout + res.stderr + rules.read_text()


# Names in the exposition a query can use, per family type (prometheus_client's parser names a
# counter's family without `_total`, its samples with it)
_SERIES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def _exposed(text: str) -> tuple[set[str], set[str]]:
    """(series names a query can use, sample names present) in a /metrics response."""
    from prometheus_client.parser import text_string_to_metric_families

    names, samples = set(), set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SERIES.get(family.type, ("",)))
        samples.update(s.name for s in family.samples)
    return names | samples, samples


def _referenced() -> dict[str, set[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {"rules": set(METRIC.findall(RULES.read_text())),
            "dashboard": {m for expr in _expressions(dashboard) for m in METRIC.findall(expr)}}


@pytest.mark.pg
def test_every_metric_the_rules_and_the_dashboard_name_is_exposed_by_a_daemon(pair, daemons):
    """A daemon streaming from a source with max_slot_wal_keep_size (so that safe_wal_size is
    reported) has applied rows, a schema change and a conflict: every pgferry_* name in the rules
    and the dashboard's queries is in its /metrics."""
    _, dst = pair
    main_pair_only(*pair, "the metric names do not depend on the versions: checked on 15 -> 18")
    referenced = _referenced()
    assert {"pgferry_conflicts_total", "pgferry_lag_seconds"} <= referenced["rules"]
    assert {"pgferry_batch_rows_bucket", "pgferry_rows_applied_total"} <= referenced["dashboard"]
    server = LocalServer(pair[0].version, settings={"max_slot_wal_keep_size": "1GB"}, name="deploy-").start()
    try:
        src = new_db(server, "src")
        publish_same_table(src, dst, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        port = _free_port()
        d = Daemon(src, dst, "--metrics-port", str(port), "--metrics-address", "127.0.0.1")
        daemons.append(d)
        src.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
        src.execute("UPDATE t SET v = 'y' WHERE id <= 10")
        src.execute("DELETE FROM t WHERE id > 90")
        src.execute("ALTER TABLE t ADD COLUMN w int")  # a captured schema change
        d.wait_caught_up()
        dst.execute("DELETE FROM t WHERE id = 1")
        src.execute("UPDATE t SET v = 'z' WHERE id = 1")  # update_missing: skipped, counted
        d.wait_caught_up()

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

        wait_for(lambda: "pgferry_conflicts_total{" in scrape(), 30, "the conflict in the metrics")
        text = scrape()
        names, samples = _exposed(text)
        # counters are exposed with _total, histograms as _bucket/_sum/_count: as the rules use them
        assert {"pgferry_conflicts_total", "pgferry_schema_changes_total", "pgferry_rows_applied_total",
                "pgferry_batch_rows_bucket", "pgferry_batch_seconds_count", "pgferry_slot_safe_wal_size_bytes",
                "pgferry_wal_guard"} <= samples, text
        for where, used in referenced.items():
            assert used - names == set(), f"the {where} name metrics the daemon does not expose:\n{text}"
        assert d.stop() == 0
    finally:
        for x in daemons:
            x.close()
        server.cleanup()
