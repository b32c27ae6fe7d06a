"""Benchmark ``modelherd pull hf://`` against hostile listings (issue #8, item 4): peak RSS and time to the error.

Usage: python bench/bench_hostile.py [--entries 1000000] [--page-size 1000] [--skip-many]

Cases, each one ``modelherd pull hf://... --coordination none --storage-mode local`` in a subprocess whose own
peak RSS (``ru_maxrss``) and wall time (interpreter start-up included) are measured by ``_harness``'s wrapper:

- ``size 1e15`` / ``size 1e30``: the loopback Hub (``tests.hubserver.HubServer``) lists one LFS file claiming
  10^15 (resp. 10^30) bytes. Expected: refused before anything is planned (insufficient space, exit 6; a
  malformed listing above 1 PiB, exit 3), no body byte served;
- ``1e6 entries`` / ``1e6 entries --allow '*.json'``: a tree of ``--entries`` one-byte files (none of them
  ``.json``) in pages of ``--page-size`` entries, as the Hub paginates (``Link: rel="next"``). Expected: refused
  as malformed (more than ``max_files`` entries, exit 3) resp. "selects no file" (exit 2). This tree is served
  by a small generator server below, not by ``HubServer``: that one rebuilds the whole entry list for every
  page, which is quadratic for 10^6 entries (the client's requests are the same).

Targets (issue #8): peak RSS <= 150 MiB and time to the error <= 2 s, per case. Prints a table with PASS/FAIL
and writes ``bench/out/bench_hostile.json``; exit status 0 only if every case errs as expected within both.
The 10^6-entry cases also measure the Hub source's listing parser (``storage/sources/hf.py``), which holds
every entry of every page before the engine sees the listing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import _RSS_WRAPPER, OUT, REPO, _run_child, save_json, verdict

from tests.hubserver import HubFile, HubServer

RSS_TARGET_MIB = 150.0
TIME_TARGET_S = 2.0
COMMIT = "c" * 40


class TreeServer:
    """A loopback Hub API that lists ``entries`` one-byte files of ``org/many`` at one commit, page by page.

    Each page is generated from its cursor alone (constant memory, linear time over the whole listing).
    """

    def __init__(self, entries: int, page_size: int) -> None:
        self.entries, self.page_size = entries, page_size
        self.pages = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/api/models/org/many/revision/main":
                    self._json({"id": "org/many", "sha": COMMIT, "siblings": []})
                elif url.path == f"/api/models/org/many/tree/{COMMIT}":
                    cursor = int(urllib.parse.parse_qs(url.query).get("cursor", ["0"])[0])
                    outer.pages += 1
                    end = min(outer.entries, cursor + outer.page_size)
                    page = [{"type": "file", "oid": hashlib.sha1(b"%d" % i, usedforsecurity=False).hexdigest(),
                             "size": 1, "path": f"blobs/{i // 1000:04d}/part-{i:07d}.bin"} for i in range(cursor, end)]
                    extra = {}
                    if end < outer.entries:
                        extra["Link"] = (f'<{outer.endpoint}{url.path}?recursive=true&expand=false&cursor={end}>; '
                                         'rel="next"')
                    self._json(page, extra)
                else:
                    self._json({"error": "not found"}, status=404)

            def _json(self, obj: object, extra: dict[str, str] | None = None, status: int = 200) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def __enter__(self) -> TreeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def pull(endpoint: str, repo: str, root: Path, *flags: str) -> dict[str, object]:
    """One ``modelherd pull`` expected to fail: its exit status, wall time, own peak RSS and last stderr line."""
    modelherd = str(Path(sys.executable).with_name("modelherd"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG"))}
    env["HF_ENDPOINT"] = endpoint
    argv = [modelherd, "pull", f"hf://{repo}", "--models-root", str(root), "--no-progress", "--coordination",
            "none", "--storage-mode", "local", *flags]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        _, rc = _run_child([sys.executable, "-c", _RSS_WRAPPER, rss.name, *argv], env, 300.0, REPO, out, err)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        rss_kib, seconds = rss.read().split()
    shutil.rmtree(root, ignore_errors=True)
    return {"exit": rc, "seconds": float(seconds), "rss_mib": int(rss_kib) / 1024,
            "error": lines[-1] if lines else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000, help="entries of the long listing (default 10^6)")
    ap.add_argument("--page-size", type=int, default=1000, help="tree entries per page (the Hub's: 1000)")
    ap.add_argument("--skip-many", action="store_true", help="only the huge-size cases")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    root = OUT / "dest-hostile"
    results: dict[str, dict[str, object]] = {}
    expected: dict[str, int] = {}
    with HubServer() as hub:
        for label, size in (("size 1e15", 10**15), ("size 1e30", 10**30)):
            repo = f"org/huge-{label[-2:]}"
            huge = HubFile(path="model.safetensors", size=size, blob_id="0" * 40, sha256="1" * 64, lfs=True,
                           data=b"")
            hub._commit(repo, "main", {"model.safetensors": huge}, token=None, gated=False)
            results[label] = pull(hub.endpoint, repo, root)
            results[label]["bytes_served"] = hub.stats()["bytes_served"]
            expected[label] = 6 if size <= 2**50 else 3
    if not args.skip_many:
        with TreeServer(args.entries, args.page_size) as tree:
            label = f"{args.entries:.0e} entries".replace("+0", "")
            results[label] = pull(tree.endpoint, "org/many", root)
            expected[label] = 3
            results[f"{label} --allow '*.json'"] = pull(tree.endpoint, "org/many", root, "--allow", "*.json")
            expected[f"{label} --allow '*.json'"] = 2

    ok = True
    print(f"{'case':<30} {'exit':>4} {'want':>4} {'seconds':>8} {'peak RSS':>9}   verdict   error")
    for label, r in results.items():
        good = (r["exit"] == expected[label] and float(r["seconds"]) <= TIME_TARGET_S  # type: ignore[arg-type]
                and float(r["rss_mib"]) <= RSS_TARGET_MIB)  # type: ignore[arg-type]
        ok = ok and good
        print(f"{label:<30} {r['exit']:>4} {expected[label]:>4} {r['seconds']:>8.2f} {r['rss_mib']:>5.0f} MiB   "
              f"{verdict(good):<8}  {str(r['error'])[:110]}")
    print(f"targets: the expected exit status, <= {TIME_TARGET_S} s and <= {RSS_TARGET_MIB:.0f} MiB per case")
    path = save_json("bench_hostile.json", {"results": results, "expected_exit": expected,
                                            "targets": {"seconds": TIME_TARGET_S, "rss_mib": RSS_TARGET_MIB}})
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
