"""The alert rules and the dashboard, checked by Prometheus' own tools (``promtool`` from Debian's ``prometheus``):
the rendered rules load, every alert has a firing and a not-firing unit test, the rendered file is in step with the
chart's Helm template, and every dashboard query is valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring import render_rules

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "alerts.rules.yaml"
TESTS = sorted((ROOT / "monitoring" / "tests").glob("*.yaml"))
DASHBOARD = ROOT / "charts" / "modelherd" / "files" / "dashboard.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
CHART_README = ROOT / "charts" / "modelherd" / "files" / "README.md"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed (Debian package prometheus; scripts/test.sh installs it)")
    return path


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_check_rules_accepts_the_rendered_rules() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(_alerts())} rules found" in out.stdout


def test_promtool_unit_tests_pass_for_every_alert_firing_and_not_firing() -> None:
    assert TESTS, "monitoring/tests/*.yaml missing"
    out = subprocess.run([_promtool(), "test", "rules", *map(str, TESTS)], capture_output=True, text=True,
                         cwd=ROOT / "monitoring" / "tests")
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_not_firing_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_the_rendered_rules_are_the_chart_template_with_its_defaults() -> None:
    assert RULES.read_text() == render_rules.rendered_defaults(), \
        "monitoring/alerts.rules.yaml is stale: run python3 monitoring/render_rules.py"
    assert render_rules.main(["--check"]) == 0


def test_alerts_follow_the_mixin_conventions_and_link_an_existing_runbook_section() -> None:
    anchors = {re.sub(r"[^a-z0-9-]", "", line[3:].strip().lower().replace(" ", "-"))
               for line in RUNBOOKS.read_text().splitlines() if line.startswith("## ")}
    for alert in _alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Modelherd(?:[A-Z][a-z0-9]+)+", name), name
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        ann = alert["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert ann["summary"].endswith(".") and "{{" not in ann["summary"], name
        anchor = ann["runbook_url"].rpartition("#")[2]
        assert anchor == name.lower() and anchor in anchors, f"{name}: no runbook section {anchor!r}"
        assert "for" in alert, f"{name}: no for:"


def test_every_values_key_of_the_template_is_documented_for_the_chart() -> None:
    keys = render_rules.defaults(render_rules.TEMPLATE.read_text())
    readme = CHART_README.read_text()
    assert len(keys) >= 20
    missing = [k for k, default in keys.items() if f"`{k}`" not in readme or f"`{default}`" not in readme]
    assert missing == [], f"monitoring.rules keys not documented with their default in {CHART_README.name}"


def test_overrides_replace_thresholds_and_a_misspelt_key_is_rejected() -> None:
    template = render_rules.TEMPLATE.read_text()
    text = render_rules.render(template, {"modelFailedFor": "42m", "selector": 'job="gpu-agents"'})
    failed = next(r for g in yaml.safe_load(text)["groups"] for r in g["rules"]
                  if r["alert"] == "ModelherdModelFailed")
    assert failed["for"] == "42m"
    assert 'job="gpu-agents"' in failed["expr"] and 'job="modelherd"' not in text
    assert "42m" in failed["annotations"]["description"]
    with pytest.raises(render_rules.TemplateError, match="modelFailedFr"):
        render_rules.render(template, {"modelFailedFr": "1m"})


@pytest.mark.parametrize("bad", ['{{ .Values.other | default "x" }}', "{{ include \"x\" . }}", "a }} b",
                                 '{{ .Values.monitoring.rules.x | default "1m" }} {{ .Values.monitoring.rules.x'
                                 ' | default "2m" }}'])
def test_template_actions_the_renderer_cannot_reproduce_are_errors(bad: str) -> None:
    with pytest.raises(render_rules.TemplateError):
        render_rules.render(f"expr: {bad}\n")


def test_every_dashboard_query_is_valid_promql_and_uses_the_job_and_node_variables(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "$job" in variables["node"]["query"]["query"]
    rules = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert 'job=~"$job"' in t["expr"] and 'node=~"$node"' in t["expr"], (panel["title"], t["expr"])
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$job", "modelherd").replace("$node", ".*")
            rules.append({"record": f"dashboard:q{len(rules)}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("state per node", "throughput", "origin vs verified", "lease", "verification", "queue", "free"):
        assert topic in titles, topic
