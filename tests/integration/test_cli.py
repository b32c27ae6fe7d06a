"""`modelherd` as a user runs it: a real process against the loopback Hub, real files, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubServer
from tests.modelgen import make_sharded_model, make_trtllm_model
from tests.support import nvml_available

SHARED_FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "nvml-h200.json"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "modelherd.agent.cli", *args], env=full_env, text=True,
                          capture_output=True, timeout=timeout, check=False, cwd=cwd)


def pull_hf(hub: HubServer, repo: str, root: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``modelherd pull hf://REPO --models-root ROOT --no-progress FLAGS`` against the loopback Hub."""
    return run_cli("pull", f"hf://{repo}", "--models-root", str(root), "--no-progress", *flags,
                   env={"HF_ENDPOINT": hub.endpoint})


@pytest.fixture
def sharded_repo(hub_server: HubServer, tmp_path: Path) -> tuple[HubServer, Path]:
    src = tmp_path / "src"
    make_sharded_model(src, 3, 300_000)
    hub_server.add_repo("acme/tiny", src, lfs_min_size=100_000)
    return hub_server, src


def test_pull_places_a_verified_model_and_prints_ready(sharded_repo: tuple[HubServer, Path], tmp_path: Path) -> None:
    hub, src = sharded_repo
    root = tmp_path / "models"
    r = pull_hf(hub, "acme/tiny", root)
    assert r.returncode == 0, r.stderr
    ready = json.loads(r.stdout.strip().splitlines()[-1])
    assert ready["status"] == "Ready" and ready["dest"] == str((root / "acme/tiny").resolve())
    for f in src.rglob("*"):
        if f.is_file():
            assert (root / "acme/tiny" / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert not any((root / ".modelherd-staging").iterdir()), "staging must be empty after a pull"

    v = run_cli("verify", str(root / "acme/tiny"), "--deep")
    assert v.returncode == 0, v.stdout + v.stderr

    # second pull of the same revision: no body bytes from the origin
    hub.reset_counters()
    again = pull_hf(hub, "acme/tiny", root)
    assert again.returncode == 0, again.stderr
    assert hub.stats()["bytes_served"] == 0


def test_verify_reports_a_corrupted_shard_with_exit_5(sharded_repo: tuple[HubServer, Path], tmp_path: Path) -> None:
    hub, _ = sharded_repo
    root = tmp_path / "models"
    assert pull_hf(hub, "acme/tiny", root).returncode == 0
    shard = root / "acme/tiny/model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run_cli("verify", str(root / "acme/tiny")).returncode == 0, "quick verify does not read weights"
    deep = run_cli("verify", str(root / "acme/tiny"), "--deep")
    assert deep.returncode == 5
    assert "model-00002-of-00003.safetensors" in deep.stdout

    with open(shard, "r+b") as f:
        f.truncate(len(data) - 10)
    quick = run_cli("verify", str(root / "acme/tiny"))
    assert quick.returncode == 5 and "model-00002-of-00003.safetensors" in quick.stdout


@pytest.mark.parametrize("uri", ["hf://", "s3://bucket/x", "hf://a/b/c", "oci://nope", "local://relative"])
def test_bad_uri_exits_2_naming_accepted_forms(uri: str, tmp_path: Path) -> None:
    r = run_cli("pull", uri, "--models-root", str(tmp_path))
    assert r.returncode == 2
    assert "oci://n/NAMESPACE/b/BUCKET/o/PREFIX" in r.stderr and "hf://ORG/MODEL" in r.stderr


def test_missing_repo_exits_3_and_writes_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    root = tmp_path / "models"
    r = pull_hf(hub_server, "acme/does-not-exist", root)
    assert r.returncode == 3, r.stderr
    assert not (root / "acme").exists()


def test_token_is_used_but_never_printed(hub_server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_sharded_model(src, 1, 200_000)
    hub_server.add_repo("acme/private", src, lfs_min_size=100_000, token=HUB_TOKEN)
    root = tmp_path / "models"
    denied = run_cli("pull", "hf://acme/private", "--models-root", str(root), "--no-progress",
                     env={"HF_ENDPOINT": hub_server.endpoint, "MODELHERD_LOG_LEVEL": "DEBUG"})
    assert denied.returncode == 3
    ok = run_cli("pull", "hf://acme/private", "--models-root", str(root), "--no-progress",
                 env={"HF_ENDPOINT": hub_server.endpoint, "HF_TOKEN": HUB_TOKEN, "MODELHERD_LOG_LEVEL": "DEBUG"})
    assert ok.returncode == 0, ok.stderr
    assert HUB_TOKEN not in ok.stdout + ok.stderr + denied.stdout + denied.stderr
    manifest = (root / "acme/private/.modelherd-manifest.json").read_text()
    assert HUB_TOKEN not in manifest


def test_dest_outside_models_root_is_refused(sharded_repo: tuple[HubServer, Path], tmp_path: Path) -> None:
    hub, _ = sharded_repo
    root = tmp_path / "models"
    outside = tmp_path / "elsewhere"
    r = pull_hf(hub, "acme/tiny", root, "--dest", str(outside))
    assert r.returncode == 4
    assert not outside.exists()
    r2 = pull_hf(hub, "acme/tiny", root, "--dest", "../escape")
    assert r2.returncode == 4
    assert not (tmp_path / "escape").exists()


def test_trtllm_pull_keeps_only_this_nodes_gpu_shape(hub_server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_trtllm_model(src, ["H200x8", "H100x8", "A100x4"], engine_bytes=4096)
    hub_server.add_repo("acme/trt", src)
    root = tmp_path / "models"
    r = pull_hf(hub_server, "acme/trt", root, "--gpu-shape", "H200x8")
    assert r.returncode == 0, r.stderr
    model = root / "acme/trt"
    assert sorted(p.name for p in (model / "engines").iterdir()) == ["H200x8"]
    assert len(list((model / "engines/H200x8").glob("rank*.engine"))) == 8
    assert (model / "tokenizer.json").exists() and (model / "config.json").exists()
    assert run_cli("verify", str(model), "--deep").returncode == 0

    missing = pull_hf(hub_server, "acme/trt", tmp_path / "m2", "--gpu-shape", "B200x8")
    assert missing.returncode == 2
    assert "H200x8" in missing.stderr


def test_local_uri_is_verified_in_place(sharded_repo: tuple[HubServer, Path], tmp_path: Path) -> None:
    hub, _ = sharded_repo
    root = tmp_path / "models"
    assert pull_hf(hub, "acme/tiny", root).returncode == 0
    model = root / "acme/tiny"
    before = {p: p.stat().st_mtime_ns for p in model.rglob("*")}
    r = run_cli("pull", f"local://{model}", "--models-root", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in model.rglob("*")} == before
    (model / "model-00001-of-00003.safetensors").unlink()
    assert run_cli("pull", f"local://{model}", "--models-root", str(root)).returncode == 5


def test_detect_reports_filesystem_and_instance_type_shape(tmp_path: Path) -> None:
    type_map = tmp_path / "map.json"
    type_map.write_text(json.dumps({"BM.GPU.H200.8": "H200"}))
    r = run_cli("detect", str(tmp_path), "--instance-type", "BM.GPU.H200.8", "--instance-type-map", str(type_map))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["storage"] in ("local", "shared") and out["fstype"]
    if not nvml_available():  # a real GPU answers first; else the instance type decides
        assert out["gpu_shape"] == "H200x8"
    forced = json.loads(run_cli("detect", str(tmp_path), "--storage-mode", "shared").stdout)
    assert forced["storage"] == "shared"
    assert out["filesystem_id"] is None and not (tmp_path / ".modelherd-filesystem-id").exists(), \
        "detect never writes: no id until an agent or a pull names the filesystem"
    from modelherd.storage.fsid import filesystem_id
    made = filesystem_id(tmp_path)
    assert json.loads(run_cli("detect", str(tmp_path)).stdout)["filesystem_id"] == made


def test_leases_shows_who_downloaded_what_with_file_leases(sharded_repo: tuple[HubServer, Path],
                                                           tmp_path: Path) -> None:
    hub, _ = sharded_repo
    root = tmp_path / "shared"
    r = pull_hf(hub, "acme/tiny", root, "--storage-mode", "shared", "--coordination", "file",
                "--node-name", "gpu-node-7")
    assert r.returncode == 0, r.stderr
    ready = json.loads(r.stdout.strip().splitlines()[-1])
    assert ready["how"] == "holder" and ready["coordination"] == "file"
    table = run_cli("leases", "--file", "--models-root", str(root))
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["NAME", "HOLDER", "PHASE"]
    assert len(rows) == 1
    assert "Complete" in rows[0] and "hf://acme/tiny" in rows[0] and "100%" in rows[0]


@pytest.mark.k8s
def test_leases_lists_kubernetes_leases_of_a_coordinated_pull(sharded_repo: tuple[HubServer, Path], tmp_path: Path,
                                                               kube_cluster: Any, kube_namespace: str) -> None:
    hub, _ = sharded_repo
    root = tmp_path / "shared"
    kube = ["--kubeconfig", str(kube_cluster.kubeconfig), "--namespace", kube_namespace]
    r = pull_hf(hub, "acme/tiny", root, "--storage-mode", "shared", "--coordination", "kubernetes",
                "--node-name", "gpu-node-3", *kube)
    assert r.returncode == 0, r.stderr
    table = run_cli("leases", *kube)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.strip().splitlines()[1:]
    assert len(rows) == 1 and "Complete" in rows[0] and "hf://acme/tiny" in rows[0]
    kubectl = subprocess.run([str(kube_cluster.bin_dir / "kubectl"), "--kubeconfig", str(kube_cluster.kubeconfig),
                              "-n", kube_namespace, "get", "leases", "-l", "app.kubernetes.io/managed-by=modelherd",
                              "-o", "json"], capture_output=True, text=True, timeout=60, check=True)
    (lease,) = json.loads(kubectl.stdout)["items"]
    assert lease["spec"]["leaseTransitions"] >= 0
    assert any(k.startswith("modelherd.io/") for k in lease["metadata"]["annotations"])


def test_relative_models_root_is_taken_from_the_working_directory(sharded_repo: tuple[HubServer, Path],
                                                                  tmp_path: Path) -> None:
    hub, _ = sharded_repo
    r = run_cli("pull", "hf://acme/tiny", "--models-root", "./models", "--no-progress",
                env={"HF_ENDPOINT": hub.endpoint}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["dest"] == str(tmp_path / "models/acme/tiny")
    assert (tmp_path / "models/acme/tiny/.modelherd-manifest.json").is_file()


def test_pull_from_oci_object_storage_with_a_user_config(oci_server: Any, oci_user_config: Any,
                                                          tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_sharded_model(src, 2, 400_000)
    oci_server.add_folder("tenantns", "models", src, prefix="llama/v1/")
    root = tmp_path / "models"
    env = {"MODELHERD_OCI_ENDPOINT": oci_server.url, "MODELHERD_OCI_CONFIG_FILE": str(oci_user_config.path),
           "MODELHERD_OCI_AUTH": "user"}
    r = run_cli("pull", "oci://n/tenantns/b/models/o/llama/v1/", "--models-root", str(root), "--no-progress",
                env=env)
    assert r.returncode == 0, r.stderr
    dest = root / "llama/v1"
    assert json.loads(r.stdout.strip().splitlines()[-1])["dest"] == str(dest)
    for f in src.rglob("*"):
        if f.is_file():
            assert (dest / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert run_cli("verify", str(dest), "--deep").returncode == 0
    assert oci_user_config.key_pem.splitlines()[1] not in r.stderr
    missing = run_cli("pull", "oci://n/tenantns/b/nope/o/x/", "--models-root", str(root), "--no-progress", env=env)
    assert missing.returncode == 3 and "nope" in missing.stderr


def test_local_storage_writes_shards_with_o_direct_and_shared_storage_or_direct_io_off_through_the_cache(
        hub_server: HubServer, tmp_path: Path) -> None:
    from tests.support import resident_fraction

    src = tmp_path / "src"
    make_sharded_model(src, 2, 3 * 1024 * 1024)
    hub_server.add_repo("acme/big", src, lfs_min_size=100_000)
    resident = {}
    for name, flags in {"local": ["--storage-mode", "local"],
                        "shared": ["--storage-mode", "shared", "--coordination", "file"],
                        "off": ["--storage-mode", "local", "--direct-io", "off"]}.items():
        root = tmp_path / name
        r = pull_hf(hub_server, "acme/big", root, *flags)
        assert r.returncode == 0, r.stderr
        shards = sorted((root / "acme/big").glob("*.safetensors"))
        assert len(shards) == 2
        resident[name] = sum(resident_fraction(p) for p in shards) / 2
    if resident["local"] > 0.9:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert resident["local"] < 0.1, resident  # every aligned byte went straight to the disk
    assert resident["shared"] > 0.9 and resident["off"] > 0.9, resident
