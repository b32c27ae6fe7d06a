"""Benchmark ``modelherd pull oci://`` from an OCI registry against ``oras pull`` and 8 parallel curl (issue #19).

Usage: python bench/bench_registry.py [--size-mib 256] [--files 8] [--repeat 3] [--no-drop-caches]
                                      [--oras-arg ARG] [--pull-arg ARG]

Setup (once per run): the model of ``--files`` shards of ``--size-mib`` MiB (``tests.modelgen.make_sharded_model``,
``bench/out/www``, shared with bench_pull.py) is pushed as a CNCF ModelPack artifact into a real registry on
127.0.0.1 (Debian's ``/usr/bin/docker-registry``, filesystem storage kept in ``bench/out/registry``, blob
redirects off, access log on so the requests of each run are counted) with the real ``oras`` CLI (scripts/test.sh
builds it): ``oras push --artifact-type application/vnd.cncf.model.manifest.v1+json``, a ModelPack config, one
``application/vnd.cncf.model.weight.v1.raw`` layer per shard with its ``org.cncf.model.filepath`` annotation
(oras adds ``org.opencontainers.image.title``), tag ``v1``.

One untimed warm-up round runs every tool once (the pull runs without ``PYTHONDONTWRITEBYTECODE``, so its ``.pyc``
files exist as in any installed package). Then each round runs, in rotating order (interleaved), after removing the
last destination, ``sync``, waiting for the disk to settle and (root, unless ``--no-drop-caches``) dropping the page
cache, then reading the registry's blob files once so that every tool is served from memory (the registry's disk is
not the client's cost):

- ``pull``: ``modelherd pull oci://127.0.0.1:PORT/org/<model>:v1 --dest ... --storage-mode local --coordination
  none`` in a subprocess (the sha256 of every layer checked while streaming, fsync, atomic publish);
  ``pull (CLI seconds)`` is the CLI's own clock (without interpreter start-up);
- ``oras``: ``oras pull --plain-http HOST/org/<model>:v1 -o EMPTY_FOLDER`` (oras checks every digest too; it
  does not fsync; its own defaults, e.g. ``--concurrency 3``, unless ``--oras-arg``);
- ``curl``: one ``curl -sf`` per layer, all at once, of ``GET /v2/<repo>/blobs/<digest>`` (the ceiling);
  ``curl+fsync`` is the same run plus an fsync of every file.

Wall times are for the whole subprocess (start-up included); peak RSS is the child's own ``ru_maxrss``. Prints every
run (with the registry requests it made), the medians, ``pull/oras`` (target <= 0.8), ``pull/curl`` (target <=
1.1) and the pull's peak RSS (target <= 150 MiB) with PASS/FAIL, and writes ``bench/out/bench_registry.json``.
Exit status 0 only if every target passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    OUT,
    REPO,
    Procs,
    Result,
    cached_model,
    clean,
    drop_caches,
    free_port,
    fsync_file,
    interleave,
    model_files,
    report_medians,
    run_child,
    save_json,
    verdict,
    wait_port,
)

MODELPACK = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
RAW_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
PULL_OVER_ORAS = 0.8
PULL_OVER_CURL = 1.1
PULL_RSS_MIB = 150.0
_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH) (/v2/\S*) HTTP/[\d.]+" (\d{3})')


class LoopbackRegistry:
    """``docker-registry serve`` on 127.0.0.1 (anonymous, filesystem storage under ``folder``, access log on)."""

    def __init__(self, procs: Procs, binary: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.storage = folder / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = folder / "access.log"  # the access log goes to stdout (Apache combined format)
        config = folder / "config.yml"
        config.write_text("\n".join([
            "version: 0.1", "log:", "  level: error", "  formatter: text", "storage:", "  filesystem:",
            f"    rootdirectory: {self.storage}", "  redirect:", "    disable: true", "http:", f"  addr: {self.host}",
            "  secret: modelherd-bench"]) + "\n")
        access = procs.stack.enter_context(open(self.log, "wb"))  # noqa: SIM115  (closed with the stack)
        procs.start([binary, "serve", str(config)], log=folder / "registry.log", stdout=access,
                    env={"PATH": os.environ.get("PATH", "")})
        wait_port(self.port)
        self._seen = 0

    def requests(self) -> Counter[str]:
        """The registry's requests since the last call, as ``"GET blob 200"``-style counts (from its access log)."""
        with open(self.log, "rb") as f:
            f.seek(self._seen)
            data = f.read()
        self._seen += len(data)
        out: Counter[str] = Counter()
        for m in _ACCESS.finditer(data.decode(errors="replace")):
            path = m.group(2)
            kind = ("blob" if "/blobs/" in path else "manifest" if "/manifests/" in path
                    else "base" if path in ("/v2/", "/v2") else "other")
            out[f"{m.group(1)} {kind} {m.group(3)}"] += 1
        return out

    def blob_path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"


def find_oras() -> str:
    sys.path.insert(0, str(REPO))
    from tests.registry_fixtures import find_registry_tools

    found = find_registry_tools()
    if isinstance(found, str):
        raise SystemExit(f"bench_registry: {found}")
    return str(found.oras)


def push_modelpack(oras: str, reg: LoopbackRegistry, ref: str, shards: list[Path], work: Path) -> str:
    """``oras push`` the shards as a ModelPack artifact; the manifest digest."""
    work.mkdir(parents=True, exist_ok=True)
    folder = shards[0].parent
    (work / "modelpack-config.json").write_text(json.dumps({
        "descriptor": {"name": ref}, "config": {"format": "safetensors"},
        "modelfs": {"type": "layers", "diffIds": []}}))
    (work / "annotations.json").write_text(json.dumps(
        {p.name: {"org.cncf.model.filepath": p.name} for p in shards}))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(work), "DOCKER_CONFIG": str(work)}
    started = time.monotonic()
    done = subprocess.run(
        [oras, "push", f"{reg.host}/{ref}", *[f"{p.name}:{RAW_WEIGHT}" for p in shards], "--plain-http",
         "--artifact-type", MODELPACK, "--config", f"{work / 'modelpack-config.json'}:{MODELPACK_CONFIG}",
         "--annotation-file", str(work / "annotations.json"), "--format", "go-template={{.digest}}"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"oras push failed: {done.stderr[-2000:]}")
    print(f"pushed {reg.host}/{ref} in {time.monotonic() - started:.1f} s", flush=True)
    return done.stdout.strip().splitlines()[-1]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def layer_digests(shards: list[Path]) -> dict[str, str]:
    """Layer digest per shard name, cached next to the model (``.<model>.digests.json``)."""
    cache = shards[0].parent.with_name(f".{shards[0].parent.name}.digests.json")
    if cache.exists():
        known = json.loads(cache.read_text())
        if set(known) == {p.name for p in shards}:
            return dict(known)
    with ThreadPoolExecutor(2) as ex:
        digests = dict(zip([p.name for p in shards], ex.map(sha256_file, shards), strict=True))
    cache.write_text(json.dumps(digests))
    return digests


def warm(paths: list[Path]) -> None:
    """Read ``paths`` once so the registry serves them from the page cache."""
    buf = bytearray(16 * 1024 * 1024)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of each shard (default 256)")
    ap.add_argument("--files", type=int, default=8, help="number of shards, one layer each (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    ap.add_argument("--oras-arg", action="append", default=[], help="extra argument for oras pull")
    ap.add_argument("--pull-arg", action="append", default=[], help="extra argument for modelherd pull")
    ap.add_argument("--registry", default="/usr/bin/docker-registry", help="the registry binary")
    args = ap.parse_args()

    load_at_start = os.getloadavg()
    oras = find_oras()
    folder = cached_model(args.size_mib, args.files)
    shards = sorted(p for p in model_files(folder) if p.suffix == ".safetensors")
    total = sum(p.stat().st_size for p in shards)
    digests = layer_digests(shards)
    repo = f"org/{folder.name}"
    ref = f"{repo}:v1"
    dest = OUT / "dest"
    modelherd = str(Path(sys.executable).with_name("modelherd"))
    # An installed modelherd has its bytecode compiled (pip does it; the image's `modelherd --help` too): a session
    # with PYTHONDONTWRITEBYTECODE=1 would otherwise compile ~200 modules from source in every pull (~0.35 s here).
    pull_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    rounds_requests: dict[str, list[dict[str, int]]] = {}

    with Procs() as procs:
        reg = LoopbackRegistry(procs, args.registry, OUT / "registry")
        manifest_digest = push_modelpack(oras, reg, ref, shards, OUT / "registry-push")
        blobs = [reg.blob_path(digests[p.name]) for p in shards]
        missing = [b for b in blobs if not b.is_file()]
        if missing:
            raise RuntimeError(f"the registry's storage lacks {missing[0]}")
        reg.requests()
        uri = f"oci://{reg.host}/{ref}"
        cold = not args.no_drop_caches
        print(f"artifact {uri} ({manifest_digest}): {len(shards)} layers, {total / 2**20:.0f} MiB; oras {oras}; "
              f"destinations under {dest} ({os.cpu_count()} cores; page cache "
              f"{'dropped' if cold else 'kept'} between runs, the registry's blobs read back before each)",
              flush=True)

        def settle() -> None:
            nonlocal cold
            clean(dest)
            if cold and not drop_caches():
                print("  (may not drop the page cache: not root; kept from now on)", flush=True)
                cold = False
            warm(blobs)
            reg.requests()

        def note(name: str) -> None:
            seen = dict(sorted(reg.requests().items()))
            rounds_requests.setdefault(name, []).append(seen)
            print(f"    {name} registry requests: {', '.join(f'{k} x{v}' for k, v in seen.items())}", flush=True)

        def check(where: Path, tool: str) -> None:
            got = {p.name: p.stat().st_size for p in where.rglob("*.safetensors") if p.is_file()}
            want = {p.name: p.stat().st_size for p in shards}
            if got != want:
                raise RuntimeError(f"{tool} left {sum(got.values())} bytes in {len(got)} files, expected {total}")

        def pull() -> dict[str, Result]:
            settle()
            out = dest / "pull"
            res = run_child([modelherd, "pull", uri, "--dest", str(out), "--models-root", str(dest),
                             "--no-progress", "--coordination", "none", "--storage-mode", "local",
                             "--log-level", "WARNING", *args.pull_arg], env=pull_env)
            note("pull")
            check(out, "modelherd pull")
            ready = json.loads(res.stdout.strip().splitlines()[-1])
            return {"pull": res, "pull (CLI seconds)": Result(float(ready["seconds"]), 0.0)}

        def oras_pull() -> dict[str, Result]:
            settle()
            out = dest / "oras"
            out.mkdir(parents=True)
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(OUT / "registry-push"),
                   "DOCKER_CONFIG": str(OUT / "registry-push")}
            res = run_child([oras, "pull", "--plain-http", f"{reg.host}/{ref}", "-o", str(out), *args.oras_arg],
                            env=env, cwd=out)
            note("oras")
            check(out, "oras pull")
            return {"oras": res}

        def curl() -> dict[str, Result]:
            settle()
            out = dest / "curl"
            out.mkdir(parents=True)
            started = time.monotonic()
            procs_ = [subprocess.Popen(["curl", "-sf", "--max-time", "600", "-o", str(out / p.name),
                                        f"http://{reg.host}/v2/{repo}/blobs/{digests[p.name]}"]) for p in shards]
            rcs = [c.wait(timeout=610) for c in procs_]
            plain = time.monotonic() - started
            if any(rcs):
                raise RuntimeError(f"curl failed: {rcs}")
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(fsync_file, [out / p.name for p in shards]))
            synced = time.monotonic() - started
            note("curl")
            check(out, "curl")
            return {"curl": Result(plain, 0.0), "curl+fsync": Result(synced, 0.0)}

        tools = {"pull": pull, "oras": oras_pull, "curl": curl}
        print("warm-up round (not counted): writes the pull's .pyc files, warms the registry", flush=True)
        for tool in tools.values():
            tool()
        rounds_requests.clear()
        series = interleave(tools, args.repeat)
        clean(dest)

    med = report_medians(series, total,
                         f"medians of {args.repeat} interleaved rounds, "
                         f"{total / 2**20:.0f} MiB in {len(shards)} layers")
    pull_oras = med["pull"].seconds / med["oras"].seconds
    pull_curl = med["pull"].seconds / med["curl"].seconds
    rss = med["pull"].rss_mib
    checks = {"pull/oras": (pull_oras, f"<= {PULL_OVER_ORAS}", pull_oras <= PULL_OVER_ORAS),
              "pull/curl": (pull_curl, f"<= {PULL_OVER_CURL}", pull_curl <= PULL_OVER_CURL),
              "pull peak RSS MiB": (rss, f"<= {PULL_RSS_MIB:.0f}", rss <= PULL_RSS_MIB)}
    print()
    for name, (value, target, ok) in checks.items():
        print(f"  {name:<18} {value:7.2f}  (target {target})  {verdict(ok)}")
    print(f"  pull/curl+fsync    {med['pull'].seconds / med['curl+fsync'].seconds:7.2f}")
    print(f"  pull (CLI seconds)/curl {med['pull (CLI seconds)'].seconds / med['curl'].seconds:5.2f}  "
          "(without interpreter start-up)")
    report = {"bytes": total, "layers": len(shards), "repeat": args.repeat, "page_cache_dropped": cold,
              "oras_args": args.oras_arg, "pull_args": args.pull_arg,
              "load_average": {"start": load_at_start, "end": os.getloadavg()},
              "runs": {k: [r.__dict__ for r in v] for k, v in series.items()},
              "registry_requests": rounds_requests,
              "medians": {k: m.__dict__ for k, m in med.items()},
              "targets": {k: {"value": v, "target": t, "pass": ok} for k, (v, t, ok) in checks.items()}}
    print(f"  load average {load_at_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
          f"({os.cpu_count()} cores)")
    print(f"\nwrote {save_json('bench_registry.json', report)}")
    shutil.rmtree(OUT / "registry-push" / ".docker", ignore_errors=True)
    return 0 if all(ok for _, _, ok in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
