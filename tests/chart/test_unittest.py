"""The chart's helm-unittest suites (charts/modelherd/tests/*_test.yaml), one pytest test per suite file.

Also: the runner itself fails on a broken chart (so a green run means the assertions held), and the suites are
not packaged with the chart.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.chart.conftest import ChartTools
from tests.chart.support import CHART, run

SUITES = sorted((CHART / "tests").glob("*_test.yaml"))
_COUNTS = re.compile(r"^Tests:\s+(?:(\d+) failed, )?(?:(\d+) errored, )?(\d+) passed, (\d+) total", re.M)


def _unittest(tools: ChartTools, chart: Path, suite: str, *, plugin: bool = False) -> tuple[int, str, int]:
    """Run one suite file; (exit code, output, tests passed)."""
    if plugin:
        env = {**os.environ, "HELM_PLUGINS": str(tools.helm_plugins)}
        cmd: list[str | Path] = [tools.helm, "unittest", "--strict", "--color=false", "-f", suite, chart]
        proc = run(cmd, check=False, env=env)
    else:
        proc = run([tools.helm_unittest, "--strict", "--color=false", "-f", suite, chart], check=False)
    out = proc.stdout + proc.stderr
    m = _COUNTS.search(out)
    return proc.returncode, out, int(m.group(3)) if m else 0


def test_every_template_is_tested_by_some_suite() -> None:
    tested: set[str] = set()
    for suite in SUITES:
        tested |= set(yaml.safe_load(suite.read_text()).get("templates") or [])
    templates = {f"templates/{p.name}" for p in (CHART / "templates").iterdir() if not p.name.startswith("_")}
    assert templates, "no templates found"
    assert templates <= tested, f"templates no suite renders: {sorted(templates - tested)}"


@pytest.mark.parametrize("suite", SUITES, ids=[p.name.removesuffix("_test.yaml") for p in SUITES])
def test_helm_unittest_suite_passes(chart_tools: ChartTools, suite: Path) -> None:
    rc, out, passed = _unittest(chart_tools, CHART, f"tests/{suite.name}")
    assert rc == 0, out
    assert passed > 0, f"no test ran:\n{out}"
    assert " FAIL " not in out, out


def test_helm_unittest_runs_as_a_helm_plugin_too(chart_tools: ChartTools) -> None:
    rc, out, passed = _unittest(chart_tools, CHART, "tests/crds_test.yaml", plugin=True)
    assert rc == 0, out
    assert passed == 3, out


def test_a_chart_that_surges_fails_the_daemonset_suite(chart_tools: ChartTools, tmp_path: Path) -> None:
    broken = tmp_path / "modelherd"
    shutil.copytree(CHART, broken)
    ds = broken / "templates" / "daemonset.yaml"
    text = ds.read_text()
    assert "maxSurge: 0" in text
    ds.write_text(text.replace("maxSurge: 0", "maxSurge: 1"))
    rc, out, _ = _unittest(chart_tools, broken, "tests/daemonset_test.yaml")
    assert rc != 0, out
    assert "never surges" in out and "keeps maxSurge 0" in out, out


def test_a_chart_granting_secrets_cluster_wide_fails_the_rbac_suite(chart_tools: ChartTools, tmp_path: Path) -> None:
    broken = tmp_path / "modelherd"
    shutil.copytree(CHART, broken)
    rbac = broken / "templates" / "agent-clusterrole.yaml"
    text = rbac.read_text()
    anchor = "    resources: [events]\n    verbs: [create, patch]\n"
    assert anchor in text
    rbac.write_text(text.replace(anchor, anchor + '  - apiGroups: [""]\n    resources: [secrets]\n'
                                 "    verbs: [get, list, watch]\n", 1))
    rc, out, _ = _unittest(chart_tools, broken, "tests/rbac_test.yaml")
    assert rc != 0, out
    assert "grants no Secret, no wildcard and no delete cluster-wide" in out, out


def test_the_package_leaves_out_the_suites_and_ci_values(chart_tools: ChartTools, tmp_path: Path) -> None:
    run([chart_tools.helm, "package", CHART, "--destination", tmp_path])
    (pkg,) = tmp_path.glob("modelherd-*.tgz")
    with tarfile.open(pkg) as tar:
        names = tar.getnames()
    assert "modelherd/Chart.yaml" in names and "modelherd/values.schema.json" in names, names
    assert "modelherd/files/crds/ome.io_basemodels.yaml" in names, names
    assert not [n for n in names if n.startswith(("modelherd/tests/", "modelherd/ci/"))], names
