"""The agent's light Kubernetes transport: credentials from a kubeconfig or the pod, never the heavy client."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from modelherd.agent.kube import client as kubeclient
from modelherd.storage.errors import ConfigError


def _kubeconfig(tmp_path: Path, user: dict[str, object], cluster: dict[str, object] | None = None) -> Path:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
           "clusters": [{"name": "k", "cluster": cluster or {"server": "https://127.0.0.1:6443",
                                                             "insecure-skip-tls-verify": True}}],
           "users": [{"name": "u", "user": user}]}
    p = tmp_path / "kubeconfig"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_a_token_kubeconfig_gives_a_bearer_header(tmp_path: Path) -> None:
    client = kubeclient.load(_kubeconfig(tmp_path, {"token": "abc"}))
    url, headers = client.prepare("/api/v1/nodes", [("labelSelector", "a=b")])
    assert url == "https://127.0.0.1:6443/api/v1/nodes?labelSelector=a%3Db"
    assert headers["Authorization"] == "Bearer abc"


def test_a_token_file_is_read_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-file\n")
    client = kubeclient.load(_kubeconfig(tmp_path, {"tokenFile": str(tmp_path / "tok")}))
    assert client.prepare("/x")[1]["Authorization"] == "Bearer from-file"


def test_certificate_data_goes_to_a_private_folder(tmp_path: Path) -> None:
    ca = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=t", "-days", "1",
                         "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")], capture_output=True)
    if ca.returncode != 0:
        pytest.skip("openssl not available")
    cert = base64.b64encode((tmp_path / "c.pem").read_bytes()).decode()
    key = base64.b64encode((tmp_path / "k.pem").read_bytes()).decode()
    client = kubeclient.load(_kubeconfig(tmp_path, {"client-certificate-data": cert, "client-key-data": key},
                                         {"server": "https://127.0.0.1:6443", "certificate-authority-data": cert}))
    assert "Authorization" not in client.prepare("/x")[1]
    private = kubeclient._private_dir
    assert private is not None and (private.stat().st_mode & 0o777) == 0o700


def test_a_plugin_user_is_left_to_the_kubernetes_library(tmp_path: Path) -> None:
    assert kubeclient.from_kubeconfig(_kubeconfig(tmp_path, {"exec": {"command": "x"}})) is None


def test_no_credentials_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no Kubernetes credentials"):
        kubeclient.load(tmp_path / "missing")


def test_the_agent_runner_does_not_import_the_kubernetes_library() -> None:
    code = "import sys, modelherd.agent.runner; print(any(m.split('.')[0] == 'kubernetes' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
