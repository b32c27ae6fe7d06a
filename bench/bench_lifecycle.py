"""Benchmark periodic verification and repair (issue #10), in one run; prints every figure and a verdict.

Usage: python bench/bench_lifecycle.py [--models 100] [--shards 142] [--deep-mib 256] [--mbps 100]
                                       [--model-gib 2] [--nodes 8] [--dir /tmp/x]

- quick: one ``Verifier.quick_pass`` over ``--models`` Ready models of ``--shards`` small shards each (a cold pass
  that reads every header, then warm passes: folders unchanged since they verified clean); target <= 1 s a pass,
  cold and warm; the cold pass is also printed against a bare ``os.walk`` + ``stat`` + read and ``json.loads`` of
  every safetensors header in the same run (the least any metadata check must do, checking nothing);
- deep: ``Verifier.deep_one`` over a ``--deep-mib`` model at ``--mbps`` (target: within 10 % of the rate) and
  unthrottled against plain single-thread hashlib (target >= 0.8x);
- repair: a ``--model-gib`` model of 256 MiB shards published from a loopback range server, one byte flipped in
  one shard, found by a deep pass; repaired by one node (``engine.pull``) and by ``--nodes`` nodes at once on one
  folder (``coordinated_pull``, file Leases); target: origin bytes <= 1.1 x the shard, each time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelherd.agent.basemodels import ModelRef
from modelherd.agent.lifecycle.verifier import Verifier, VerifyTarget
from modelherd.agent.reporting.metrics import AgentMetrics
from modelherd.agent.settings import VerificationSettings
from modelherd.coordination import coordinated_pull
from modelherd.storage import engine
from modelherd.storage.manifest import read_manifest
from modelherd.storage.options import EngineOptions
from modelherd.storage.throttle import MB
from modelherd.storage.uri import parse_uri
from prometheus_client import CollectorRegistry

from tests.modelgen import make_sharded_model, write_test_manifest
from tests.rangeserver import RangeServer, RangeSource, make_model

MiB = 1024 * 1024


def verifier(targets: list[VerifyTarget], mbps: float = 0.0) -> Verifier:
    return Verifier(VerificationSettings(interval_s=600, deep_interval_s=0, max_mbps=mbps), node_name="bench",
                    targets=lambda: targets, enqueue=lambda ref: None, metrics=AgentMetrics(CollectorRegistry()),
                    shutdown=threading.Event())


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def bench_quick(tmp: Path, models: int, shards: int) -> bool:
    one = tmp / "quick" / "one"
    make_sharded_model(one, shards, 4096)
    write_test_manifest(one)
    targets = []
    for i in range(models):
        d = tmp / "quick" / f"m{i:03d}"
        shutil.copytree(one, d, copy_function=os.link)
        targets.append(VerifyTarget(ModelRef("BaseModel", "bench", f"m{i}"), d, "local:///test", None))
    v = verifier(targets)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        assert v.quick_pass() == []
        times.append(time.perf_counter() - t0)
    warm = statistics.median(times[1:])
    base = min(bare_walk(tmp / "quick") for _ in range(3))
    cold = min(times[0], *(fresh_pass(targets) for _ in range(2)))
    ok = warm <= 1.0 and cold <= 1.0
    print(f"quick: {models} models x {shards} shards: cold pass {cold:.2f} s (bare walk+stat+header read {base:.2f} s: "
          f"{cold / base:.2f}x), warm pass {warm:.3f} s (target <= 1 s a pass: {verdict(ok)})")
    return ok


def fresh_pass(targets: list[VerifyTarget]) -> float:
    """A cold pass: a new Verifier has no fingerprint of a clean folder, so it reads every header."""
    t0 = time.perf_counter()
    assert verifier(targets).quick_pass() == []
    return time.perf_counter() - t0


def bare_walk(root: Path) -> float:
    """The baseline: walk, stat every file and parse every safetensors header, checking nothing."""
    t0 = time.perf_counter()
    for folder, _, names in os.walk(root):
        for name in names:
            p = os.path.join(folder, name)
            os.stat(p)
            if name.endswith(".safetensors"):
                with open(p, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    json.loads(f.read(n))
    return time.perf_counter() - t0


def plain_hash(files: list[Path]) -> None:
    buf = memoryview(bytearray(4 * MiB))
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(buf[:n])


def bench_deep(tmp: Path, mib: int, mbps: float) -> bool:
    dest = tmp / "deep"
    make_sharded_model(dest, 4, mib * MiB // 4)
    write_test_manifest(dest)  # also warms the page cache
    manifest = read_manifest(dest)
    assert manifest is not None
    target = VerifyTarget(ModelRef("BaseModel", "bench", "deep"), dest, "local:///test", None)
    total = manifest.total_bytes
    t0 = time.perf_counter()
    assert verifier([target], mbps).deep_one(target, manifest) == []
    rate = total / (time.perf_counter() - t0) / MB
    ok_rate = abs(rate - mbps) <= 0.1 * mbps
    print(f"deep, --verify-max-mbps {mbps:g}: {rate:.1f} MB/s over {total / MiB:.0f} MiB "
          f"(target within 10 %: {verdict(ok_rate)})")
    files = [dest / f.path for f in manifest.files]
    plain, deep = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        plain_hash(files)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert verifier([target]).deep_one(target, manifest) == []
        deep.append(time.perf_counter() - t0)
    ratio = min(plain) / min(deep)
    print(f"deep unthrottled: {total / min(deep) / MB:.0f} MB/s, plain hashlib {total / min(plain) / MB:.0f} MB/s: "
          f"{ratio:.2f}x (target >= 0.8: {verdict(ratio >= 0.8)})")
    return ok_rate and ratio >= 0.8


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(12345)
        b = f.read(1)
        f.seek(12345)
        f.write(bytes([b[0] ^ 0xFF]))


def _node(i: int, url: str, files: list[Any], uri: str, args: dict[str, Any], errors: list[BaseException]) -> None:
    try:
        coordinated_pull(source=RangeSource(url, files, uri=uri), node_name=f"n{i}", **args)
    except BaseException as e:
        errors.append(e)


def bench_repair(tmp: Path, gib: float, nodes: int) -> bool:
    shard = 256 * MiB
    n = max(2, int(gib * 1024 * MiB // shard))
    origin = tmp / "origin"
    files = make_model(origin, {f"model-{i:05d}.bin": shard for i in range(n)}, seed=7)
    root = tmp / "models"
    dest = root / "org" / "bench"
    uri = "hf://org/bench"
    opts = EngineOptions()
    ok = True
    with RangeServer(origin) as srv:
        src = RangeSource(srv.url, files, uri=uri)
        engine.pull(src, dest, models_root=root, writer="seed", options=opts)
        target = VerifyTarget(ModelRef("BaseModel", "bench", "repair"), dest, uri, None)
        for label, k in (("1 node", 1), (f"{nodes} nodes on shared storage", nodes)):
            _flip(dest / files[1].path)
            manifest = read_manifest(dest)
            assert manifest is not None
            t0 = time.perf_counter()
            found = verifier([target]).deep_one(target, manifest)
            t_deep = time.perf_counter() - t0
            assert [p.path for p in found] == [files[1].path], found
            srv.reset()
            t0 = time.perf_counter()
            if k == 1:
                engine.pull(src, dest, models_root=root, writer="n0", options=opts)
            else:
                errors: list[BaseException] = []
                args = dict(backend="file", uri=parse_uri(uri), listing_fn=src.list_files, dest=dest,
                            models_root=root, options=opts, lease_duration_s=10, renew_period_s=2, jitter_s=0.2,
                            poll_interval_s=0.5)
                threads = [threading.Thread(target=_node, args=(i, srv.url, files, uri, args, errors))
                           for i in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert not errors, errors
            t_repair = time.perf_counter() - t0
            sent = srv.bytes_sent
            good = sent <= 1.1 * shard
            ok = ok and good
            print(f"repair, {label}: {n * shard / MiB / 1024:.1f} GiB model, one 256 MiB shard flipped: deep pass "
                  f"{t_deep:.1f} s, repair {t_repair:.1f} s, origin sent {sent / MiB:.1f} MiB = {sent / shard:.3f} x "
                  f"the shard (target <= 1.1: {verdict(good)})")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--shards", type=int, default=142)
    ap.add_argument("--deep-mib", type=int, default=256)
    ap.add_argument("--mbps", type=float, default=100.0)
    ap.add_argument("--model-gib", type=float, default=2.0)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        results = [bench_quick(tmp, args.models, args.shards), bench_deep(tmp, args.deep_mib, args.mbps),
                   bench_repair(tmp, args.model_gib, args.nodes)]
    print("all targets met" if all(results) else "some targets missed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
