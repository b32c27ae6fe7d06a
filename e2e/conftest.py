"""The e2e suite's cluster: read from ``DIR/env`` written by ``e2e/cluster/up`` (or ``e2e/kind/run``).

Set ``MODELHERD_E2E_ENV=DIR/env``; without it every ``e2e`` test is skipped (the unit/integration run never
needs a cluster). Each test installs the agent with ``helm install`` into its own namespace and uninstalls it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.path).startswith(str(HERE)):
            item.add_marker(pytest.mark.e2e)
            if not os.environ.get("MODELHERD_E2E_ENV"):
                item.add_marker(pytest.mark.skip(reason="no cluster: set MODELHERD_E2E_ENV=DIR/env "
                                                        "(e2e/cluster/up DIR, or e2e/kind/run)"))


@dataclass
class Cluster:
    env: dict[str, str]
    api: Any

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def sh(self, *args: str, timeout: float = 180) -> str:
        e = {**os.environ, "KUBECONFIG": self.env["KUBECONFIG"]}
        return subprocess.run(args, check=True, capture_output=True, text=True, env=e, timeout=timeout).stdout

    def kubectl(self, *args: str) -> str:
        return self.sh(self.env["KUBECTL"], *args)

    def helm(self, *args: str) -> str:
        return self.sh(self.env["HELM"], *args)

    def hub_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.env["HUB_STATS_URL"], timeout=5) as r:
            stats: dict[str, Any] = json.loads(r.read())
        return stats

    def publish(self, repo: str, src: Path) -> None:
        """Put a model folder under the Hub's root (rename, so it is never served half-written); wait until served."""
        org, name = repo.split("/")
        dest = Path(self.env["HUB_ROOT"]) / org / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{name}.{uuid.uuid4().hex[:6]}"
        subprocess.run(["cp", "-a", str(src), str(tmp)], check=True)
        tmp.rename(dest)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.env['HUB_URL']}/api/models/{repo}", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the Hub does not serve {repo}")


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    env_file = Path(os.environ["MODELHERD_E2E_ENV"])
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])
    cl = Cluster(env, api)
    cl.kubectl("apply", "-f", str(ROOT / "charts" / "modelherd" / "files" / "crds"))
    return cl


def chart_path() -> Path:
    """The project's chart once it is in the checkout, else the suite's minimal one."""
    real = ROOT / "charts" / "modelherd"
    return real if (real / "Chart.yaml").exists() else HERE / "testchart"


@pytest.fixture
def agents(cluster: Cluster) -> Iterator[str]:
    """``helm install`` the agent into a fresh namespace; yields the namespace; ``helm uninstall`` after."""
    ns = f"mh-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    e = cluster.env
    cluster.helm("install", "modelherd", str(chart_path()), "-n", ns, "--wait", "--timeout", "180s",
                 "--set", f"image={e['IMAGE']}", "--set", f"modelsRoot={e['MODELS_ROOT']}",
                 "--set", f"hubUrl={e['HUB_URL']}",
                 "--set-json", json.dumps({"modelherd.e2e/netns": "true"}).join(["nodeSelector=", ""]))
    yield ns
    cluster.helm("uninstall", "modelherd", "-n", ns, "--wait", "--timeout", "120s")
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
