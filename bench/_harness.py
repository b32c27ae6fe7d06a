"""Shared pieces of the pull benchmarks: model cache, child processes with their own peak RSS, nginx, timing.

Invariants: every server started here binds 127.0.0.1 and is killed by :class:`Procs` on exit (also on Ctrl-C);
every wait is bounded; destinations are removed and the dirty pages flushed (``os.sync``) between runs so that
one tool's writeback never lands in another tool's timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
MiB = 1024 * 1024
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def cached_model(size_mib: int, files: int, *, seed: int = 1) -> Path:
    """``bench/out/www/org/model-<files>x<size>`` (``make_sharded_model``), generated once and kept."""
    from tests.modelgen import make_sharded_model

    folder = OUT / "www" / "org" / f"model-{files}x{size_mib}"
    marker = folder.with_name(f".{folder.name}.complete")  # outside the model: the Hub serves every file
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {files} x {size_mib} MiB into {folder} ...", flush=True)
        make_sharded_model(folder, n_shards=files, shard_bytes=size_mib * MiB, seed=seed)
        marker.write_text("ok\n")
    return folder


def model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@dataclass
class Procs:
    """Background servers, terminated (then killed) on exit."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(self, argv: Sequence[str], *, log: Path, **kw: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, stderr to ``log``."""
        err = self.stack.enter_context(open(log, "wb"))  # noqa: SIM115  (closed with the stack)
        p = subprocess.Popen(list(argv), start_new_session=True, stderr=err, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def __enter__(self) -> Procs:
        # SIGTERM (e.g. from `timeout`) unwinds through __exit__ like Ctrl-C, so no server outlives the bench
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.stack.close()


NGINX_CONF = """\
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  sendfile on; tcp_nopush on; keepalive_requests 10000;
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


@contextlib.contextmanager
def nginx(procs: Procs, root: Path) -> Iterator[str]:
    """A static nginx on 127.0.0.1 serving ``root`` (sendfile on); yields its base URL."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root))
    try:
        procs.start(["/usr/sbin/nginx", "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
                    log=tmp / "stderr")
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Result:
    seconds: float
    rss_mib: float
    stdout: str = ""


# Runs the command and reports its peak RSS from RUSAGE_CHILDREN. Measuring in this small middle process matters:
# a process exec'd straight from the bench inherits the bench's own high-water RSS in its ru_maxrss (Linux folds
# the vfork parent's mark in at exec), and so would wait4() on it. The middle process also times the command
# itself, from just before its spawn to its exit, so its own interpreter start-up is not charged to the command
# (curl is timed from the bench, with nothing in between).
_RSS_WRAPPER = """
import resource, subprocess, sys, time
started = time.monotonic()
rc = subprocess.call(sys.argv[2:])
elapsed = time.monotonic() - started
with open(sys.argv[1], "w") as f:
    f.write(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {elapsed}")
sys.exit(rc)
"""


def run_child(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600.0,
              cwd: Path = REPO) -> Result:
    """Run one command; its wall time and its own peak RSS (MiB), both taken by ``_RSS_WRAPPER``, and its stdout.

    stdout/stderr go to temporary files (not pipes), so a chatty child never blocks on a full pipe.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errf, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        res, rc = _run_child([sys.executable, "-c", _RSS_WRAPPER, rss.name, *argv], env, timeout, cwd, out, errf)
        out.seek(0)
        errf.seek(0)
        stdout, err = out.read().decode(errors="replace"), errf.read().decode(errors="replace")
        text = rss.read().split()
        if len(text) == 2:
            res.rss_mib, res.seconds = int(text[0]) / 1024, float(text[1])
        else:
            res.rss_mib = 0.0
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {rc}:\n{err[-3000:]}")
    res.stdout = stdout
    return res


def _run_child(argv: Sequence[str], env: dict[str, str] | None, timeout: float, cwd: Path, out: object,
               errf: object) -> tuple[Result, int]:
    started = time.monotonic()
    p = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=out, stderr=errf)  # type: ignore[call-overload]
    deadline = started + timeout
    try:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv[0]} ran past {timeout:.0f}s")
            time.sleep(0.005)
    except BaseException:  # timeout, Ctrl-C, SIGTERM: the child goes too
        p.kill()
        os.wait4(p.pid, 0)
        raise
    elapsed = time.monotonic() - started
    p.returncode = os.waitstatus_to_exitcode(status)
    return Result(elapsed, ru.ru_maxrss / 1024), p.returncode


def _disk_counters() -> str:
    try:
        with open("/proc/diskstats") as f:
            # reads/writes/discards completed per device; sectors change while writeback or discards run
            return "".join(" ".join(line.split()[3:]) for line in f if not line.split()[2].startswith("loop"))
    except OSError:
        return ""


def wait_disk_quiet(quiet_s: float = 0.5, limit_s: float = 8.0) -> None:
    """Wait (bounded) until the block devices finished what the last run left them (writeback, discards)."""
    deadline = time.monotonic() + limit_s
    last, since = _disk_counters(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _disk_counters()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """``sync``, let the disk settle, drop the page cache, settle again; False when this process may not (not root,
    read-only /proc): then the next run reads from memory, and the caller says so."""
    os.sync()
    wait_disk_quiet()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    wait_disk_quiet()
    return True


def relink(folder: Path, copy: Path) -> None:
    """``copy``: the model's files as hard links of ``folder``'s, no manifest: an intact copy modelherd did not
    publish (OME's leftovers, a ``--local-dir`` download), rebuilt in milliseconds."""
    shutil.rmtree(copy, ignore_errors=True)
    for p in model_files(folder):
        target = copy / p.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, target)


def clean(path: Path) -> None:
    """Remove ``path``, flush dirty pages and let the disk settle, so the next run starts from a quiet disk.

    On a filesystem mounted with ``discard`` the deletion of gigabytes that were fsynced issues TRIMs that
    would otherwise slow down whichever tool runs next.
    """
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    wait_disk_quiet()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def interleave(tools: dict[str, Callable[[], dict[str, Result]]], repeat: int) -> dict[str, list[Result]]:
    """Run every tool ``repeat`` times, rotating the order each round; a tool may report several series."""
    series: dict[str, list[Result]] = {}
    names = list(tools)
    for r in range(repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            for key, res in tools[name]().items():
                series.setdefault(key, []).append(res)
                print(f"  round {r + 1} {key:<22} {res.seconds:7.2f} s  peak RSS {res.rss_mib:6.0f} MiB", flush=True)
                res.stdout = ""
    return series


def median(results: list[Result]) -> Result:
    return Result(statistics.median(r.seconds for r in results), max(r.rss_mib for r in results))


def best(results: list[Result]) -> float:
    return min(r.seconds for r in results)


def report_medians(series: dict[str, list[Result]], total_bytes: int, title: str) -> dict[str, Result]:
    """Print ``title`` and each tool's median seconds (its best, its MiB/s, its peak RSS); return the medians."""
    med = {k: median(v) for k, v in series.items()}
    print(f"\n{title}:")
    for k, m in med.items():
        rss = f"  peak RSS {m.rss_mib:6.0f} MiB" if m.rss_mib else ""
        print(f"  {k:<20} {m.seconds:7.2f} s  (best {best(series[k]):.2f} s, "
              f"{total_bytes / 2**20 / m.seconds:7.0f} MiB/s){rss}")
    return med


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def save_json(name: str, data: object) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=1))
    return path
