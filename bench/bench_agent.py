"""Issue #9 benchmark: N real ``modelherd agent`` processes (one per simulated node) on one shared folder.

Measured in one run, against the real control plane (e2e/controlplane), the loopback Hub (the same origin for
the baseline and the agents), and Node objects for every simulated node:

1. Cold: one ClusterBaseModel of ``--model-mib`` (default 2 GiB) selecting every node. Baseline: one plain
   ``modelherd pull`` of the same model measured in the same run (``--storage-mode shared``, no coordination).
   - CR created -> last node's label Ready  (target <= 1.1 x baseline + 3 s)
   - origin bytes / model size              (target 1.00)
   - where the time goes (issue #20): every agent logs its pull's timeline (``agent/reporting/timeline.py``:
     checked, Updating written, Lease seen, the holder's download / publish / release, a follower's wake-up on
     Complete, its verification, the Ready report: label, ConfigMap entry, Event); the bench puts the marks of every
     node on one axis from the CR's creation and prints each step's median and slowest across the herd, the critical
     path to the last Ready, and the CPU-seconds each kind of process spent (agents: holder and followers, the API
     server + etcd, the origin) against what two cores could give in that time
2. Idle: N agents with ``--models`` small models Ready, for ``--idle-seconds`` (default 60):
   - API requests per agent per minute, counted at the API server (``apiserver_request_total``) less the API
     server's own traffic, measured before any agent starts over ``--self-seconds`` in the same run, broken down
     by verb and resource (target <= 1, issue #20)
   - agent RSS (target <= 120 MiB each), CPU (target <= 1 % of a core each)
3. Restart: every agent stopped (SIGTERM) and started again with all models Ready:
   - launch -> every agent has reconciled every model Ready (target <= 5 s, issue #20)
   - label flaps seen by sampling every node's labels throughout (target 0), origin requests (target 0)

Usage: python bench/bench_agent.py [--nodes 32] [--model-mib 2048] [--models 20] [--idle-seconds 60]
Prints each figure and PASS/FAIL; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from kubernetes import client, config  # noqa: E402
from modelherd.agent.ome.keys import node_label_key  # noqa: E402

from bench._harness import cached_model, clean, model_files, run_child, verdict  # noqa: E402
from tests.agent_fleet import MODELHERD, Fleet, eventually  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402
from tests.integration.test_controlplane import install_ome_crds  # noqa: E402
from tests.k8s_fixtures import KubeCluster  # noqa: E402
from tests.modelgen import make_sharded_model  # noqa: E402

MiB = 1024 * 1024
SHARED = ("--storage-mode", "shared", "--coordination", "kubernetes")


def control_plane(work: Path) -> KubeCluster:
    up = subprocess.run([str(REPO / "e2e/controlplane/up"), str(work)], capture_output=True, text=True, timeout=1800,
                        check=False)
    if up.returncode != 0:
        sys.exit(f"control plane failed to start:\n{up.stderr[-3000:]}")
    return KubeCluster(kubeconfig=work / "kubeconfig", bin_dir=work / "bin", server="", data_dir=work)


def server_requests(cluster: KubeCluster) -> dict[tuple[str, str], float]:
    """``apiserver_request_total`` by (verb, resource), summed over codes, groups and scopes: the server's count.
    The read itself (a GET of /metrics, resource "") is one request of the next read's window."""
    text = subprocess.run([str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get", "--raw",
                           "/metrics"], capture_output=True, text=True, timeout=60, check=True).stdout
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.rindex("}")].split(",") if "=" in kv)
        key = (labels.get("verb", "").strip('"'), labels.get("resource", "").strip('"'))
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def window(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """Requests per (verb, resource) between two reads, our own /metrics read taken out."""
    out = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
    out[("GET", "")] = out.get(("GET", ""), 0.0) - 1
    return {k: v for k, v in out.items() if v > 0}


def labels_by_node(api: Any, tag: str) -> dict[str, dict[str, str]]:
    raw = json.loads(client.CoreV1Api(api).list_node(label_selector=f"mh-test={tag}", _preload_content=False).data)
    return {it["metadata"]["name"]: it["metadata"].get("labels") or {} for it in raw["items"]}


def ready_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(1 for line in text.splitlines()
               if line.startswith("modelherd_model_state{") and 'state="Ready"' in line and line.endswith(" 1.0"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--model-mib", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--self-seconds", type=float, default=30.0,
                    help="how long the API server's own traffic is measured before any agent starts")
    args = ap.parse_args()
    failures = 0

    with tempfile.TemporaryDirectory(prefix="mh-bench-agent-") as tmp:
        work = Path(tmp)
        big = cached_model(args.model_mib // args.shards, args.shards)
        big_bytes = sum(p.stat().st_size for p in model_files(big))
        small = work / "small-src"
        make_sharded_model(small, 4, 256 * 1024)
        cluster = control_plane(work / "cp")
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_ome_crds(cluster, api)
        ns = f"bench-{int(time.time())}"
        client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
        try:
            hub = HubServer()  # the same loopback origin for the baseline and the agents
            hub.start()
            repo = f"org/{big.name}"
            hub.add_repo(repo, big)
            hub.add_repo("org/small", small)
            fleet = Fleet(api, cluster.kubeconfig, ns, hub.endpoint, work)
            try:
                failures += run(args, fleet, hub, cluster, api, work, repo, big_bytes)
            finally:
                fleet.cleanup()
                hub.stop()
        finally:
            subprocess.run([str(REPO / "e2e/controlplane/down"), str(work / "cp")], capture_output=True, check=False)
    print("RESULT:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


def run(args: argparse.Namespace, fleet: Fleet, hub: HubServer, cluster: KubeCluster, api: Any, work: Path, repo: str,
        big_bytes: int) -> int:
    failures = 0
    # ---- baseline: one plain pull, same model, same machine, same storage mode
    plain_root = work / "plain"
    plain_root.mkdir()
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}
    base = run_child([MODELHERD, "pull", f"hf://{repo}", "--models-root", str(plain_root), "--storage-mode", "shared",
                      "--coordination", "none", "--no-progress", "--log-level", "WARNING"], env=env, timeout=1800)
    clean(plain_root)
    print(f"baseline: one plain modelherd pull of {big_bytes / MiB:.0f} MiB = {base.seconds:.2f} s", flush=True)

    root = work / "shared"
    root.mkdir()
    nodes = [fleet.add_node(f"n{i:02d}") for i in range(args.nodes)]
    # the API server's own traffic (its leases, its own loops), no agent running: subtracted from the idle figure
    s0, t_self = server_requests(cluster), time.monotonic()
    time.sleep(args.self_seconds)
    own = window(s0, server_requests(cluster))
    own_per_min = {k: v / ((time.monotonic() - t_self) / 60) for k, v in own.items()}
    print(f"API server's own traffic, no agent running: {sum(own_per_min.values()):.1f} requests/min "
          f"{_top(own_per_min)}", flush=True)
    t_launch = time.monotonic()
    for n in nodes:
        fleet.start(n, root, *SHARED, env={"MODELHERD_LOG_LEVEL": "INFO"})  # the default: the timelines are INFO
    for n in nodes:
        fleet.wait_ready(fleet.agents[n], timeout=300)
    print(f"{args.nodes} agents started and synced in {time.monotonic() - t_launch:.1f} s", flush=True)

    # ---- 1. cold: one big ClusterBaseModel
    hub.reset_counters()
    name = f"big-{fleet.tag}"
    key = node_label_key("ClusterBaseModel", "", name)
    cpu_before = cpu_by_kind(fleet, cluster)
    t0, created = time.monotonic(), time.time()
    fleet.create_cbm(name, f"hf://{repo}")
    eventually(lambda: all(v.get(key) == "Ready" for v in labels_by_node(api, fleet.tag).values()), timeout=1800,
               interval=0.2, what="every node Ready")
    took = time.monotonic() - t0
    cpu_used = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_by_kind(fleet, cluster).items()}
    ratio = hub.stats()["bytes_served"] / big_bytes
    target = 1.1 * base.seconds + 3.0
    ok = took <= target
    failures += not ok
    print(f"CR -> last of {args.nodes} labels Ready = {took:.2f} s vs plain pull {base.seconds:.2f} s: "
          f"{took / base.seconds:.2f} x   (target <= 1.1 x + 3 s = {target:.2f} s)  {verdict(ok)}")
    ok = abs(ratio - 1.0) < 0.005
    failures += not ok
    print(f"origin bytes / model size = {ratio:.3f}   (target 1.00)  {verdict(ok)}", flush=True)
    time.sleep(1.0)  # the last Ready's log line follows its Event
    print_breakdown(timelines(fleet, name), created, took, base.seconds, cpu_used, args.nodes)
    fleet.delete_model("clusterbasemodels", name)
    eventually(lambda: all(key not in v for v in labels_by_node(api, fleet.tag).values()), timeout=120,
               what="big model removed")
    clean(root / repo)

    # ---- 2. idle with N small models Ready
    names = [f"s{i:02d}-{fleet.tag}" for i in range(args.models)]
    for i, n in enumerate(names):
        fleet.create_cbm(n, "hf://org/small", path=str(root / "small" / f"m{i:02d}"))
    keys = [node_label_key("ClusterBaseModel", "", n) for n in names]
    eventually(lambda: all(all(v.get(k) == "Ready" for k in keys) for v in labels_by_node(api, fleet.tag).values()),
               timeout=600, interval=0.5, what=f"{args.models} models Ready on every node")
    time.sleep(3.0)  # let the last writes and watch events settle
    ps = {n: psutil.Process(a.proc.pid) for n, a in fleet.agents.items()}
    cpu0 = {n: p.cpu_times() for n, p in ps.items()}
    req0 = server_requests(cluster)
    t_idle = time.monotonic()
    time.sleep(args.idle_seconds)
    elapsed = time.monotonic() - t_idle
    seen = window(req0, server_requests(cluster))
    cpu = {n: (sum(p.cpu_times()[:2]) - sum(cpu0[n][:2])) / elapsed for n, p in ps.items()}
    rss = {n: p.memory_info().rss / MiB for n, p in ps.items()}
    minutes = elapsed / 60
    agents_per_min = {k: max(0.0, v / minutes - own_per_min.get(k, 0.0)) / args.nodes for k, v in seen.items()}
    agents_per_min = {k: v for k, v in agents_per_min.items() if v > 0.005}
    per_agent_min = sum(agents_per_min.values())
    ok = per_agent_min <= 1.0
    failures += not ok
    print(f"idle {elapsed:.0f} s, {args.models} models Ready: API requests per agent per minute = {per_agent_min:.2f} "
          f"(server-side {sum(seen.values()) / minutes:.1f}/min less its own {sum(own_per_min.values()):.1f}/min)   "
          f"(target <= 1)  {verdict(ok)}")
    print(f"  per agent per minute by verb and resource: {_top(agents_per_min, 12)}")
    ok = max(rss.values()) <= 120
    failures += not ok
    print(f"agent RSS: max {max(rss.values()):.0f} MiB, mean {sum(rss.values()) / len(rss):.0f} MiB   "
          f"(target <= 120 MiB)  {verdict(ok)}")
    ok = max(cpu.values()) <= 0.01
    failures += not ok
    print(f"agent CPU: max {100 * max(cpu.values()):.2f} %, mean {100 * sum(cpu.values()) / len(cpu):.2f} % of a core"
          f"   (target <= 1 %)  {verdict(ok)}", flush=True)

    # ---- 3. restart every agent
    hub.reset_counters()
    flaps: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for node, labels in labels_by_node(api, fleet.tag).items():
                flaps.extend(f"{node}:{k}={labels.get(k)}" for k in keys if labels.get(k) != "Ready")
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for n in nodes:
        fleet.agents[n].proc.terminate()
    for n in nodes:
        fleet.agents[n].proc.wait(60)
    t0 = time.monotonic()
    for n in nodes:
        fleet.start(n, root, *SHARED, env={"MODELHERD_LOG_LEVEL": "INFO"})

    def all_reconciled() -> bool:
        return all(ready_count(fleet.agents[n].port) >= args.models for n in nodes)

    eventually(all_reconciled, timeout=300, interval=0.2, what="every agent reconciled every model")
    took = time.monotonic() - t0
    cpu = cpu_by_kind(fleet, cluster)  # fresh processes: CPU-seconds since launch
    agent_cpu = [v for k, v in cpu.items() if k.startswith("agent:")]
    print(f"restart CPU: {statistics.mean(agent_cpu):.2f} CPU-s per agent from launch to every model Ready "
          f"({sum(agent_cpu):.1f} in all: {sum(agent_cpu) / (psutil.cpu_count() or 1):.1f} s of this machine's "
          f"{psutil.cpu_count()} cores for the agents alone; one agent alone on its node: see bench_scale.py)")
    time.sleep(2.0)
    stop.set()
    sampler.join(10)
    origin = sum(hub.stats()["requests"].values())
    ok = took <= 5.0
    failures += not ok
    print(f"restart: {args.nodes} agents x {args.models} models Ready again in {took:.2f} s after launch   "
          f"(target <= 5 s)  {verdict(ok)}")
    ok = not flaps and origin == 0
    failures += not ok
    print(f"restart: label flaps {len(flaps)}, origin requests {origin}   (target 0, 0)  {verdict(ok)}", flush=True)
    return failures


def cpu_by_kind(fleet: Fleet, cluster: KubeCluster) -> dict[str, float]:
    """CPU-seconds (user + system) so far of each agent (by node), the control plane (API server + etcd), and this
    process (the loopback origin runs in it, as threads)."""
    out: dict[str, float] = {}
    for node, agent in fleet.agents.items():
        with contextlib.suppress(psutil.Error):
            out[f"agent:{node}"] = sum(psutil.Process(agent.proc.pid).cpu_times()[:2])
    for proc in psutil.process_iter(["pid", "cmdline"]):  # e2e/controlplane's one process: kube-apiserver + etcd
        args = proc.info["cmdline"] or []
        if proc.info["pid"] != os.getpid() and "serve" in args and str(cluster.data_dir) in args:
            with contextlib.suppress(psutil.Error):
                out["control plane"] = out.get("control plane", 0.0) + sum(proc.cpu_times()[:2])
    out["origin+bench"] = sum(psutil.Process().cpu_times()[:2])
    return out


def timelines(fleet: Fleet, model: str) -> dict[str, tuple[str, float, dict[str, float]]]:
    """Each node's pull timeline of ``model`` from its agent's JSON log: node -> (role, wall start, marks)."""
    out: dict[str, tuple[str, float, dict[str, float]]] = {}
    for node, agent in fleet.agents.items():
        for line in agent.log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "timeline" in rec and model in str(rec.get("model", "")):
                out[node] = (str(rec["role"]), float(rec["timeline_start"]), dict(rec["timeline"]))
    return out


STEPS = [  # (step, from mark, to mark, whose): the marks of agent/reporting/timeline.py; "cr": the CR's creation
    ("CR seen (watch + queue)", "cr", "start", "all"),
    ("disk checked", "start", "checked", "all"),
    ("Updating written (label + entry)", "checked", "updating", "all"),
    ("Lease seen", "updating", "lease", "all"),
    ("holder: listing + download + hash + fsync", "lease", "staged", "holder"),
    ("holder: renew + publish", "staged", "published", "holder"),
    ("holder: release (Complete)", "published", "released", "holder"),
    # from the holder's publish, its Lease update included: a follower's watch can deliver that update before the
    # holder's own PUT returns ("released"), so a span from "released" may be negative
    ("follower wake-up after the publish", "published*", "complete", "follower"),
    ("follower verification", "complete", "pulled", "follower"),
    ("holder: done", "released", "pulled", "holder"),
    ("Ready written (label + entry + Event)", "pulled", "reported", "all"),
]


def print_breakdown(tl: dict[str, tuple[str, float, dict[str, float]]], created: float, took: float, base_s: float,
                    cpu: dict[str, float], nodes: int) -> None:
    """Every node's marks on one axis (seconds since the CR's creation); each step's median and slowest."""
    if len(tl) < nodes:
        print(f"  timelines found for {len(tl)} of {nodes} agents")
    if not tl:
        return
    axis = {n: (role, {"start": start - created, **{k: start - created + v for k, v in m.items()}})
            for n, (role, start, m) in tl.items()}
    published = next((m["published"] for role, m in axis.values() if role == "holder" and "published" in m), None)
    print(f"  where the time goes, {len(axis)} agents (seconds; marks on one axis from the CR's creation):")
    for step, a, b, whose in STEPS:
        spans = []
        for role, m in axis.values():
            if whose != "all" and role != whose:
                continue
            start = 0.0 if a == "cr" else published if a == "published*" else m.get(a)
            if start is not None and b in m:
                spans.append(m[b] - start)
        if spans:
            spans.sort()
            print(f"    {step:<44} median {statistics.median(spans):6.2f}  slowest {spans[-1]:6.2f}  ({len(spans)})")
    last = max(axis.items(), key=lambda kv: kv[1][1].get("reported", 0.0))
    path = ", ".join(f"{k} {v:.2f}" for k, v in sorted(last[1][1].items(), key=lambda kv: kv[1]))
    print(f"    critical path (the last Ready, {last[0]}, {last[1][0]}): {path}")
    holder = [m for role, m in axis.values() if role == "holder"]
    if holder and "staged" in holder[0] and "lease" in holder[0]:
        h = holder[0]
        print(f"    herd overhead {took - base_s:+.2f} s against the plain pull: holder's download "
              f"{h['staged'] - h['lease']:.2f} s (plain pull {base_s:.2f} s), before it {h['lease']:.2f} s, after it "
              f"(staged -> last Ready) {last[1][1].get('reported', 0.0) - h['staged']:.2f} s")
    agents = {k: v for k, v in cpu.items() if k.startswith("agent:")}
    roles = {f"agent:{n}": role for n, (role, _, _) in tl.items()}
    h_cpu = [v for k, v in agents.items() if roles.get(k) == "holder"]
    f_cpu = [v for k, v in agents.items() if roles.get(k) == "follower"]
    other = {k: v for k, v in cpu.items() if not k.startswith("agent:")}
    total = sum(cpu.values())
    mean_f = statistics.mean(f_cpu) if f_cpu else 0.0
    print(f"  CPU-seconds for this model: holder {sum(h_cpu):.2f}, followers {mean_f:.2f}"
          f" each ({sum(f_cpu):.2f} in all), " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(other.items()))
          + f"; {total:.2f} CPU-s in {took:.2f} s = {total / took:.2f} of {psutil.cpu_count()} cores busy")


def _top(rates: dict[tuple[str, str], float], n: int = 6) -> str:
    items = sorted(rates.items(), key=lambda kv: -kv[1])[:n]
    return "{" + ", ".join(f"{verb} {res or '(non-resource)'}: {v:.2f}" for (verb, res), v in items) + "}"


if __name__ == "__main__":
    sys.exit(main())
