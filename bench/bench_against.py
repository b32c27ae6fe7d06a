"""The pull and herd benchmarks of this checkout against an earlier revision, in one run (issue #18: a redesign
keeps the figures within noise of before).

A worktree of ``--base`` (default ``HEAD~1``) is made under ``bench/out/base-<rev>`` with a venv of its own, so
each revision's ``modelherd`` runs its own code. The two are run alternately, base first, each bench once per
round; the figures of every round are printed for both, with the ratio head/base of the medians:

- ``bench_pull.py`` (8 shards from the loopback Hub + nginx): the pull's seconds and peak RSS;
- ``bench_coordination.py`` (N ``modelherd pull`` processes on one folder, real kube-apiserver): origin bytes per
  model, publish -> last node Ready, Lease requests per waiting node per 10 s, restart fast path.

Usage: python bench/bench_against.py [--base REV] [--rounds 2] [--pull-args "--size-mib 64 --repeat 1"]
                                      [--herd-args "--nodes 16 --download-seconds 10"]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"

HERD = {
    "origin bytes / model": r"origin bytes / model size = ([0-9.]+)",
    "publish -> last Ready (s)": r"publish -> last node Ready = ([0-9.]+) s",
    "lease req / waiter / 10 s": r"Lease API requests per waiting node per 10 s = ([0-9.]+)",
    "restart: all Ready (s)": r"Ready ([0-9.]+) s after launch",
}


def sh(argv: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, text=True, capture_output=True, timeout=timeout, check=False)


def base_tree(rev: str) -> tuple[Path, Path]:
    """A worktree of ``rev`` with its own venv (made once, reused)."""
    sha = sh(["git", "rev-parse", "--short=12", rev], REPO).stdout.strip()
    if not sha:
        sys.exit(f"unknown revision {rev!r}")
    tree = OUT / f"base-{sha}"
    if not (tree / ".git").exists():
        sh(["git", "worktree", "remove", "--force", str(tree)], REPO)
        res = sh(["git", "worktree", "add", "--detach", "--force", str(tree), sha], REPO)
        if res.returncode:
            sys.exit(res.stderr)
    py = tree / ".venv" / "bin" / "python"
    if not py.exists():
        for argv in ([sys.executable, "-m", "venv", str(tree / ".venv")],
                     [str(py), "-m", "pip", "install", "-q", "uv"],
                     [str(tree / ".venv" / "bin" / "uv"), "pip", "install", "-q", "--python", str(py), "-e", ".[dev]"]):
            res = sh(argv, tree)
            if res.returncode:
                sys.exit(f"{' '.join(argv)} failed:\n{res.stderr[-2000:]}")
    return tree, py


def run_pull(tree: Path, py: Path, extra: list[str]) -> dict[str, float]:
    res = sh([str(py), "bench/bench_pull.py", "--no-snapshot", *extra], tree)
    path = tree / "bench" / "out" / "bench_pull.json"
    runs = (json.loads(path.read_text()).get("runs") or {}).get("pull") if res.returncode in (0, 1) else None
    if not runs:
        print(res.stdout[-3000:], res.stderr[-3000:])
        sys.exit(f"bench_pull.py failed in {tree}")
    report = json.loads(path.read_text())
    return {"pull seconds": statistics.median(float(r["seconds"]) for r in runs),
            "pull peak RSS (MiB)": max(float(r["rss_mib"]) for r in runs),
            "pull / curl": float(report["pull_over_curl"])}


def run_herd(tree: Path, py: Path, extra: list[str]) -> dict[str, float]:
    res = sh([str(py), "bench/bench_coordination.py", *extra], tree)
    out: dict[str, float] = {}
    for name, pattern in HERD.items():
        m = re.search(pattern, res.stdout)
        if m:
            out[name] = float(m.group(1))
    if not out:
        print(res.stdout[-3000:], res.stderr[-3000:])
        sys.exit(f"bench_coordination.py failed in {tree}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD~1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pull-args", default="--size-mib 128 --repeat 1")
    ap.add_argument("--herd-args", default="--nodes 16 --download-seconds 10", help='"none": the pull only')
    args = ap.parse_args()
    base, base_py = base_tree(args.base)
    trees = {"base": (base, base_py), "head": (REPO, REPO / ".venv" / "bin" / "python")}
    series: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    print(f"base {args.base} = {base.name}; head = {REPO} (working tree)", flush=True)
    for r in range(args.rounds):
        for who in ("base", "head"):
            tree, py = trees[who]
            t0 = time.monotonic()
            figures = run_pull(tree, py, shlex.split(args.pull_args))
            if args.herd_args != "none":
                figures |= run_herd(tree, py, shlex.split(args.herd_args))
            for k, v in figures.items():
                series[who].setdefault(k, []).append(v)
            print(f"round {r + 1} {who}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
                  + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    print("\nmedians            base      head   head/base")
    for k in series["head"]:
        b = statistics.median(series["base"].get(k, [float("nan")]))
        h = statistics.median(series["head"][k])
        ratio = h / b if b else float("nan")
        print(f"  {k:<28} {b:9.3f} {h:9.3f}   {ratio:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
