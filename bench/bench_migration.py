"""Issue #17 benchmark: N real ``modelherd agent`` processes started over OME's leftovers on one shared folder.

Target: "32 agents started over OME's leftovers for one 2 GiB model on the shared folder: 0 label flaps, 0 origin
body bytes, last node reporting Ready <= 1.2 x one adoption + 3 s."

Setup, against the real control plane (``e2e/controlplane/up``) and the loopback Hub (``HubServer``, in this
process, so its counters prove that no file body is served):

- the generated model of bench_pull.py (``--shards`` x ``--shard-mib``, default 8 x 256 MiB, ``bench/out/www``) is
  listed by the Hub; OME's leftover copy is ``<shared root>/org/<model>``: the model's files as hard links of the
  generated ones (the same bytes and inodes, no ``.modelherd-manifest.json``), as OME's agent leaves a model;
- ``--nodes`` Node objects, each already labelled ``models.ome.io/clusterbasemodel.<name>: Ready``, and per node a
  ConfigMap in the agents' namespace holding OME's Ready entry (labels ``models.ome/basemodel-status=true``,
  ``node=<node>``; no ``modelherd`` field); OME's CRDs and the ClusterBaseModel (``storage.path`` = the copy).

Measured in one run:

1. Baseline, one adoption: ``modelherd pull hf://org/<model> --dest <second copy> --storage-mode shared
   --coordination none`` over a second identical leftover copy, timed as a process (start-up included).
2. Migration: the ``--nodes`` agents (``--storage-mode shared --coordination kubernetes --startup-jitter 0``, the
   fleet's settings of bench_agent.py, log level INFO as deployed) started at once. Watches on the Nodes, the
   ConfigMaps and the Leases record every change with its time:
   - label flaps: every value of the model's label on any node other than ``Ready`` (target 0);
   - origin body bytes: ``hub.stats()['bytes_served']`` (target 0);
   - launch -> the last node's ConfigMap entry carries modelherd's field with status Ready (taken over), target
     <= 1.2 x baseline + 3 s;
   - phases: the Lease created (the holder acquired it), its phase ``Adopting`` (``modelherd.io/phase``: hashing
     started), ``Complete`` (published), first and last entry taken over; the holder's own hashing time (its log);
   - CPU: CPU-seconds per agent (``/proc/<pid>/stat``) at the last Ready, the API server's, this process's, and the
     machine's busy share over the window (``/proc/stat``).

Before the baseline and before the agents start: ``sync``, the disk left to settle, and the page cache dropped
(``echo 3 > /proc/sys/vm/drop_caches``; said so when not root), so both read the copy from the disk.

Usage: python bench/bench_migration.py [--nodes 32] [--shard-mib 256] [--shards 8] [--quick] [--no-drop-caches]
``--quick``: 8 x 32 MiB (256 MiB), a smoke run. Prints each figure against its target with PASS/FAIL and writes
``bench/out/bench_migration.json``; exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubernetes import client, config  # noqa: E402
from modelherd.agent.ome.entry import render_entry  # noqa: E402
from modelherd.agent.ome.keys import configmap_key, node_label_key  # noqa: E402
from modelherd.testing.hubserver import HubServer  # noqa: E402

from bench._harness import (  # noqa: E402
    DROP_CACHES,
    OUT,
    cached_model,
    drop_caches,
    model_files,
    relink,
    run_child,
    save_json,
    verdict,
)
from tests.agent_fleet import MODELHERD, Fleet  # noqa: E402
from tests.integration.test_controlplane import install_ome_crds  # noqa: E402
from tests.k8s_fixtures import KubeCluster  # noqa: E402

MiB = 1024 * 1024
SHARED = ("--storage-mode", "shared", "--coordination", "kubernetes")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MANIFEST = ".modelherd-manifest.json"


# ------------------------------------------------------------------------------------------------ host helpers
def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (``/proc/<pid>/stat``), in seconds; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5), after "pid (comm)"


def machine_cpu() -> tuple[float, float]:
    """(busy, steal, total) jiffies of the whole machine (``/proc/stat``; idle and iowait count as not busy, steal
    is the hypervisor's: time this VM's cores ran someone else)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(vals[:8])
    return float(total - vals[3] - vals[4] - vals[7]), float(vals[7]), float(total)


def _log_time(line: str, wall0: float) -> float | None:
    with contextlib.suppress(ValueError, KeyError):
        stamp = json.loads(line)["time"]
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp() - wall0
    return None


def startup_milestones(fleet: Fleet, wall0: float) -> tuple[list[float], list[float]]:
    """Per agent, from its JSON log (wall clock, ms): its first line (the interpreter started, imports and settings
    done) and "initial lists synced", in seconds after the launch; each list sorted."""
    started, synced = [], []
    for agent in fleet.agents.values():
        lines = agent.log.read_text(errors="replace").splitlines()
        t = _log_time(lines[0], wall0) if lines else None
        if t is not None:
            started.append(t)
        for line in lines:
            if "initial lists synced" in line:
                t = _log_time(line, wall0)
                if t is not None:
                    synced.append(t)
                break
    return sorted(started), sorted(synced)


def started_by_node(fleet: Fleet, wall0: float, marker: str | None) -> dict[str, float]:
    """node -> seconds after the launch of its first log line (``marker`` None) or of the first line with
    ``marker``."""
    out = {}
    for node, agent in fleet.agents.items():
        for line in agent.log.read_text(errors="replace").splitlines():
            if marker is None or marker in line:
                t = _log_time(line, wall0)
                if t is not None:
                    out[node] = t
                break
    return out


def cpu_by_phase(samples: list[tuple[float, dict[str, float]]],
                 milestones: dict[str, dict[str, float]]) -> dict[str, tuple[float, int]]:
    """Mean CPU-s an agent had used when it reached each milestone (the last sample at or before it)."""
    out = {}
    for label, at in milestones.items():
        used = []
        for node, t in at.items():
            before = [cpu[node] for ts, cpu in samples if ts <= t and node in cpu]
            if before:
                used.append(before[-1])
        if used:
            out[label] = (sum(used) / len(used), len(used))
    return out


def cpu_between(samples: list[tuple[float, dict[str, float]]], a: float, b: float) -> dict[str, float]:
    """node -> CPU-s used between the samples nearest ``a`` and ``b`` (0.25 s apart)."""
    if not samples:
        return {}
    first = min(samples, key=lambda s: abs(s[0] - a))[1]
    last = min(samples, key=lambda s: abs(s[0] - b))[1]
    return {n: last[n] - first.get(n, 0.0) for n in last}


def control_plane(work: Path) -> KubeCluster:
    up = subprocess.run([str(REPO / "e2e/controlplane/up"), str(work)], capture_output=True, text=True, timeout=1800,
                        check=False)
    if up.returncode != 0:
        sys.exit(f"control plane failed to start:\n{up.stderr[-3000:]}")
    return KubeCluster(kubeconfig=work / "kubeconfig", bin_dir=work / "bin", server="", data_dir=work)


# ------------------------------------------------------------------------------------------------ watches
class Recorder:
    """A raw watch (list, then watch from its resourceVersion; reconnects) calling ``on(obj, t)`` for the list's
    objects and every ADDED/MODIFIED event, ``t`` on this process's monotonic clock. JSON is parsed here, not by the
    client's models: this process shares the cores with the agents."""

    def __init__(self, lister: Callable[..., Any], on: Callable[[dict[str, Any], float], None], **kw: Any) -> None:
        self.lister, self.on, self.kw = lister, on, kw
        self.stop = threading.Event()
        self.synced = threading.Event()
        self.error: BaseException | None = None
        self.resp: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Recorder:
        self.thread.start()
        if not self.synced.wait(30):
            raise RuntimeError(f"watch did not sync: {self.error}")
        return self

    def _run(self) -> None:
        try:
            raw = json.loads(self.lister(**self.kw, _preload_content=False).data)
            now = time.monotonic()
            for obj in raw.get("items") or []:
                self.on(obj, now)
            rv = raw["metadata"]["resourceVersion"]
            self.synced.set()
            while not self.stop.is_set():
                self.resp = self.lister(**self.kw, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                        timeout_seconds=900, _preload_content=False)
                for line in self.resp:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                    if ev.get("type") in ("ADDED", "MODIFIED"):
                        self.on(obj, time.monotonic())
                    elif ev.get("type") == "ERROR":
                        raise RuntimeError(f"watch error: {obj}")
        except BaseException as e:  # reported by the caller; a closed stream at stop is expected
            if not self.stop.is_set():
                self.error = e
            self.synced.set()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            if self.resp is not None:
                self.resp.release_conn()
                self.resp.close()
        self.thread.join(5)


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="8 x 32 MiB (256 MiB): a smoke run")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache (hot reads)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the last Ready")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (agents' logs) under bench/out")
    args = ap.parse_args()
    if args.quick:
        args.shard_mib = 32

    folder = cached_model(args.shard_mib, args.shards)
    total = sum(p.stat().st_size for p in model_files(folder))
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="migration-", dir=OUT))  # same filesystem as the model: hard links
    failures = 0
    try:
        cluster = control_plane(work / "cp")
        try:
            api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
            install_ome_crds(cluster, api)
            ns = f"bench-mig-{int(time.time())}"
            client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})
            with HubServer() as hub:
                repo = f"org/{folder.name}"
                hub.add_repo(repo, folder)
                fleet = Fleet(api, cluster.kubeconfig, ns, hub.endpoint, work)
                try:
                    failures = run(args, fleet, hub, cluster, api, work, folder, repo, total)
                finally:
                    fleet.cleanup()
        finally:
            subprocess.run([str(REPO / "e2e/controlplane/down"), str(work / "cp")], capture_output=True, check=False)
    finally:
        if args.keep:
            shutil.rmtree(work / "shared", ignore_errors=True)
            print(f"kept {work} (agents' logs)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("RESULT:", "PASS" if failures == 0 else f"FAIL ({failures})")
    return 1 if failures else 0


def run(args: argparse.Namespace, fleet: Fleet, hub: HubServer, cluster: KubeCluster, api: Any, work: Path,
        folder: Path, repo: str, total: int) -> int:
    cold = not args.no_drop_caches
    print(f"model {repo}: {total / MiB:.0f} MiB, {len(model_files(folder))} files; {args.nodes} agents; "
          f"{os.cpu_count()} cores", flush=True)

    # ---- 1. baseline: one adoption of an identical leftover copy, timed as a process
    base_root = work / "baseline"
    base_dest = base_root / repo
    relink(folder, base_dest)
    if cold and not drop_caches():
        cold = False
        print(f"page cache NOT dropped (cannot write {DROP_CACHES}: not root?)", flush=True)
    hub.reset_counters()
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": os.environ.get("PATH", "/usr/bin")}
    log = work / "baseline.log"
    pull = [MODELHERD, "pull", f"hf://{repo}", "--models-root", str(base_root), "--dest", str(base_dest),
            "--storage-mode", "shared", "--coordination", "none", "--no-progress", "--log-level", "INFO"]
    children0 = os.times()
    base = run_child(["sh", "-c", 'exec "$0" "$@" 2>"$LOG"', *pull], env={**env, "LOG": str(log)})
    children1 = os.times()  # the pull (and its small wrapper) reaped: their CPU is our children's
    base_cpu = (children1.children_user + children1.children_system
                - children0.children_user - children0.children_system)
    ready = json.loads(base.stdout.strip().splitlines()[-1])
    hashed = re.search(r"MiB hashed in ([0-9.]+)s", log.read_text())
    if ready.get("status") != "Ready" or hub.stats()["bytes_served"] or not (base_dest / MANIFEST).is_file():
        raise RuntimeError(f"the baseline did not adopt the copy in place: {ready}, {hub.stats()}")
    base_hash = float(hashed.group(1)) if hashed else float("nan")
    print(f"baseline: one adoption (modelherd pull over the leftover copy) = {base.seconds:.2f} s "
          f"(CLI seconds {float(ready['seconds']):.2f}, hashing {base_hash:.2f} s, {base_cpu:.2f} CPU-s, "
          f"peak RSS {base.rss_mib:.0f} MiB; "
          f"page cache {'dropped' if cold else 'kept'})", flush=True)
    shutil.rmtree(base_root, ignore_errors=True)

    # ---- 2. OME's leftovers: the copy, labels and entries saying Ready, the ClusterBaseModel
    root = work / "shared"
    dest = root / repo
    relink(folder, dest)
    inodes = {p.name: p.stat().st_ino for p in dest.iterdir()}
    name = f"mig-{fleet.tag}"
    key, cm_key = node_label_key("ClusterBaseModel", "", name), configmap_key("ClusterBaseModel", "", name)
    nodes = [fleet.add_node(f"n{i:02d}", {key: "Ready"}) for i in range(args.nodes)]
    ome_entry = render_entry(None, name=name, status="Ready", config=None, progress=None)
    for node in nodes:
        fleet.core.create_namespaced_config_map(fleet.namespace, {
            "metadata": {"name": node, "labels": {"models.ome/basemodel-status": "true", "node": node}},
            "data": {cm_key: ome_entry}})
    fleet.create_cbm(name, f"hf://{repo}", path=str(dest))

    # ---- watches: every label value, every entry, every Lease phase, with its time
    lock = threading.Lock()
    label_values: list[tuple[float, str, str | None]] = []  # (t, node, value) for every Node event
    taken: dict[str, float] = {}  # node -> first time its entry carried modelherd's field with status Ready
    entry_states: dict[str, str] = {}  # node -> last entry status seen (with or without modelherd's field)
    phases: dict[str, float] = {}  # Lease phase -> first time seen
    lease_first: list[float] = []
    holders: set[str] = set()
    node_set = set(nodes)

    def on_node(obj: dict[str, Any], t: float) -> None:
        meta = obj.get("metadata") or {}
        if meta.get("name") in node_set:
            with lock:
                label_values.append((t, meta["name"], (meta.get("labels") or {}).get(key)))

    def on_cm(obj: dict[str, Any], t: float) -> None:
        node = (obj.get("metadata") or {}).get("name")
        value = (obj.get("data") or {}).get(cm_key)
        if node not in node_set or not value:
            return
        entry = json.loads(value)
        with lock:
            entry_states[node] = f"{entry.get('status')}{'+modelherd' if 'modelherd' in entry else ''}"
            if entry.get("status") == "Ready" and "modelherd" in entry:
                taken.setdefault(node, t)

    def on_lease(obj: dict[str, Any], t: float) -> None:
        meta = obj.get("metadata") or {}
        ann = meta.get("annotations") or {}
        if not ann.get("modelherd.io/source", "").startswith(f"hf://{repo}"):
            return
        with lock:
            if not lease_first:
                lease_first.append(t)
            phases.setdefault(ann.get("modelherd.io/phase", ""), t)
            holder = (obj.get("spec") or {}).get("holderIdentity")
            if holder:
                holders.add(holder)

    core, coord = fleet.core, client.CoordinationV1Api(api)
    recorders = [Recorder(core.list_node, on_node, label_selector=f"mh-test={fleet.tag}"),
                 Recorder(core.list_namespaced_config_map, on_cm, namespace=fleet.namespace),
                 Recorder(coord.list_lease_for_all_namespaces, on_lease)]
    for r in recorders:
        r.start()
    if label_values and any(v != "Ready" for _, _, v in label_values):
        raise RuntimeError("the leftover labels are not all Ready before the agents start")

    if cold:
        drop_caches()
    hub.reset_counters()
    cp_pid = int((cluster.data_dir / "pid").read_text())
    cpu0 = {"apiserver": cpu_seconds(cp_pid), "bench": cpu_seconds(os.getpid())}
    busy0, steal0, tot0 = machine_cpu()

    # ---- 3. start every agent at once
    wall0 = time.time()
    t0 = time.monotonic()
    for n in nodes:
        fleet.start(n, root, *SHARED)
    launched = time.monotonic() - t0
    samples: list[tuple[float, dict[str, float]]] = []  # (t after launch, node -> CPU-s): per-agent CPU by phase
    sampling = threading.Event()

    def sample_cpu() -> None:
        while not sampling.wait(0.25):
            samples.append((time.monotonic() - t0, {n: cpu_seconds(a.proc.pid) for n, a in fleet.agents.items()}))
    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    deadline = t0 + args.timeout
    while time.monotonic() < deadline:
        with lock:
            done = len(taken) == len(nodes)
        dead = [a.node for a in fleet.agents.values() if a.proc.poll() is not None]
        if done or dead:
            break
        time.sleep(0.05)
    t_end = time.monotonic()
    agent_cpu = {n: cpu_seconds(a.proc.pid) for n, a in fleet.agents.items()}
    sampling.set()
    sampler.join(5)
    cpu1 = {"apiserver": cpu_seconds(cp_pid), "bench": cpu_seconds(os.getpid())}
    busy1, steal1, tot1 = machine_cpu()
    time.sleep(3.0)  # late flaps (a label written after the takeover) still count
    for r in recorders:
        r.close()
    errors = [r.error for r in recorders if r.error is not None]
    if errors:
        print(f"WARNING: a watch failed: {errors}", flush=True)

    # ---- figures
    with lock:
        flaps = [(t - t0, n, v) for t, n, v in label_values if v != "Ready"]
        ready_at = {n: t - t0 for n, t in taken.items()}
        phase_at = {p: t - t0 for p, t in phases.items()}
        lease_at = lease_first[0] - t0 if lease_first else None
        states = dict(entry_states)
    origin = hub.stats()
    complete = len(ready_at) == len(nodes)
    last = max(ready_at.values()) if complete else float("inf")
    target = 1.2 * base.seconds + 3.0
    failures = 0
    if not complete:
        missing = sorted(set(nodes) - set(ready_at))
        dead = {a.node: a.proc.returncode for a in fleet.agents.values() if a.proc.poll() is not None}
        print(f"NOT every entry taken over after {t_end - t0:.0f} s: {len(missing)} missing "
              f"(states {[states.get(n) for n in missing[:5]]}); agents exited: {dead}", flush=True)
        for n in list(dead)[:2]:
            print(fleet.agents[n].log.read_text()[-2000:])

    ok = not flaps
    failures += not ok
    print(f"\nlabel flaps: {len(flaps)} values other than Ready in {len(label_values)} Node observations "
          f"{flaps[:5] if flaps else ''}  (target 0)  {verdict(ok)}")
    ok = origin["bytes_served"] == 0
    failures += not ok
    print(f"origin body bytes: {origin['bytes_served']} (requests {sum(origin['requests'].values())}: "
          f"{dict(origin['requests'])})  (target 0)  {verdict(ok)}")
    ok = complete and last <= target
    failures += not ok
    print(f"launch -> last of {args.nodes} entries taken over (Ready, modelherd's field) = {last:.2f} s vs one "
          f"adoption {base.seconds:.2f} s  (target <= 1.2 x + 3 s = {target:.2f} s): ratio {last / target:.2f}  "
          f"{verdict(ok)}")

    manifest = (dest / MANIFEST).is_file()
    same_inodes = {p.name: p.stat().st_ino for p in dest.iterdir() if p.name in inodes} == inodes
    holder_logs = [a.log for a in fleet.agents.values() if a.node in holders]
    holder_hash = float("nan")
    for lg in holder_logs:
        m = re.search(r"MiB hashed in ([0-9.]+)s", lg.read_text())
        if m:
            holder_hash = float(m.group(1))
    cpu = sorted(agent_cpu.values())
    started, synced = startup_milestones(fleet, wall0)
    by_phase = cpu_by_phase(samples, {"first log line": started_by_node(fleet, wall0, None),
                                      "lists synced": started_by_node(fleet, wall0, "initial lists synced")})
    window = t_end - t0
    machine_busy = (busy1 - busy0) / (tot1 - tot0) if tot1 > tot0 else float("nan")
    machine_steal = (steal1 - steal0) / (tot1 - tot0) if tot1 > tot0 else float("nan")
    holder_cpu = [agent_cpu[h] for h in holders if h in agent_cpu]
    follower_cpu = [c for n, c in agent_cpu.items() if n not in holders]
    first = min(ready_at.values()) if ready_at else float("nan")

    def row(label: str, value: str) -> None:
        print(f"  {label:<58} {value}")

    def at(x: float | None) -> str:
        return f"{x:6.2f} s" if x is not None else "     -"

    print(f"\nphases (seconds after the launch of the first agent; launching all {args.nodes} took {launched:.2f} s):")
    if started:
        row("agents' first log line (interpreter, imports, settings)",
            f"median {started[len(started) // 2]:.2f} s, last {started[-1]:.2f} s")
    if synced:
        row("agents' initial lists synced", f"median {synced[len(synced) // 2]:.2f} s, last {synced[-1]:.2f} s")
    row(f"Lease created (holder {', '.join(sorted(holders)) or '?'} acquired it)", at(lease_at))
    for p in ("Downloading", "Adopting", "Verifying", "Complete", "Failed"):
        if p in phase_at:
            row(f"Lease phase {p} first seen", at(phase_at[p]))
    row(f"holder's hashing (its log; baseline's {base_hash:.2f} s)", f"{holder_hash:6.2f} s long")
    row("first entry taken over", at(first))
    row("last entry taken over", at(last if complete else None))
    if complete and "Complete" in phase_at:
        row("published -> last follower Ready", f"{last - phase_at['Complete']:6.2f} s long")
    row("copy published in place", f"manifest {manifest}, same inodes {same_inodes}")
    print(f"\nCPU over the {window:.1f} s window ({os.cpu_count()} cores, machine busy {100 * machine_busy:.0f} %, "
          f"steal {100 * machine_steal:.0f} %: {(busy1 - busy0) / CLK_TCK:.1f} CPU-s used here):")
    print(f"  agents: {sum(cpu):.1f} CPU-s in all; per agent min {cpu[0]:.2f} / median {cpu[len(cpu) // 2]:.2f} / "
          f"max {cpu[-1]:.2f} CPU-s; holder {', '.join(f'{c:.2f}' for c in holder_cpu) or '?'}, followers mean "
          f"{sum(follower_cpu) / max(1, len(follower_cpu)):.2f}")
    print(f"  API server + etcd {cpu1['apiserver'] - cpu0['apiserver']:.1f} CPU-s, this bench (Hub, watches) "
          f"{cpu1['bench'] - cpu0['bench']:.1f} CPU-s")

    for label, (mean_cpu, n) in by_phase.items():
        print(f"  CPU-s per agent until its {label}: mean {mean_cpu:.2f} ({n} agents; 0.25 s samples)")
    windows = {"launch -> Lease created": (0.0, lease_at), "Lease created -> Complete": (lease_at,
               phase_at.get("Complete")), "Adopting -> Complete": (phase_at.get("Adopting"), phase_at.get("Complete"))}
    split: dict[str, dict[str, float]] = {}
    for label, (a, b) in windows.items():
        if a is None or b is None:
            continue
        used = cpu_between(samples, a, b)
        if used:
            hold = sum(used.get(h, 0.0) for h in holders)
            split[label] = {"holder": hold, "followers": sum(used.values()) - hold, "seconds": b - a}
            print(f"  CPU-s {label} ({b - a:.2f} s): holder {hold:.2f}, the {len(used) - len(holders)} followers "
                  f"{sum(used.values()) - hold:.2f}")

    print(f"  (the baseline's adoption, alone on the machine: {base_cpu:.2f} CPU-s in {base.seconds:.2f} s)")

    if not ok and complete:
        hint = [f"the agents alone need {sum(cpu):.1f} CPU-s = {sum(cpu) / (os.cpu_count() or 1):.1f} s of "
                f"{os.cpu_count()} cores"]
        if lease_at is not None:
            hint.append(f"the holder acquired the Lease {lease_at:.1f} s after the launch")
        if "Adopting" in phase_at and "Complete" in phase_at:
            hint.append(f"Adopting -> Complete {phase_at['Complete'] - phase_at['Adopting']:.1f} s")
        elif lease_at is not None and "Complete" in phase_at:
            hint.append(f"Lease acquired -> Complete {phase_at['Complete'] - lease_at:.1f} s")
        if "Complete" in phase_at:
            hint.append(f"the followers needed {last - phase_at['Complete']:.1f} s after the publish")
        print("  where the time goes: " + "; ".join(hint))

    report = {"bytes": total, "nodes": args.nodes, "cold": cold, "cpus": os.cpu_count(),
              "baseline_s": base.seconds, "baseline_cli_s": float(ready["seconds"]), "baseline_hash_s": base_hash,
              "baseline_cpu_s": base_cpu,
              "target_s": target, "last_ready_s": last if complete else None, "ratio": last / target,
              "flaps": flaps, "label_observations": len(label_values), "origin": origin["bytes_served"],
              "origin_requests": origin["requests"], "lease_created_s": lease_at, "phases_s": phase_at,
              "holders": sorted(holders), "holder_hash_s": holder_hash, "ready_s": ready_at,
              "agent_cpu_s": agent_cpu, "apiserver_cpu_s": cpu1["apiserver"] - cpu0["apiserver"],
              "bench_cpu_s": cpu1["bench"] - cpu0["bench"], "machine_busy": machine_busy,
              "machine_steal": machine_steal,
              "manifest": manifest, "same_inodes": same_inodes, "first_log_s": started, "lists_synced_s": synced,
              "cpu_by_phase": by_phase, "cpu_split": split}
    print(f"\nwrote {save_json('bench_migration.json', report)}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
