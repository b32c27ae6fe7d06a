"""Issue #4 benchmark: N simulated nodes (real `modelherd pull` processes) on one shared folder.

Measured in one run, against the real control plane (e2e/controlplane) and the loopback Hub:

1. Cold start: N processes pull the same model with ``--storage-mode shared --coordination kubernetes``.
   - origin bytes / model size (target 1.00)
   - time from the holder's publish to the last node Ready (target <= 2 s + the configured jitter)
   - Lease API requests per waiting node per 10 s of waiting (target <= 1)
2. Restart fast path: N processes start with the model already complete.
   - time from launch to the last node Ready (target <= 5 s), origin bytes (target 0)

Usage: python bench/bench_coordination.py [--nodes 32] [--download-seconds 40] [--jitter 1.0]
Prints each figure and PASS/FAIL; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hubserver import HubServer  # noqa: E402
from tests.modelgen import make_sharded_model  # noqa: E402

MiB = 1024 * 1024


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[str]
    started: float
    ready_at: float | None = None
    ready: dict[str, object] = field(default_factory=dict)


def control_plane(workdir: Path) -> Path:
    up = subprocess.run([str(REPO / "e2e/controlplane/up"), str(workdir)], capture_output=True, text=True,
                        timeout=1800, check=False)
    if up.returncode != 0:
        sys.exit(f"control plane failed to start:\n{up.stderr[-3000:]}")
    return workdir / "kubeconfig"


def create_namespace(kubeconfig: Path) -> str:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    return ns


def lease_requests_at_server(kubeconfig: Path) -> int:
    """``apiserver_request_total`` for leases, summed over verbs and codes: the server's own count."""
    kubectl = kubeconfig.parent / "bin" / "kubectl"
    text = subprocess.run([str(kubectl), "--kubeconfig", str(kubeconfig), "get", "--raw", "/metrics"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="leases"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def launch(n: int, *, endpoint: str, root: Path, kubeconfig: Path, namespace: str, jitter: float,
           prefix: str) -> list[Node]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_"))}
    env.update(HF_ENDPOINT=endpoint, MODELHERD_WAIT_JITTER_S=str(jitter), MODELHERD_LOG_LEVEL="WARNING")
    exe = str(Path(sys.executable).with_name("modelherd"))
    nodes = []
    for i in range(n):
        name = f"{prefix}-{i:02d}"
        cmd = [exe, "pull", "hf://bench/model", "--models-root", str(root), "--storage-mode", "shared",
               "--coordination", "kubernetes", "--kubeconfig", str(kubeconfig), "--namespace", namespace,
               "--node-name", name, "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        nodes.append(Node(name, proc, time.time()))
    return nodes


def collect(nodes: list[Node], timeout: float) -> None:
    def reader(node: Node) -> None:
        assert node.proc.stdout is not None
        for line in node.proc.stdout:
            if line.startswith("{"):
                node.ready_at = time.time()
                node.ready = json.loads(line)

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    deadline = time.time() + timeout
    for n in nodes:
        try:
            n.proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            n.proc.kill()
    for t in threads:
        t.join(timeout=5)


def watch_publish(manifest: Path, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        if manifest.exists():
            out.append(time.time())
            return
        time.sleep(0.005)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--model-mib", type=int, default=64)
    ap.add_argument("--download-seconds", type=float, default=40.0, help="throttle the origin to take this long")
    ap.add_argument("--jitter", type=float, default=1.0, help="configured follower wake-up jitter (s)")
    args = ap.parse_args()

    failures = 0
    with tempfile.TemporaryDirectory(prefix="mh-bench-coord-") as tmp:
        work = Path(tmp)
        src = work / "src"
        shards = 4
        make_sharded_model(src, shards, args.model_mib * MiB // shards)
        model_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        kubeconfig = control_plane(work / "cp")
        try:
            namespace = create_namespace(kubeconfig)
            hub = HubServer()
            hub.start()
            try:
                hub.add_repo("bench/model", src)
                # 4 LFS files download in parallel: throttle each body so the whole takes ~download-seconds
                per_file_bps = (model_bytes / shards) / args.download_seconds
                hub.throttle("cdn", bytes_per_s=per_file_bps)
                root = work / "shared"
                root.mkdir()
                manifest = root / "bench/model/.modelherd-manifest.json"

                print(f"== cold start: {args.nodes} nodes, model {model_bytes / MiB:.1f} MiB, origin throttled to "
                      f"~{args.download_seconds:.0f} s", flush=True)
                stop, published = threading.Event(), []
                watcher = threading.Thread(target=watch_publish, args=(manifest, stop, published), daemon=True)
                watcher.start()
                t0 = time.time()
                server_before = lease_requests_at_server(kubeconfig)
                nodes = launch(args.nodes, endpoint=hub.endpoint, root=root, kubeconfig=kubeconfig,
                               namespace=namespace, jitter=args.jitter, prefix="node")
                collect(nodes, timeout=args.download_seconds * 4 + 120)
                stop.set()
                server_total = lease_requests_at_server(kubeconfig) - server_before
                failed = [n.name for n in nodes if n.proc.returncode != 0 or n.ready_at is None]
                ratio = hub.stats()["bytes_served"] / model_bytes
                holders = [n for n in nodes if n.ready.get("how") == "holder"]
                followers = [n for n in nodes if n.ready.get("how") == "follower"]
                print(f"exit codes: {len(nodes) - len(failed)}/{len(nodes)} ok; holders {len(holders)}, "
                      f"followers {len(followers)}; wall {time.time() - t0:.1f} s")
                ok = not failed and abs(ratio - 1.0) < 0.005
                failures += not ok
                print(f"origin bytes / model size = {ratio:.3f}   (target 1.00)  {verdict(ok)}")
                if published and not failed:
                    last_ready = max(n.ready_at for n in nodes if n.ready_at is not None)
                    lag = last_ready - published[0]
                    ok = lag <= 2.0 + args.jitter
                    failures += not ok
                    print(f"publish -> last node Ready = {lag:.2f} s   (target <= {2.0 + args.jitter:.1f} s = 2 s + "
                          f"jitter)  {verdict(ok)}")
                    rates = []
                    for n in followers:
                        waited = (n.ready_at or 0) - n.started
                        reqs = int(str(n.ready.get("lease_requests", 0)))
                        rates.append(reqs / max(waited / 10.0, 1e-9))
                    holder_reqs = sum(int(str(n.ready.get("lease_requests", 0))) for n in holders)
                    client_total = holder_reqs + sum(int(str(n.ready.get("lease_requests", 0))) for n in followers)
                    print(f"lease requests counted by the API server: {server_total} (the nodes counted "
                          f"{client_total}: holder {holder_reqs}, followers {client_total - holder_reqs})")
                    if followers:
                        waited = sum((n.ready_at or 0) - n.started for n in followers)
                        server_rate = (server_total - holder_reqs) / max(waited / 10.0, 1e-9)
                        print(f"server-side: (all lease requests - holder's) per waiting node per 10 s = "
                              f"{server_rate:.2f}")
                    if rates:
                        mean = sum(rates) / len(rates)
                        ok = mean <= 1.0
                        failures += not ok
                        print(f"Lease API requests per waiting node per 10 s = {mean:.2f} (max {max(rates):.2f})   "
                              f"(target <= 1)  {verdict(ok)}")
                else:
                    failures += 1
                    print(f"FAIL: no publish observed or nodes failed: {failed[:5]}")

                print(f"== restart fast path: {args.nodes} nodes start with the model complete", flush=True)
                hub.reset_counters()
                t0 = time.time()
                nodes = launch(args.nodes, endpoint=hub.endpoint, root=root, kubeconfig=kubeconfig,
                               namespace=namespace, jitter=args.jitter, prefix="restart")
                collect(nodes, timeout=120)
                failed = [n.name for n in nodes if n.proc.returncode != 0 or n.ready_at is None]
                last = max((n.ready_at or t0) for n in nodes) - t0
                origin = hub.stats()["bytes_served"] + sum(hub.stats()["requests"].values())
                ok = not failed and last <= 5.0 and origin == 0
                failures += not ok
                print(f"all {args.nodes} Ready {last:.2f} s after launch, origin requests+bytes {origin}   "
                      f"(target <= 5 s, 0)  {verdict(ok)}")
            finally:
                hub.stop()
        finally:
            subprocess.run([str(REPO / "e2e/controlplane/down"), str(work / "cp")], capture_output=True, check=False)
    print("RESULT:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
