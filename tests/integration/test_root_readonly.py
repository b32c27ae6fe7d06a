"""A read-only models root: a model already published there is Ready; a new one is Failed with the typed root
error (never Updating forever, never a traceback per retry), and the other models carry on.

The agent runs in a mount namespace of its own (``unshare -m``) where the models root is a read-only bind mount,
as a node that mounts the shared models filesystem read-only sees it.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.agent_fleet as agent_fleet
from tests.agent_fleet import Fleet, eventually
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model

pytestmark = [pytest.mark.k8s, pytest.mark.multiprocess]

KiB = 1024


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture
def readonly_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make :meth:`Fleet.start` run the agent with ``root`` bind-mounted read-only in its own mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private read-only bind mount")
    root = tmp_path / "models"
    root.mkdir()
    wrapper = tmp_path / "modelherd-ro"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec unshare -m --propagation private sh -c 'mount --bind \"$0\" \"$0\" && "
        f"mount -o remount,bind,ro \"$0\" \"$0\" && exec \"$@\"' {root} {agent_fleet.MODELHERD} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(agent_fleet, "MODELHERD", str(wrapper))
    return root


def test_a_read_only_root_fails_a_new_model_with_the_root_error_and_keeps_a_published_one_ready(
        fleet: Fleet, hub: HubServer, readonly_agent: Path, tmp_path: Path) -> None:
    from modelherd.agent.reporting.keys import configmap_key
    from modelherd.storage.engine import EngineOptions, pull
    from modelherd.storage.sources import open_source
    from modelherd.storage.uri import parse_uri

    root = readonly_agent
    src = tmp_path / "src"
    make_sharded_model(src, n_shards=2, shard_bytes=32 * KiB)
    hub.add_repo("ro/published", src)
    hub.add_repo("ro/new", src, revision="main")
    uri = parse_uri("hf://ro/published")
    source = open_source(uri, hf_endpoint=fleet.hub_endpoint)
    try:  # published before the node went read-only (another node wrote it)
        pull(source, root / "ro/published", models_root=root, options=EngineOptions(), writer="other-node")
    finally:
        source.close()

    node = fleet.add_node("ro")
    agent = fleet.start(node, root, "--storage-mode", "shared", "--coordination", "none")
    fleet.wait_ready(agent)
    fleet.create_cbm(f"published-{fleet.tag}", "hf://ro/published")
    fleet.create_cbm(f"new-{fleet.tag}", "hf://ro/new")
    eventually(lambda: (fleet.entry(node, configmap_key("ClusterBaseModel", "", f"published-{fleet.tag}")) or {})
               .get("status") == "Ready", timeout=60, what="the published model Ready on the read-only node")
    entry = eventually(lambda: (e := fleet.entry(node, configmap_key("ClusterBaseModel", "", f"new-{fleet.tag}")))
                       and e["status"] == "Failed" and e, timeout=60, what="the new model Failed")
    message = entry["modelherd"]["message"]
    assert "is not writable" in message and str(root) in message, message
    assert agent.proc.poll() is None
    logs = fleet.logs()
    assert "Traceback" not in logs and "unexpectedly" not in logs, logs[-3000:]
    assert not (root / "ro/new").exists()
