"""Issue #20: how the herd's cost grows with the node count, measured at 8, 16, 32 and 64 agents, fitted, and
extrapolated to 1,000 nodes (docs/scale.md quotes the output).

One real control plane (e2e/controlplane: kube-apiserver + embedded etcd, one process), the loopback Hub, N real
``modelherd agent`` processes on one shared folder (``--storage-mode shared --coordination kubernetes``), each its
own Node object. For each N, in one run:

- start: N agents launched -> every agent's /readyz passes; API requests;
- cold: one ClusterBaseModel of ``--model-mib`` selecting every node -> every node's label Ready (one download,
  N-1 verifications); API requests by verb and resource, etcd writes, API server + etcd CPU-seconds;
- idle: ``--idle-seconds`` with the model Ready; requests per agent per minute less the API server's own traffic
  (measured with no agent running, in the same run);
- restart: every agent stopped and started again -> every agent reports the model Ready; requests, writes;
- delete: the ClusterBaseModel deleted -> every label gone; requests, writes.

Every figure is counted at the API server (``apiserver_request_total``, ``etcd_request_duration_seconds_count``),
so it is what a cluster's control plane pays. A least-squares line ``a + b*N`` is fitted to each and evaluated at
1,000 nodes.

Usage: python bench/bench_scale.py [--sizes 8,16,32,64] [--model-mib 64] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from kubernetes import client, config  # noqa: E402
from modelherd.agent.ome.keys import node_label_key  # noqa: E402

from bench._harness import cached_model, clean, model_files, save_json  # noqa: E402
from bench.bench_agent import control_plane, ready_count, server_requests, window  # noqa: E402
from bench.bench_agent import labels_by_node as _labels_by_node  # noqa: E402
from tests.agent_fleet import Fleet, eventually  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402
from tests.integration.test_controlplane import install_ome_crds  # noqa: E402
from tests.k8s_fixtures import KubeCluster  # noqa: E402

MiB = 1024 * 1024
SHARED = ("--storage-mode", "shared", "--coordination", "kubernetes")
WRITES = ("create", "update", "delete")


POLLS = [0]  # this script's own LIST nodes (waiting for labels): taken out of every window


def labels_by_node(api: Any, tag: str) -> dict[str, dict[str, str]]:
    POLLS[0] += 1
    return _labels_by_node(api, tag)


def etcd_writes(cluster: KubeCluster) -> float:
    """etcd operations that write (create, update, delete), as the API server counts them."""
    text = subprocess.run([str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get", "--raw",
                           "/metrics"], capture_output=True, text=True, timeout=60, check=True).stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("etcd_request_duration_seconds_count{") and any(
                f'operation="{op}"' in line for op in WRITES):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Meter:
    """Requests (by verb and resource), etcd writes and control-plane CPU between :meth:`start` and :meth:`stop`."""

    def __init__(self, cluster: KubeCluster, cp: psutil.Process) -> None:
        self.cluster, self.cp = cluster, cp

    def start(self) -> None:
        self.polls0 = POLLS[0]
        self.req0, self.etcd0 = server_requests(self.cluster), etcd_writes(self.cluster)
        self.cpu0, self.t0 = sum(self.cp.cpu_times()[:2]), time.monotonic()

    def stop(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.t0
        cpu = sum(self.cp.cpu_times()[:2]) - self.cpu0
        etcd = etcd_writes(self.cluster) - self.etcd0
        req = window(self.req0, server_requests(self.cluster))
        req[("LIST", "nodes")] = req.get(("LIST", "nodes"), 0.0) - (POLLS[0] - self.polls0)
        req = {k: v for k, v in req.items() if v > 0}
        return {"seconds": seconds, "requests": sum(req.values()), "writes": sum(
            v for (verb, _), v in req.items() if verb in ("POST", "PUT", "PATCH", "DELETE")),
            "etcd_writes": etcd, "cp_cpu_s": cpu,
            "by": {f"{verb} {res}": v for (verb, res), v in sorted(req.items(), key=lambda kv: -kv[1])}}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``a + b*x``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def one_size(n: int, args: argparse.Namespace, api: Any, cluster: KubeCluster, meter: Meter, hub: HubServer,
             work: Path, repo: str, own_per_min: float) -> dict[str, Any]:
    ns = f"scale-{n}-{int(time.time())}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
    fleet = Fleet(api, cluster.kubeconfig, ns, hub.endpoint, work / f"n{n}")
    (work / f"n{n}").mkdir()
    root = work / f"n{n}" / "shared"
    root.mkdir()
    out: dict[str, Any] = {"nodes": n}
    try:
        nodes = [fleet.add_node(f"n{i:03d}") for i in range(n)]
        meter.start()
        for node in nodes:
            fleet.start(node, root, *SHARED, env={"MODELHERD_LOG_LEVEL": "WARNING"})
        for node in nodes:
            fleet.wait_ready(fleet.agents[node], timeout=600)
        out["start"] = meter.stop()

        name = f"m-{fleet.tag}"
        key = node_label_key("ClusterBaseModel", "", name)
        time.sleep(2)
        meter.start()
        fleet.create_cbm(name, f"hf://{repo}")
        eventually(lambda: all(v.get(key) == "Ready" for v in labels_by_node(api, fleet.tag).values()),
                   timeout=1800, interval=0.2, what="every node Ready")
        out["cold"] = meter.stop()
        time.sleep(3)

        meter.start()
        time.sleep(args.idle_seconds)
        idle = meter.stop()
        idle["per_agent_per_min"] = max(0.0, idle["requests"] / (idle["seconds"] / 60) - own_per_min) / n
        out["idle"] = idle

        for node in nodes:
            fleet.agents[node].proc.terminate()
        for node in nodes:
            fleet.agents[node].proc.wait(60)
        meter.start()
        for node in nodes:
            fleet.start(node, root, *SHARED, env={"MODELHERD_LOG_LEVEL": "WARNING"})
        eventually(lambda: all(ready_count(fleet.agents[x].port) >= 1 for x in nodes), timeout=600, interval=0.2,
                   what="every agent reconciled the model")
        out["restart"] = meter.stop()
        time.sleep(2)

        meter.start()
        fleet.delete_model("clusterbasemodels", name)
        eventually(lambda: all(key not in v for v in labels_by_node(api, fleet.tag).values()), timeout=600,
                   interval=0.2, what="the model's label gone from every node")
        out["delete"] = meter.stop()
    finally:
        fleet.cleanup()
        clean(root)
        client.CoreV1Api(api).delete_namespace(ns)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,16,32,64")
    ap.add_argument("--model-mib", type=int, default=64)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--self-seconds", type=float, default=30.0)
    ap.add_argument("--predict", type=int, default=1000)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mh-bench-scale-") as tmp:
        work = Path(tmp)
        model = cached_model(args.model_mib // args.shards, args.shards)
        size = sum(p.stat().st_size for p in model_files(model))
        cluster = control_plane(work / "cp")
        cp = psutil.Process(int((work / "cp" / "pid").read_text()))
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_ome_crds(cluster, api)
        hub = HubServer()
        hub.start()
        try:
            repo = f"org/{model.name}"
            hub.add_repo(repo, model)
            meter = Meter(cluster, cp)
            meter.start()
            time.sleep(args.self_seconds)
            own = meter.stop()
            own_per_min = own["requests"] / (own["seconds"] / 60)
            print(f"API server's own traffic, no agent: {own_per_min:.1f} requests/min, {own['cp_cpu_s']:.2f} CPU-s "
                  f"in {own['seconds']:.0f} s; model {size / MiB:.0f} MiB", flush=True)
            for n in sizes:
                row = one_size(n, args, api, cluster, meter, hub, work, repo, own_per_min)
                rows.append(row)
                c, i, r, d = row["cold"], row["idle"], row["restart"], row["delete"]
                print(f"N={n:3d}: start {row['start']['seconds']:.1f} s {row['start']['requests']:.0f} req | "
                      f"cold CR->all Ready {c['seconds']:.1f} s {c['requests']:.0f} req {c['writes']:.0f} writes "
                      f"{c['etcd_writes']:.0f} etcd writes {c['cp_cpu_s']:.1f} CP CPU-s | idle "
                      f"{i['per_agent_per_min']:.2f} req/agent/min | restart {r['seconds']:.1f} s "
                      f"{r['requests']:.0f} req {r['writes']:.0f} writes | delete {d['seconds']:.1f} s "
                      f"{d['requests']:.0f} req", flush=True)
                print(f"        cold by verb and resource: {dict(list(c['by'].items())[:8])}", flush=True)
        finally:
            hub.stop()
            subprocess.run([str(REPO / "e2e/controlplane/down"), str(work / "cp")], capture_output=True, check=False)

    xs = [float(r["nodes"]) for r in rows]
    fits: dict[str, Any] = {}
    print(f"\nfits a + b*N over N={sizes}, evaluated at N={args.predict}:")
    for phase, field in (("start", "requests"), ("cold", "seconds"), ("cold", "requests"), ("cold", "writes"),
                         ("cold", "etcd_writes"), ("cold", "cp_cpu_s"), ("idle", "per_agent_per_min"),
                         ("restart", "seconds"), ("restart", "requests"), ("restart", "writes"),
                         ("delete", "seconds"), ("delete", "requests"), ("delete", "etcd_writes")):
        a, b = fit(xs, [float(r[phase][field]) for r in rows])
        fits[f"{phase}.{field}"] = {"a": a, "b": b, "at": a + b * args.predict}
        print(f"  {phase:8s} {field:18s} = {a:9.2f} + {b:8.3f}*N  -> {a + b * args.predict:12.1f}")
    path = save_json("bench_scale.json", {"sizes": sizes, "model_bytes": size, "rows": rows, "fits": fits,
                                     "own_requests_per_min": own_per_min})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
