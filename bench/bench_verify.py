"""Benchmark verification: deep-verify throughput vs plain hashlib, and quick-verify time for many shards.

Usage: python bench/bench_verify.py [--shards 8] [--shard-mib 256] [--quick-shards 142] [--dir /tmp/x]

Prints:
- plain: ``hashlib.sha256`` over every file, one process, one thread, sequential (MB/s);
- deep: ``verify_deep`` (quick checks + parallel re-hash) over the same files (MB/s) and the ratio deep/plain
  (target >= 0.8);
- quick: median ``verify_quick`` time for a model with ``--quick-shards`` shards + index + manifest
  (target < 0.3 s).
Files are read once before timing so both sides read from the page cache; runs alternate.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelherd.storage.verify import verify_deep, verify_quick

from tests.modelgen import MiB, make_sharded_model, write_test_manifest


def plain_hash(files: list[Path]) -> None:
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    for p in files:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                h.update(view[:n])
        h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("--quick-shards", type=int, default=142)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        big = Path(tmp) / "big"
        t0 = time.perf_counter()
        make_sharded_model(big, args.shards, args.shard_mib * MiB)
        t_gen = time.perf_counter() - t0
        write_test_manifest(big)  # also warms the page cache
        files = sorted(p for p in big.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        print(f"generated {args.shards} x {args.shard_mib} MiB in {t_gen:.1f} s "
              f"({total / t_gen / 1e6:.0f} MB/s)")

        plain, deep = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            plain_hash(files)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            problems = verify_deep(big, require_manifest=True)
            deep.append(time.perf_counter() - t0)
            assert not problems, problems
        p_mbs, d_mbs = total / min(plain) / 1e6, total / min(deep) / 1e6
        print(f"plain hashlib sha256 (1 thread): {p_mbs:.0f} MB/s  (best of {args.repeat})")
        print(f"verify_deep:                     {d_mbs:.0f} MB/s  (best of {args.repeat})")
        print(f"ratio deep/plain: {d_mbs / p_mbs:.2f}  (target >= 0.8)")

        many = Path(tmp) / "many"
        make_sharded_model(many, args.quick_shards, 4096)
        write_test_manifest(many)
        times = []
        for _ in range(max(5, args.repeat)):
            t0 = time.perf_counter()
            problems = verify_quick(many, require_manifest=True)
            times.append(time.perf_counter() - t0)
            assert not problems, problems
        print(f"verify_quick, {args.quick_shards} shards: median {statistics.median(times) * 1000:.1f} ms, "
              f"max {max(times) * 1000:.1f} ms  (target < 300 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
