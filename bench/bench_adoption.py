"""Benchmark adoption (issue #17): ``modelherd pull`` over an intact copy it did not publish vs ``sha256sum`` 8-way.

Usage: python bench/bench_adoption.py [--size-mib 256] [--files 8] [--repeat 3] [--no-drop-caches]

Setup (once per run): the model of ``--files`` shards of ``--size-mib`` MiB (``bench/out/www``, shared with
bench_pull.py) is served by the loopback Hub (``modelherd.testing.hubserver.HubServer``, in this process, so its
counters tell that no body byte was served). Each round rebuilds the copy at ``bench/out/adopt/models/org/<model>``
from hard links of the generated files (no manifest, like a ``huggingface-cli download --local-dir`` copy), calls
``sync`` and, when this process may (root), drops the page cache (``echo 3 > /proc/sys/vm/drop_caches``) before
each tool, so both read from the disk. In rotating order (interleaved):

- ``adopt``: ``modelherd pull hf://org/<model> --coordination none --storage-mode local`` over the copy: listing,
  survey, hard links into staging, every file hashed against the listing's sha256 / git sha1 in parallel, fsync,
  publish (``adopt (CLI seconds)`` is the CLI's own clock, without interpreter start-up; ``adopt (hashing alone)``
  the engine's own figure for the parallel hashing of the files, from its log);
- ``sha256sum``: ``find COPY -type f -print0 | xargs -0 -P8 -n1 sha256sum`` over the same files (the target's
  baseline; GNU coreutils' own SHA-256, which does not use the CPU's SHA instructions);
- ``openssl``: the same with ``openssl dgst -sha256`` (OpenSSL's SHA-256, the one hashlib uses), and ``cat``: the
  same with ``cat >/dev/null`` (reading alone: the disk's speed), for reference.

Wall times are for the whole subprocess (start-up included); peak RSS is the child's own ``ru_maxrss``. Prints every
run, the medians, ``adopt/sha256sum`` (target <= 1.2) and adopt's peak RSS (target <= 150 MiB) with PASS/FAIL, and
writes ``bench/out/bench_adoption.json``. Exit status 0 only if both pass.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    DROP_CACHES,
    OUT,
    Result,
    cached_model,
    drop_caches,
    interleave,
    model_files,
    relink,
    report_medians,
    run_child,
    save_json,
    verdict,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of each shard (default 256)")
    ap.add_argument("--files", type=int, default=8, help="number of shards (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs (hot reads)")
    args = ap.parse_args()

    from modelherd.testing.hubserver import HubServer

    folder = cached_model(args.size_mib, args.files)
    repo_id = f"org/{folder.name}"
    files = model_files(folder)
    total = sum(p.stat().st_size for p in files)
    root = OUT / "adopt" / "models"
    copy = root / repo_id
    modelherd = str(Path(sys.executable).with_name("modelherd"))
    cold = not args.no_drop_caches and drop_caches()
    caches = "page cache dropped before every run" if cold else (
        "page cache kept (--no-drop-caches)" if args.no_drop_caches else
        f"page cache NOT dropped (cannot write {DROP_CACHES}: not root?): both tools read from memory")

    with HubServer() as hub:
        hub.add_repo(repo_id, folder, lfs_min_size=100_000)
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_TOKEN", None)
        print(f"model {repo_id}: {len(files)} files, {total / 2**20:.0f} MiB; Hub {hub.endpoint}; copy at {copy} "
              f"({os.cpu_count()} cores); {caches}", flush=True)

        def prepare() -> None:
            relink(folder, copy)
            if cold:
                drop_caches()

        def adopt() -> dict[str, Result]:
            shutil.rmtree(root / ".modelherd-staging", ignore_errors=True)
            prepare()
            hub.reset_counters()
            log = OUT / "bench_adoption.log"
            pull = [modelherd, "pull", f"hf://{repo_id}", "--models-root", str(root), "--no-progress",
                    "--coordination", "none", "--storage-mode", "local", "--log-level", "INFO"]
            res = run_child(["sh", "-c", 'exec "$0" "$@" 2>"$LOG"', *pull], env={**env, "LOG": str(log)})
            ready = json.loads(res.stdout.strip().splitlines()[-1])
            hashed = re.search(r"MiB hashed in ([0-9.]+)s", log.read_text())
            if ready["status"] != "Ready" or ready["bytes"] != total or hub.stats()["bytes_served"]:
                raise RuntimeError(f"adoption did not publish the copy as it is: {ready}, {hub.stats()}")
            if not (copy / ".modelherd-manifest.json").is_file():
                raise RuntimeError("no completion manifest after the adoption")
            if hashed is None:
                raise RuntimeError(f"no hashing figure in {log}")
            return {"adopt": res, "adopt (CLI seconds)": Result(float(ready["seconds"]), 0.0),
                    "adopt (hashing alone)": Result(float(hashed.group(1)), 0.0)}

        def eight_way(name: str, command: str) -> dict[str, Result]:
            prepare()
            res = run_child(["sh", "-c", f"find '{copy}' -type f -print0 | xargs -0 -P8 -n1 {command} >/dev/null"])
            return {name: res}

        series = interleave({"adopt": adopt, "sha256sum": lambda: eight_way("sha256sum", "sha256sum"),
                             "openssl": lambda: eight_way("openssl", "openssl dgst -sha256"),
                             "cat": lambda: eight_way("cat", "cat")}, args.repeat)
    shutil.rmtree(OUT / "adopt", ignore_errors=True)

    med = report_medians(series, total,
                         f"medians of {args.repeat} interleaved rounds, "
                         f"{total / 2**20:.0f} MiB, {caches}")
    ratio = med["adopt"].seconds / med["sha256sum"].seconds
    cli_ratio = med["adopt (CLI seconds)"].seconds / med["sha256sum"].seconds
    print(f"\n  adopt/sha256sum  {ratio:5.2f}  (target <= 1.2)  {verdict(ratio <= 1.2)}")
    print(f"  adopt (CLI seconds)/sha256sum  {cli_ratio:5.2f}  (without interpreter start-up)")
    print(f"  adopt/openssl    {med['adopt'].seconds / med['openssl'].seconds:5.2f}  (hashlib's SHA-256 code)")
    print(f"  adopt/cat        {med['adopt'].seconds / med['cat'].seconds:5.2f}  (reading alone)")
    print(f"  adopt (hashing alone)/cat  {med['adopt (hashing alone)'].seconds / med['cat'].seconds:5.2f}  "
          "(the files hashed in parallel vs read in parallel)")
    print(f"  adopt peak RSS   {med['adopt'].rss_mib:5.0f} MiB (target <= 150)  {verdict(med['adopt'].rss_mib <= 150)}")
    report = {"bytes": total, "repeat": args.repeat, "cold": cold, "cpus": os.cpu_count(),
              "runs": {k: [r.__dict__ for r in v] for k, v in series.items()},
              "adopt_over_sha256sum": ratio, "adopt_cli_over_sha256sum": cli_ratio,
              "adopt_over_openssl": med["adopt"].seconds / med["openssl"].seconds,
              "adopt_over_cat": med["adopt"].seconds / med["cat"].seconds,
              "adopt_hashing_over_cat": med["adopt (hashing alone)"].seconds / med["cat"].seconds}
    print(f"\nwrote {save_json('bench_adoption.json', report)}")
    return 0 if ratio <= 1.2 and med["adopt"].rss_mib <= 150 else 1


if __name__ == "__main__":
    raise SystemExit(main())
