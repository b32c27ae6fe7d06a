"""``modelherd pull oci://REGISTRY/REPO:TAG`` as a user runs it: the docker config from ``REGISTRY_AUTH_FILE`` /
``DOCKER_CONFIG`` / ``~/.docker/config.json``, and registry mirrors (``--registry-mirror``), against Debian's
``docker-registry`` with htpasswd auth and artifacts pushed with the real ``oras``.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from modelherd.storage.verify import verify_deep

from tests.modelgen import make_sharded_model
from tests.registry_fixtures import Registry, RegistryProxy

pytestmark = [pytest.mark.multiprocess]

USER, PASSWORD = "puller", "s3cret-Basic-pw"  # basic_registry's
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def run_cli(*args: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG"))}
    full.update({"HOME": str(home), **env})
    return subprocess.run([sys.executable, "-m", "modelherd.agent.cli", *args], env=full, text=True,
                          capture_output=True, timeout=120, check=False)


def push(reg: Registry, tmp_path: Path, ref: str) -> dict[str, bytes]:
    folder = tmp_path / "artifact"
    if not folder.exists():
        make_sharded_model(folder, n_shards=3, shard_bytes=32 * 1024)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    reg.push_files(ref, folder, list(files), user=USER if reg.users else None)
    return files


def pull(uri: str, root: Path, home: Path, *flags: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return run_cli("pull", uri, "--models-root", str(root), "--dest", str(root / "model"), "--storage-mode", "local",
                   "--coordination", "none", "--no-progress", "--download-retry", "0", *flags, env=env or {},
                   home=home)


def write_config(path: Path, host: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {host: {"auth": BASIC}}}))
    return path


def assert_pulled(result: subprocess.CompletedProcess[str], root: Path, files: dict[str, bytes]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    ready: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    assert ready["status"] == "Ready"
    for name, data in files.items():
        assert (root / "model" / name).read_bytes() == data
    assert verify_deep(root / "model", require_manifest=True) == []
    for text in (result.stdout, result.stderr):
        assert PASSWORD not in text and BASIC not in text
    return ready


def test_pull_uses_registry_auth_file_then_docker_config_then_home(basic_registry: Registry,
                                                                   tmp_path: Path) -> None:
    files = push(basic_registry, tmp_path, "org/model:v1")
    uri = f"oci://{basic_registry.host}/org/model:v1"
    home = tmp_path / "home"
    home.mkdir()

    anonymous = pull(uri, tmp_path / "r0", home)
    assert anonymous.returncode != 0 and "user and password" in anonymous.stderr, anonymous.stderr

    auth = write_config(tmp_path / "auth.json", basic_registry.host)
    ready = assert_pulled(pull(uri, tmp_path / "r1", home, env={"REGISTRY_AUTH_FILE": str(auth)}),
                          tmp_path / "r1", files)
    assert str(ready["revision"]).startswith("sha256:") and ready["uri"] == uri

    write_config(tmp_path / "dockercfg" / "config.json", basic_registry.host)
    assert_pulled(pull(uri, tmp_path / "r2", home, env={"DOCKER_CONFIG": str(tmp_path / "dockercfg")}),
                  tmp_path / "r2", files)

    write_config(home / ".docker" / "config.json", basic_registry.host)
    assert_pulled(pull(uri, tmp_path / "r3", home), tmp_path / "r3", files)

    # the flag wins over the environment; a named file that is missing is an error, never an anonymous pull
    missing = pull(uri, tmp_path / "r4", home, "--registry-auth-file", str(tmp_path / "nope.json"),
                   env={"REGISTRY_AUTH_FILE": str(auth)})
    assert missing.returncode != 0 and "nope.json" in missing.stderr, missing.stderr


def test_a_mirror_is_asked_first_with_its_own_credentials_and_the_registry_when_it_fails(
        basic_registry: Registry, registry: Registry, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # the mirror (a proxy-cache project "hub-cache") holds the artifact; the registry named in the URI does not exist
    files = push(basic_registry, tmp_path, "hub-cache/org/model:v1")
    auth = write_config(tmp_path / "auth.json", basic_registry.host)
    with RegistryProxy(basic_registry, "count") as mirror:
        write_config(auth, mirror.host)
        result = pull("oci://models.invalid/org/model:v1", tmp_path / "r1", home,
                      "--registry-mirror", f"models.invalid={mirror.host}/hub-cache",
                      env={"REGISTRY_AUTH_FILE": str(auth)})
        assert_pulled(result, tmp_path / "r1", files)
        assert mirror.blob_requests == len(files)

    # a mirror that is down: the registry itself (anonymous here) serves the pull
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    files = push(registry, tmp_path, "org/model:v1")
    result = pull(f"oci://{registry.host}/org/model:v1", tmp_path / "r2", home,
                  env={"MODELHERD_REGISTRY_MIRRORS": json.dumps({registry.host: closed})})
    assert_pulled(result, tmp_path / "r2", files)
    assert "mirror" in result.stderr and closed in result.stderr
