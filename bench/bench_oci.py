"""Benchmark ``modelherd pull oci://`` against ``oci os object bulk-download`` (oci-cli) on one loopback server.

Usage: python bench/bench_oci.py [--size-mib 256] [--files 4] [--repeat 3] [--oci-cli PATH]

Setup: the model of ``--files`` shards of ``--size-mib`` MiB (cached in ``bench/out/www``, shared with
bench_pull.py; keep one shard > 128 MiB so oci-cli takes its multipart download path) is served by the loopback
Object Storage (``python -m tests.ociserver``, a Python server: the same one for both tools) as
``oci://n/benchns/b/models/o/<model>``. A throwaway API-key user config is generated for both clients (the
server does not check signatures). oci-cli runs from ``bench/.venv-ocicli`` (created with pip if missing, or
``--oci-cli``); it is never installed into the project venv.

Each round (interleaved, rotating order; destination removed and ``sync`` before each run, all under
``bench/out/dest``):
- ``oci-cli``: ``oci os object bulk-download --namespace --bucket-name --prefix --download-dir --endpoint
  --config-file`` (its defaults: 10 parallel operations, multipart above 128 MiB, no checksum of ranged parts);
- ``pull``: ``modelherd pull oci://...`` with ``MODELHERD_OCI_AUTH=user``, ``MODELHERD_OCI_CONFIG_FILE``,
  ``MODELHERD_OCI_ENDPOINT`` (md5 from the listing verified, sha256 recorded, fsync before publish).
Prints each run, the medians and pull/oci-cli (target <= 1.0: at least as fast) with PASS/FAIL; writes
``bench/out/bench_oci.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    OUT,
    REPO,
    Procs,
    Result,
    best,
    cached_model,
    clean,
    interleave,
    median,
    model_files,
    run_child,
    save_json,
    verdict,
)

NS, BUCKET = "benchns", "models"
OCICLI_VENV = REPO / "bench" / ".venv-ocicli"


def ensure_oci_cli(explicit: str | None) -> str:
    """The ``oci`` executable: ``explicit``, else ``bench/.venv-ocicli/bin/oci`` (installed there if missing)."""
    if explicit:
        return explicit
    oci = OCICLI_VENV / "bin" / "oci"
    if not oci.exists():
        print(f"installing oci-cli into {OCICLI_VENV} ...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(OCICLI_VENV)], check=True, timeout=300)
        subprocess.run([str(OCICLI_VENV / "bin" / "pip"), "install", "-q", "oci-cli"], check=True, timeout=600)
    return str(oci)


def user_config(folder: Path) -> Path:
    """An OCI config + fresh RSA key (0600) for the API-key signer; the loopback server ignores signatures."""
    from tests.support import write_oci_user_config

    cfg, _, _ = write_oci_user_config(folder, user="ocid1.user.oc1..aaaabench",
                                      tenancy="ocid1.tenancy.oc1..aaaabench", key_name="key.pem",
                                      config_name="config")
    return cfg


def start_server(procs: Procs, folder: Path, prefix: str) -> str:
    p = procs.start([sys.executable, "-m", "tests.ociserver", "--bucket", f"{NS}/{BUCKET}={folder}:{prefix}"],
                    cwd=REPO, stdout=subprocess.PIPE, log=OUT / "ociserver.log")
    assert p.stdout is not None
    line = p.stdout.readline().decode().strip()  # after the server hashed every file
    if not line.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"ociserver did not start (see {OUT / 'ociserver.log'})")
    return line


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith(".modelherd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of each shard (default 256; keep > 128)")
    ap.add_argument("--files", type=int, default=4, help="number of shards (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--oci-cli", default=None, help="an existing oci executable (default: bench/.venv-ocicli)")
    args = ap.parse_args()

    oci = ensure_oci_cli(args.oci_cli)
    folder = cached_model(args.size_mib, args.files)
    total = sum(p.stat().st_size for p in model_files(folder))
    prefix = f"{folder.name}/"
    dest = OUT / "dest"
    modelherd = str(Path(sys.executable).with_name("modelherd"))

    with Procs() as procs, tempfile.TemporaryDirectory(prefix="bench-oci-") as tmp:
        cfg = user_config(Path(tmp))
        url = start_server(procs, folder, prefix)
        env = {**os.environ, "OCI_CLI_SUPPRESS_FILE_PERMISSIONS_WARNING": "True", "MODELHERD_OCI_AUTH": "user",
               "MODELHERD_OCI_CONFIG_FILE": str(cfg), "MODELHERD_OCI_ENDPOINT": url}
        print(f"model {prefix}: {total / 2**20:.0f} MiB from {url} (tests.ociserver); destinations under {dest} "
              f"({os.cpu_count()} cores)", flush=True)

        def oci_cli() -> dict[str, Result]:
            clean(dest)
            res = run_child([oci, "os", "object", "bulk-download", "--namespace", NS, "--bucket-name", BUCKET,
                             "--prefix", prefix, "--download-dir", str(dest), "--endpoint", url,
                             "--config-file", str(cfg), "--overwrite"], env=env)
            if (got := tree_bytes(dest)) != total:
                raise RuntimeError(f"oci-cli fetched {got} bytes, expected {total}")
            return {"oci-cli": res}

        def pull() -> dict[str, Result]:
            clean(dest)
            res = run_child([modelherd, "pull", f"oci://n/{NS}/b/{BUCKET}/o/{prefix.rstrip('/')}", "--models-root",
                             str(dest), "--dest", str(dest / "m"), "--no-progress", "--coordination", "none",
                             "--storage-mode", "local", "--log-level", "WARNING"], env=env)
            if (got := tree_bytes(dest / "m")) != total:
                raise RuntimeError(f"modelherd pull published {got} bytes, expected {total}")
            return {"pull": res}

        series = interleave({"oci-cli": oci_cli, "pull": pull}, args.repeat)
        clean(dest)

    med = {k: median(v) for k, v in series.items()}
    print(f"\nmedians of {args.repeat} interleaved rounds, {total / 2**20:.0f} MiB:")
    for k, m in med.items():
        print(f"  {k:<8} {m.seconds:7.2f} s  (best {best(series[k]):.2f} s, {total / 2**20 / m.seconds:6.0f} MiB/s)"
              f"  peak RSS {m.rss_mib:5.0f} MiB")
    ratio = med["pull"].seconds / med["oci-cli"].seconds
    print(f"\n  pull/oci-cli  {ratio:5.2f}  (target <= 1.0)  {verdict(ratio <= 1.0)}")
    report = {"bytes": total, "repeat": args.repeat, "runs": {k: [r.__dict__ for r in v] for k, v in series.items()},
              "pull_over_oci_cli": ratio}
    print(f"wrote {save_json('bench_oci.json', report)}")
    return 0 if ratio <= 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
