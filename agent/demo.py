"""``modelherd demo``: N coordinated pulls of one generated model on one shared folder, offline.

What it does, in a fresh temporary folder (removed at the end unless ``--keep``, kept when anything failed):

1. writes a Llama-shaped safetensors model (:func:`modelherd.testing.models.make_llama_model`, numpy-free);
2. serves it from a loopback Hugging Face Hub (:class:`modelherd.testing.hubserver.HubServer`, 127.0.0.1 only);
3. starts N real ``modelherd pull`` processes as nodes ``node-0 … node-N-1`` on one models root with
   ``--coordination file --storage-mode shared``, their environment pointed at the loopback Hub only
   (``HF_ENDPOINT``; proxies, tokens, kubeconfigs and ``MODELHERD_*`` of the caller removed; ``HF_HOME`` inside
   the folder);
4. shows live who holds the lease file and how far it got (``coordination.filelease.list_file_leases``);
5. prints the result: bytes the origin served against the model size, nodes Ready, ``verify --deep``.

Invariants: nothing is written outside the temporary folder; the only sockets opened are to the loopback Hub;
:func:`run_demo` returns a :class:`DemoResult` whose ``ok`` holds exactly when every node exited 0 and printed
Ready, the origin served each byte at most once, the published model passes deep verification with its manifest
and no staging is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..storage.errors import ModelherdError

__all__ = ["DemoError", "DemoOptions", "DemoResult", "NodeRun", "child_env", "run_demo"]

MiB = 1024 * 1024
REPO_ID = "modelherd-demo/tiny-llama"
# Environment variables of the caller that could send a child anywhere but the loopback Hub, or change its
# settings: removed from every child's environment.
_DROP_PREFIXES = ("MODELHERD_", "HF_", "HUGGING_FACE_", "KUBECONFIG", "OCI_", "NODE_NAME", "POD_NAMESPACE")
_DROP_NAMES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


class DemoError(ModelherdError):
    """The demo did not end with one download and every node Ready; the folder is kept for its logs."""

    exit_code = 1


@dataclass(frozen=True)
class DemoOptions:
    """The demo's knobs. ``origin_rate`` is bytes/s per origin connection (0: unthrottled), so that the live
    view has something to show on a fast machine."""

    nodes: int = 4
    size_bytes: int = 64 * MiB
    shards: int = 8
    origin_rate: float = 2 * MiB
    keep: bool = False
    workdir: Path | None = None
    interval_s: float = 0.25
    timeout_s: float = 300.0
    seed: int = 0


@dataclass
class NodeRun:
    """One node's pull process and what it reported."""

    node: str
    proc: subprocess.Popen[str]
    log: Path
    returncode: int | None = None
    ready: dict[str, Any] | None = None

    @property
    def role(self) -> str:
        if self.ready is None:
            return "failed"
        return str(self.ready.get("role") or self.ready.get("how") or "?")


@dataclass
class DemoResult:
    """What the demo measured. ``ok``: one download, every node Ready, deep verification clean, no staging."""

    workdir: Path
    root: Path
    dest: Path
    model_bytes: int
    model_files: int
    origin_bytes: int
    nodes: list[NodeRun] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    staging_left: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.origin_bytes / self.model_bytes if self.model_bytes else 0.0

    @property
    def ready_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.returncode == 0 and n.ready is not None)

    @property
    def ok(self) -> bool:
        return (self.ready_nodes == len(self.nodes) > 0 and self.origin_bytes <= self.model_bytes
                and not self.problems and not self.staging_left)


def child_env(base: dict[str, str], hub_endpoint: str, workdir: Path) -> dict[str, str]:
    """The environment of a node process: the caller's minus anything naming another origin, proxy, token,
    cluster or modelherd setting; plus the loopback Hub, short lease polls and an ``HF_HOME`` inside ``workdir``.

    ``NO_PROXY`` covers 127.0.0.1 so that even a proxy configured elsewhere is never used.
    """
    env = {k: v for k, v in base.items()
           if not k.startswith(_DROP_PREFIXES) and k.lower() not in _DROP_NAMES}
    env.update({
        "HF_ENDPOINT": hub_endpoint,
        "HF_HOME": str(workdir / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "MODELHERD_POLL_INTERVAL_S": "0.5",
        "MODELHERD_WAIT_JITTER_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _LiveView:
    """One status line: lease holder, phase, progress, nodes done, origin bytes. Redrawn in place on a terminal;
    elsewhere printed only when it changes (progress in steps of 10 %), so a log stays short."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = ""

    def show(self, text: str, key: str) -> None:
        if self._tty:  # cut to the terminal's width: a wrapped line could not be redrawn in place
            width = shutil.get_terminal_size().columns - 1
            self._out.write("\r\x1b[K" + text[:max(20, width)])
            self._out.flush()
        elif key != self._last:
            self._out.write(text + "\n")
            self._out.flush()
        self._last = key

    def end(self) -> None:
        if self._tty:
            self._out.write("\n")
            self._out.flush()


def _status_line(root: Path, runs: list[NodeRun], origin_bytes: int, model_bytes: int) -> tuple[str, str]:
    """(text, change key) for the live view, from the lease files under ``root`` and the processes."""
    from ..coordination.filelease import list_file_leases
    from ..coordination.leaseviews import view_of

    done = sum(1 for r in runs if r.proc.poll() is not None)
    views = [view_of(rec) for rec in list_file_leases(root)]
    if not views:
        lease_txt, lease_key = "lease: not yet taken", "none"
    else:
        v = views[0]
        pct = v.percent
        progress = (f"{_size(v.bytes_done)}/{_size(v.bytes_total)} {pct:3.0f}%" if pct is not None else "-")
        lease_txt = f"lease holder {v.holder or '-':<8} {v.phase or '-':<11} {progress}"
        lease_key = f"{v.holder}|{v.phase}|{int(pct // 10) if pct is not None else -1}"
    text = (f"{lease_txt} | nodes finished {done}/{len(runs)} | origin served {_size(origin_bytes)}"
            f" of {_size(model_bytes)}")
    return text, f"{lease_key}|{done}"


def _start_nodes(opts: DemoOptions, root: Path, logs: Path, env: dict[str, str]) -> list[NodeRun]:
    uri = f"hf://{REPO_ID}"
    runs = []
    for i in range(opts.nodes):
        node = f"node-{i}"
        log = logs / f"{node}.log"
        args = [sys.executable, "-m", "modelherd.agent.cli", "pull", uri, "--models-root", str(root),
                "--coordination", "file", "--storage-mode", "shared", "--node-name", node,
                "--lease-duration", "10", "--renew-period", "0.5", "--no-progress", "--log-level", "INFO"]
        with open(log, "w") as err:
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                    env=env, cwd=root.parent)
        runs.append(NodeRun(node, proc, log))
    return runs


def _collect(run: NodeRun) -> None:
    """Wait for ``run``'s process and parse the Ready line it printed last (if any)."""
    out, _ = run.proc.communicate()
    run.returncode = run.proc.returncode
    for line in reversed(out.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("status") == "Ready":
            run.ready = doc
        break


def _stop_all(runs: list[NodeRun]) -> None:
    for r in runs:
        if r.proc.poll() is None:
            r.proc.terminate()
    for r in runs:
        try:
            r.proc.wait(10)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def run_demo(opts: DemoOptions, *, out: IO[str] = sys.stdout, cancel: threading.Event | None = None,
             on_started: Callable[[Path], None] | None = None) -> DemoResult:
    """Run the demo (see the module docstring); prints the live view and the summary on ``out``.

    The temporary folder is removed unless ``opts.keep`` or the result is not ``ok``. ``cancel`` (SIGINT/SIGTERM)
    stops every node process and ends the demo with what it has.
    """
    from ..storage.verify import verify_deep
    from ..testing.hubserver import HubServer
    from ..testing.models import make_llama_model

    if opts.nodes < 1:
        raise ModelherdError("--nodes must be at least 1", hint="e.g. modelherd demo --nodes 4")
    started = time.monotonic()
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="modelherd-demo-", dir=opts.workdir))
    if on_started is not None:
        on_started(workdir)
    origin, root, logs = workdir / "origin" / "tiny-llama", workdir / "shared", workdir / "logs"
    root.mkdir()
    logs.mkdir()
    model = make_llama_model(origin, total_bytes=opts.size_bytes, shards=opts.shards, seed=opts.seed)
    print(f"model: {len(model.files)} files, {_size(model.total_bytes)} ({opts.shards} safetensors shards, "
          f"hidden size {model.hidden_size}) generated in {workdir}", file=out, flush=True)
    dest = root / REPO_ID
    result = DemoResult(workdir=workdir, root=root, dest=dest, model_bytes=model.total_bytes,
                        model_files=len(model.files), origin_bytes=0)
    runs: list[NodeRun] = []
    with HubServer() as hub:
        hub.add_repo(REPO_ID, origin)
        if opts.origin_rate > 0:
            hub.throttle("any", bytes_per_s=opts.origin_rate)
        print(f"origin: loopback Hugging Face Hub at {hub.endpoint} serving hf://{REPO_ID}", file=out, flush=True)
        print(f"nodes: {opts.nodes} x `modelherd pull hf://{REPO_ID} --coordination file --storage-mode shared "
              f"--models-root {root}`", file=out, flush=True)
        env = child_env(dict(os.environ), hub.endpoint, workdir)
        view = _LiveView(out)
        try:
            runs = _start_nodes(opts, root, logs, env)
            deadline = time.monotonic() + opts.timeout_s
            while any(r.proc.poll() is None for r in runs):
                if (cancel is not None and cancel.is_set()) or time.monotonic() > deadline:
                    result.problems.append("cancelled" if cancel is not None and cancel.is_set()
                                           else f"the nodes did not finish within {opts.timeout_s:.0f}s")
                    _stop_all(runs)
                    break
                view.show(*_status_line(root, runs, hub.bytes_served, model.total_bytes))
                time.sleep(opts.interval_s)
            view.show(*_status_line(root, runs, hub.bytes_served, model.total_bytes))
            view.end()
        finally:
            _stop_all(runs)
        for r in runs:
            _collect(r)
        result.origin_bytes = hub.bytes_served
    result.nodes = runs
    _check_result(result, verify_deep)
    result.seconds = time.monotonic() - started
    _print_summary(result, out)
    if result.ok and not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    elif result.ok:
        print(f"kept {workdir} (--keep): models root {root}, node logs {logs}", file=out, flush=True)
    return result


def _check_result(result: DemoResult, verify_deep: Callable[..., list[Any]]) -> None:
    """Deep verification of the published model (manifest required) and what staging was left behind."""
    if result.dest.is_dir():
        result.problems.extend(str(p) for p in verify_deep(result.dest, require_manifest=True))
    else:
        result.problems.append(f"{result.dest} was never published")
    staging = result.root / ".modelherd-staging"
    if staging.is_dir():
        result.staging_left = sorted(p.name for p in staging.iterdir())


def _print_summary(result: DemoResult, out: IO[str]) -> None:
    def say(line: str) -> None:
        print(line, file=out, flush=True)

    say("")
    for r in result.nodes:
        secs = f"{r.ready['seconds']:.1f}s" if r.ready and "seconds" in r.ready else "-"
        state = "Ready" if r.ready is not None and r.returncode == 0 else f"exit {r.returncode}"
        say(f"  {r.node:<8} {state:<8} {r.role:<9} {secs}")
    holders = [r.node for r in result.nodes if r.role == "holder"]
    one = "one origin download" if result.origin_bytes <= result.model_bytes else "MORE than one origin download"
    say(f"origin bytes served: {_size(result.origin_bytes)} for a {_size(result.model_bytes)} model = "
        f"{result.ratio:.2f} x the model ({one}; downloaded by {', '.join(holders) or 'nobody'})")
    say(f"nodes Ready: {result.ready_nodes}/{len(result.nodes)}")
    if result.problems:
        say(f"verify --deep: {len(result.problems)} problem(s)")
        for p in result.problems:
            say(f"  {p}")
    else:
        say(f"verify --deep: OK ({result.model_files} files, every checksum recomputed, manifest present)")
    if result.staging_left:
        say(f"staging left behind: {', '.join(result.staging_left)}")
    say(f"demo {'OK' if result.ok else 'FAILED'} in {result.seconds:.1f}s")
    if result.ok:
        say("the real thing: modelherd pull hf://ORG/MODEL --models-root ./models")
    else:
        say(f"kept {result.workdir} for its logs ({result.workdir / 'logs'})")
