"""The CLI's subcommands: each maps its arguments onto the layers below and prints the result (one JSON line,
a table, or a problem per line) with the exit code of the README.

What a subcommand shares with the agent is not decided here: how bytes move (engine options, retries, sources,
the GPU shape) is agent/transfer.py, the HF token agent/lifecycle/credentials.py, the namespace and node-name
rules agent/settings.py, the agent and the controller agent/runner.py and agent/controller/. Only what the
one-shot ``pull`` alone needs lives here: its destination under the models root, its ``--allow``/``--ignore``
selection, its progress bar and its Ready line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Never

from ..storage import fsdetect
from ..storage.destination import check_destination, ensure_writable, prepare_models_root
from ..storage.errors import ConfigError, ModelherdError, VerificationError
from ..storage.fsid import filesystem_id
from ..storage.manifest import Manifest
from ..storage.paths import quote_name
from ..storage.ready import published_model
from ..storage.types import ALL_FILES, Listing, Selection, Source
from ..storage.uri import ModelURI, parse_uri
from . import startup
from .settings import Settings, TransferSettings

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..coordination import LeaseApi
    from ..storage import verify
    from .kube import KubeClient

# The engine (through agent/transfer.py), the sources (huggingface_hub, oci) and coordination are imported only
# when a pull has to download or coordinate: the restart fast path stays cheap (32 nodes on one box).

log = logging.getLogger("modelherd.pull")


class _ProgressBar:
    """A tqdm bar fed from worker threads (tqdm's own lock keeps it consistent)."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self._bar: tqdm[Never] | None = None
        self._enabled = enabled
        self._desc = desc
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        bar = self._bar
        if bar is None:
            from tqdm import tqdm

            bar = self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self._desc,
                                   file=sys.stderr, mininterval=0.5)
        bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def cmd_pull(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    uri = parse_uri(args.uri)
    if uri.scheme == "local":
        from ..storage import verify

        problems = verify.verify_quick(Path(uri.path))
        return _report(problems, Path(uri.path))
    root = prepare_models_root(Path(settings.models_root_dir).expanduser().absolute())
    dest = Path(args.dest) if args.dest else root / uri.default_relpath()
    if not dest.is_absolute():
        dest = root / dest
    dest = check_destination(root, dest)  # the engine checks again before it publishes

    fs = fsdetect.detect_filesystem(root)
    storage_kind = fsdetect.resolve_storage_mode(settings.storage_mode, fs)
    log.info("models root %s: %s storage (%s)", root, storage_kind, fs.evidence)

    selection = requested_selection(uri, args.allow, args.ignore)
    started = time.monotonic()
    ready = published_model(dest, uri.canonical, uri.revision, selection)
    if ready is not None:
        log.info("%s is already Ready at %s (completion manifest + quick verification)", uri.canonical, dest)
        _print_ready(uri, ready, dest, settings, started, "ready")
        return 0
    ensure_writable(root)  # a read-only root still serves the models already published in it
    from . import transfer
    from .lifecycle.credentials import hf_token, http_token, registry_auth

    move = replace(settings.transfer, gpu_shape=args.gpu_shape)  # --gpu-shape is the pull's own flag
    ns = settings.cluster.namespace
    token = hf_token(None, namespace=ns, read_secret=None, ambient=move.hf_token) if uri.scheme == "hf" else None
    docker_config = registry_auth(None, namespace=ns, read_secret=None, ambient=move.registry_auth_file) \
        if uri.scheme == "oci-registry" else None
    bearer = http_token(None, namespace=ns, read_secret=None, ambient=move.http_token) \
        if uri.scheme in ("https", "http") else None
    source = transfer.open_model_source(uri, move, hf_token=token, trust_loopback=True, registry_auth=docker_config,
                                        http_token=bearer, allow=args.allow, ignore=args.ignore, cancel=cancel)
    del token, docker_config, bearer
    progress = _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty(), desc=uri.canonical)
    try:
        def listing_fn() -> Listing:
            return transfer.filter_for_shape(source.list_files(), move)
        manifest, extra = _pull(uri, source, listing_fn, dest, root, storage_kind, settings, move, cancel, progress,
                                selection)
    finally:
        progress.close()
        source.close()
    _print_ready(uri, manifest, dest, settings, started, str(extra.pop("role", "pulled")), **extra)
    return 0


def requested_selection(uri: ModelURI, allow: list[str] | None, ignore: list[str] | None) -> Selection:
    """The file selection of ``--allow``/``--ignore``; only Hugging Face sources apply one (a filter the source
    would silently ignore could never match the published model's identity, so it is refused)."""
    if allow is None and ignore is None:
        return ALL_FILES
    if uri.scheme != "hf":
        raise ConfigError(f"--allow/--ignore select files of hf:// models only, not of {uri.scheme}://",
                          hint="drop --allow/--ignore, or point the URI at the prefix you need")
    return Selection.of(allow, ignore)


def _print_ready(uri: ModelURI, manifest: Manifest, dest: Path, settings: Settings, started: float,
                 how: str, **extra: object) -> None:
    """One JSON line on stdout: what a script or a person needs to know about the Ready model."""
    print(json.dumps({"status": "Ready", "how": how, "uri": uri.canonical, "revision": manifest.revision,
                      "dest": str(dest), "files": len(manifest.files), "bytes": manifest.total_bytes,
                      "seconds": round(time.monotonic() - started, 3), "node": settings.node_name, **extra}),
          flush=True)


def _pull(uri: ModelURI, source: Source, listing_fn: Callable[[], Listing], dest: Path, root: Path,
          storage_kind: str, settings: Settings, move: TransferSettings, cancel: threading.Event,
          progress: Callable[[int, int], None], selection: Selection = ALL_FILES) -> tuple[Manifest, dict[str, object]]:
    """Download (or wait for) the model; returns the manifest and what to report about how."""
    from ..coordination import choose_backend, coordinated_pull
    from .transfer import engine_options

    startup.resume()  # the modules a pull needs are loaded; from here on the process may run for hours
    cluster, leases = settings.cluster, settings.leases
    backend = choose_backend(leases.mode, storage_kind, cluster.kubeconfig)
    result = coordinated_pull(
        backend=backend, uri=uri, source=source, listing_fn=listing_fn, dest=dest, models_root=root,
        options=engine_options(move, storage_kind), node_name=cluster.node_name, namespace=cluster.namespace,
        lease_api=_lease_api(_kube_api(settings)) if backend == "kubernetes" else None,
        lease_duration_s=leases.lease_duration_s, renew_period_s=leases.lease_renew_period_s,
        jitter_s=leases.wait_jitter_s, poll_interval_s=leases.poll_interval_s,
        cancel=cancel, progress=progress, selection=selection,
    )
    if backend == "none":
        return result.manifest, {"role": "pulled", "coordination": "none"}
    return result.manifest, {"coordination": backend, "role": result.role, "epoch": result.epoch,
                             "took_over": result.took_over, "lease_requests": result.lease_requests}


def _report(problems: list[verify.Problem], model_dir: Path) -> int:
    """One line per problem on stdout (names quoted when not plain: a file name cannot forge a line)."""
    for p in problems:
        print(p)
    if problems:
        print(f"modelherd: {quote_name(str(model_dir))}: {len(problems)} problem(s)", file=sys.stderr)
        return VerificationError.exit_code
    print(f"{quote_name(str(model_dir))}: OK")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    model_dir = Path(args.dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a directory", hint="pass the model folder")
    from ..storage import verify

    problems = verify.verify_deep(model_dir) if args.deep else verify.verify_quick(model_dir)
    return _report(problems, model_dir)


def cmd_detect(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .transfer import gpu_shape

    fs = fsdetect.detect_filesystem(Path(args.path))
    kind = fsdetect.resolve_storage_mode(settings.storage_mode, fs)
    shape = gpu_shape(settings.transfer)  # --instance-type / --instance-type-map are settings flags
    try:  # the id every node of this filesystem shares (read only: detect never writes)
        fs_id = filesystem_id(Path(args.path), create=False) or None
    except (OSError, ModelherdError):
        fs_id = None
    print(json.dumps({"path": str(args.path), "storage": kind, "filesystem_id": fs_id, "fstype": fs.fstype,
                      "magic": None if fs.magic is None else hex(fs.magic), "mountpoint": fs.mountpoint,
                      "evidence": fs.evidence, "gpu_shape": shape.name if shape else None}))
    return 0


def cmd_leases(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    """Kubernetes Leases (when a kubeconfig or in-cluster config is found), else the lease files of the
    models root; ``--file`` forces the latter."""
    from ..coordination import format_leases
    from ..coordination.pull import kubernetes_reachable

    if not args.file and kubernetes_reachable(settings.kubeconfig):
        from ..coordination.kubelease import list_leases

        rows = list_leases(_lease_api(_kube_api(settings)), settings.cluster.namespace)
    else:
        from ..coordination.filelease import list_file_leases
        from ..coordination.leaseviews import view_of

        rows = [view_of(r) for r in list_file_leases(Path(settings.models_root_dir))]
    print(format_leases(rows))
    return 0


# ------------------------------------------------------------------------------------------- the cluster
def _kube_api(settings: Settings) -> KubeClient:
    """The process's one API client (credentials from ``--kubeconfig``, else in-cluster, else KUBECONFIG)."""
    from .kube import load

    return load(settings.kubeconfig)


def _lease_api(api: KubeClient) -> LeaseApi:
    """Coordination's Lease store over the process's one client (no second pool, no second credential load)."""
    from .kube.leases import KubeLeases

    return KubeLeases(api)


def cmd_agent(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    settings = settings.model_copy(update={"node_name": settings.named_node()})
    from .runner import NodeAgent

    startup.resume()  # a long-running process: the garbage collector runs as usual from here on
    agent = NodeAgent(settings, _kube_api(settings))
    return agent.run(cancel)


def cmd_explain(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .basemodels import SpecPolicy
    from .views import explain, format_explain

    node = settings.named_node()
    rows = explain(_kube_api(settings), node_name=node, namespace=settings.cluster.namespace,
                   models_root=Path(settings.models_root_dir), storage_mode=settings.storage_mode,
                   policy=SpecPolicy.from_settings(settings.tenancy))
    if args.output == "json":
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_explain(rows, node))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .views import cluster_status, format_status

    rows = cluster_status(_kube_api(settings), namespace=settings.cluster.namespace)
    if args.output == "json":
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_status(rows))
    return 0


def cmd_controller(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .controller.controller import ModelController

    startup.resume()  # a long-running process
    controller = ModelController(_kube_api(settings), settings.controller, settings.cluster)
    return controller.run(cancel)


def cmd_demo(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    """``modelherd demo``: exit 0 only when the demo showed one download, every node Ready and verified."""
    from .demo import DemoError, DemoOptions, run_demo

    if args.nodes < 1 or args.size_mib < 1 or args.shards < 1 or args.origin_rate_mib < 0:
        raise ConfigError("--nodes, --size-mib and --shards must be at least 1, --origin-rate-mib at least 0",
                          hint="e.g. modelherd demo --nodes 4")
    startup.resume()
    result = run_demo(DemoOptions(nodes=args.nodes, size_bytes=args.size_mib * 1024 * 1024, shards=args.shards,
                                  origin_rate=args.origin_rate_mib * 1024 * 1024, keep=args.keep,
                                  workdir=args.workdir), cancel=cancel)
    if cancel.is_set():
        return 130
    if not result.ok:
        raise DemoError("the demo did not end with one download and every node Ready and verified",
                        hint=f"read the node logs in {result.workdir / 'logs'}")
    return 0
