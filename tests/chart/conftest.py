"""Fixtures of the chart tests: helm and helm-unittest (``scripts/chart-tools.sh``), and rendering the chart.

The tools are built (first time: a minute or two) or found in the cache once, when the run's tests are collected,
outside any test's timeout; a build that fails fails every chart test with its output (never a skip).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chart.support import CHART_TOOLS

_TOOLS_TIMEOUT_S = 1800
_tools: dict[str, str] = {}
_tools_error: str | None = None


@dataclass(frozen=True)
class ChartTools:
    helm: Path
    helm_unittest: Path
    helm_plugins: Path


def pytest_collection_finish(session: pytest.Session) -> None:
    global _tools_error
    if session.config.option.collectonly:
        return
    here = Path(__file__).resolve().parent
    if not any(Path(str(item.path)).resolve().is_relative_to(here) for item in session.items):
        return
    try:
        proc = subprocess.run(["bash", str(CHART_TOOLS), "all"], capture_output=True, text=True,
                              timeout=_TOOLS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        _tools_error = f"scripts/chart-tools.sh took more than {_TOOLS_TIMEOUT_S}s"
        return
    if proc.returncode != 0:
        _tools_error = f"scripts/chart-tools.sh failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        return
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            _tools[name] = value


@pytest.fixture(scope="session")
def chart_tools() -> ChartTools:
    if _tools_error is not None:
        pytest.fail(_tools_error, pytrace=False)
    try:
        tools = ChartTools(Path(_tools["helm"]), Path(_tools["helm-unittest"]), Path(_tools["helm-plugins"]))
    except KeyError as exc:
        pytest.fail(f"scripts/chart-tools.sh printed no {exc} path", pytrace=False)
    for path in (tools.helm, tools.helm_unittest):
        if not path.is_file():
            pytest.fail(f"chart tool missing: {path}", pytrace=False)
    return tools
