"""Benchmark ``modelherd pull hf://`` against 8 parallel curl and ``huggingface_hub.snapshot_download`` (issue #2).

Usage: python bench/bench_pull.py [--size-mib 256] [--files 8] [--repeat 3] [--no-snapshot]

Setup (once per run): a model of ``--files`` shards of ``--size-mib`` MiB is generated into ``bench/out/www``
(kept between runs), nginx serves it (``sendfile on``) on 127.0.0.1, and the loopback Hub
(``python -m tests.hubserver --redirect-base <nginx>``) answers the API and 302s every LFS file to nginx,
as the real Hub does to its CDN. All destinations are folders under ``bench/out/dest`` (one filesystem).

Each round runs, in rotating order (interleaved), after removing the last destination and ``sync``:
- ``curl``: one ``curl -sfL`` process per file of the model, all at once, through the Hub's resolve URLs;
  ``curl+fsync`` is the same run plus an fsync of every file (modelherd fsyncs what it publishes);
- ``pull``: ``modelherd pull hf://org/<model> --coordination none --storage-mode local`` (sha256 of every file);
- ``snapshot``: ``huggingface_hub.snapshot_download(max_workers=8)`` into a fresh cache folder.
Wall times are for the whole subprocess (start-up included); peak RSS is the child's own ``ru_maxrss``.
Prints every run, the medians, the ratios pull/curl (target <= 1.25), snapshot/pull (target >= 2.5) and
pull peak RSS (target <= 150 MiB) with PASS/FAIL, and writes ``bench/out/bench_pull.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    fsync_file,
    interleave,
    model_files,
    nginx,
    report_medians,
    run_child,
    save_json,
    verdict,
)

SNAPSHOT = """
import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[1], cache_dir=sys.argv[2], max_workers=8)
"""


def start_hub(procs: Procs, repo_id: str, folder: Path, cdn: str) -> str:
    p = procs.start([sys.executable, "-m", "tests.hubserver", "--repo", f"{repo_id}={folder}", "--redirect-base",
                     cdn, "--print-port"], cwd=REPO, stdout=-1, log=OUT / "hubserver.log")
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()  # the Hub hashes the files first: allow for it
    if not line.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"hubserver did not start (see {OUT / 'hubserver.log'})")
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of each shard (default 256)")
    ap.add_argument("--files", type=int, default=8, help="number of shards (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--no-snapshot", action="store_true", help="skip huggingface_hub.snapshot_download")
    ap.add_argument("--pull-arg", action="append", default=[], help="extra argument for modelherd pull")
    args = ap.parse_args()

    folder = cached_model(args.size_mib, args.files)
    repo_id = f"org/{folder.name}"
    files = model_files(folder)
    total = sum(p.stat().st_size for p in files)
    dest = OUT / "dest"
    modelherd = str(Path(sys.executable).with_name("modelherd"))
    for p in files:  # both sides read the origin from the page cache
        with open(p, "rb") as f:
            while f.read(16 * 1024 * 1024):
                pass

    with Procs() as procs, nginx(procs, OUT / "www") as cdn:
        endpoint = start_hub(procs, repo_id, folder, cdn)
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}
        env.pop("HF_TOKEN", None)
        print(f"model {repo_id}: {len(files)} files, {total / 2**20:.0f} MiB; Hub {endpoint}, CDN (nginx) {cdn}; "
              f"destinations under {dest} ({os.cpu_count()} cores)", flush=True)

        def curl() -> dict[str, Result]:
            clean(dest)
            dest.mkdir(parents=True)
            import subprocess
            import time

            started = time.monotonic()
            procs_ = [subprocess.Popen(["curl", "-sfL", "--max-time", "300", "--create-dirs", "-o",
                                        str(dest / p.relative_to(folder)),
                                        f"{endpoint}/{repo_id}/resolve/main/{p.relative_to(folder).as_posix()}"])
                      for p in files]
            rcs = [c.wait(timeout=310) for c in procs_]
            plain = time.monotonic() - started
            if any(rcs):
                raise RuntimeError(f"curl failed: {rcs}")
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(fsync_file, [p for p in dest.rglob("*") if p.is_file()]))
            synced = time.monotonic() - started
            got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            if got != total:
                raise RuntimeError(f"curl fetched {got} bytes, expected {total}")
            return {"curl": Result(plain, 0.0), "curl+fsync": Result(synced, 0.0)}

        def pull() -> dict[str, Result]:
            clean(dest)
            res = run_child([modelherd, "pull", f"hf://{repo_id}", "--models-root", str(dest), "--no-progress",
                             "--coordination", "none", "--storage-mode", "local", "--log-level", "WARNING",
                             *args.pull_arg], env=env)
            got = sum(p.stat().st_size for p in (dest / repo_id).rglob("*") if p.is_file()
                      and not p.name.startswith(".modelherd"))
            if got != total:
                raise RuntimeError(f"modelherd pull published {got} bytes, expected {total}")
            ready = json.loads(res.stdout.strip().splitlines()[-1])
            # the CLI's own clock: listing + download + verify + fsync + publish, without interpreter start-up
            return {"pull": res, "pull (CLI seconds)": Result(float(ready["seconds"]), 0.0)}

        def snapshot() -> dict[str, Result]:
            clean(dest)
            res = run_child([sys.executable, "-c", SNAPSHOT, repo_id, str(dest / "hf-cache")], env=env)
            return {"snapshot": res}

        tools = {"curl": curl, "pull": pull} | ({} if args.no_snapshot else {"snapshot": snapshot})
        series = interleave(tools, args.repeat)
        clean(dest)

    med = report_medians(series, total,
                         f"medians of {args.repeat} interleaved rounds, "
                         f"{total / 2**20:.0f} MiB")
    pull_curl = med["pull"].seconds / med["curl"].seconds
    print(f"\n  pull/curl        {pull_curl:5.2f}  (target <= 1.25)  {verdict(pull_curl <= 1.25)}")
    print(f"  pull/curl+fsync  {med['pull'].seconds / med['curl+fsync'].seconds:5.2f}")
    print(f"  pull (CLI seconds)/curl  {med['pull (CLI seconds)'].seconds / med['curl'].seconds:5.2f}  "
          "(without interpreter start-up)")
    report: dict[str, object] = {"bytes": total, "repeat": args.repeat,
                                 "runs": {k: [r.__dict__ for r in v] for k, v in series.items()},
                                 "pull_over_curl": pull_curl}
    ok = pull_curl <= 1.25 and med["pull"].rss_mib <= 150
    if "snapshot" in med:
        snap_pull = med["snapshot"].seconds / med["pull"].seconds
        report["snapshot_over_pull"] = snap_pull
        print(f"  snapshot/pull    {snap_pull:5.2f}  (target >= 2.5)   {verdict(snap_pull >= 2.5)}")
        print(f"  snapshot/curl    {med['snapshot'].seconds / med['curl'].seconds:5.2f}")
        ok = ok and snap_pull >= 2.5
    print(f"  pull peak RSS    {med['pull'].rss_mib:5.0f} MiB (target <= 150)  {verdict(med['pull'].rss_mib <= 150)}")
    print(f"\nwrote {save_json('bench_pull.json', report)}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
