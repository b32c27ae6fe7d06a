"""Paths and helpers shared by the chart tests: the chart, its ci values files, rendering with helm."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "modelherd"
CHART_TOOLS = REPO_ROOT / "scripts" / "chart-tools.sh"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
PROM_CRDS = REPO_ROOT / "tests" / "data" / "prometheus-operator-crds"
KUBE_VERSION = "1.34.0"


def ci_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml").removesuffix(".yaml")


def run(cmd: Sequence[str | Path], *, timeout: float = 120, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; with ``check``, fail with its output when it exits non-zero."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(str(c) for c in cmd)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def manifests(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(helm: Path, values: Path | None = None, *, release: str = "mh", namespace: str = "models",
           extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``helm template`` of the chart for Kubernetes 1.34, as objects."""
    cmd: list[str | Path] = [helm, "template", release, CHART, "--namespace", namespace,
                             "--kube-version", KUBE_VERSION, *extra]
    if values is not None:
        cmd += ["--values", values]
    return manifests(run(cmd).stdout)
