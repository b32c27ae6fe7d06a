"""The CLI's subcommands: thin glue from settings to the storage and coordination layers."""

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
from .settings import Settings

if TYPE_CHECKING:
    from tqdm import tqdm

    from ..storage import engine, gpu, verify
    from ..storage.retry import RetryPolicy

# The engine, the sources (huggingface_hub, oci) and coordination (kubernetes) are imported only when a
# pull has to download or coordinate: the restart fast path stays cheap (32 nodes on one box).

log = logging.getLogger("modelherd.pull")


def engine_options(settings: Settings, storage_kind: str) -> engine.EngineOptions:
    """The engine's knobs from the settings. ``direct_io=auto`` follows the storage mode in force (the
    operator's ``--storage-mode`` included): ``O_DIRECT`` on local storage, the page cache on shared storage."""
    from ..storage import engine

    direct_io = settings.direct_io
    if direct_io == "auto":
        direct_io = "on" if storage_kind == "local" else "off"

    return engine.EngineOptions(
        concurrency=settings.concurrency,
        multipart_concurrency=settings.multipart_concurrency,
        multipart_threshold=settings.multipart_threshold,
        part_size=settings.part_size,
        retry=retry_policy(settings),
        fsync=settings.fsync,
        direct_io=direct_io,
    )


def retry_policy(settings: Settings) -> RetryPolicy:
    from ..storage.retry import RetryPolicy

    return RetryPolicy(retries=settings.download_retry, backoff_s=settings.retry_backoff_s,
                       backoff_max_s=settings.retry_backoff_max_s, retry_after_max_s=settings.retry_after_max_s)


def make_source(uri: ModelURI, settings: Settings, *, allow: list[str] | None = None,
                ignore: list[str] | None = None, cancel: threading.Event | None = None) -> Source:
    """The source of ``uri``; ``cancel`` ends its own back-offs (the listing's) at once."""
    from ..storage.sources import open_source

    return open_source(
        uri,
        hf_token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        hf_endpoint=settings.hf_endpoint,
        allow_patterns=allow,
        ignore_patterns=ignore,
        oci_auth=settings.oci_auth,
        oci_config_file=str(settings.oci_config_file),
        oci_profile=settings.oci_profile,
        oci_region=settings.oci_region,
        oci_endpoint=settings.oci_endpoint,
        retry=retry_policy(settings),
        pool_maxsize=max(32, settings.concurrency * settings.multipart_concurrency),
        cancel=cancel,
    )


def resolve_gpu_shape(spec: str, settings: Settings) -> gpu.GpuShape | None:
    """``auto``: NVML, then the instance-type map; ``none``: no filtering; else a literal shape."""
    from ..storage import gpu

    if spec == "none":
        return None
    if spec != "auto":
        return gpu.parse_shape(spec)
    type_map = gpu.load_instance_type_map(settings.instance_type_map) if settings.instance_type_map else None
    return gpu.detect_gpu_shape(instance_type=settings.instance_type, instance_type_map=type_map)


def filter_for_shape(listing: Listing, spec: str, settings: Settings) -> Listing:
    """Keep only the TensorRT-LLM engines for this node's GPU shape (no-op for other layouts)."""
    from ..storage import gpu

    paths = [f.path for f in listing.files]
    if not gpu.is_trtllm_layout(paths):
        return listing
    shape = resolve_gpu_shape(spec, settings)
    if shape is None:
        if spec == "none":
            return listing
        raise ConfigError("this model has per-GPU-shape TensorRT-LLM engines but no GPU shape could be detected",
                          hint="pass --gpu-shape H200x8 (or set the node's instance type), or --gpu-shape none")
    kept = gpu.trtllm_filter(list(listing.files), shape)
    log.info("TensorRT-LLM layout: keeping %d of %d files for GPU shape %s", len(kept), len(listing.files),
             shape.name)
    return replace(listing, files=tuple(kept))


class _Progress:
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
    source = make_source(uri, settings, allow=args.allow, ignore=args.ignore, cancel=cancel)
    progress = _Progress(enabled=not args.no_progress and sys.stderr.isatty(), desc=uri.canonical)
    try:
        def listing_fn() -> Listing:
            return filter_for_shape(source.list_files(), args.gpu_shape, settings)
        manifest, extra = _pull(uri, source, listing_fn, dest, root, storage_kind, settings, cancel, progress,
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
          storage_kind: str, settings: Settings, cancel: threading.Event,
          progress: Callable[[int, int], None], selection: Selection = ALL_FILES) -> tuple[Manifest, dict[str, object]]:
    """Download (or wait for) the model; returns the manifest and what to report about how."""
    from ..coordination import PullResult, choose_backend, coordinated_pull
    from ..storage import engine

    startup.resume()  # the modules a pull needs are loaded; from here on the process may run for hours
    backend = choose_backend(settings.coordination, storage_kind, settings.kubeconfig)
    if backend == "none":
        listing = listing_fn()
        manifest = engine.pull(source, listing, dest, models_root=root, options=engine_options(settings, storage_kind),
                               writer=settings.node_name, cancel=cancel, progress=progress)
        return manifest, {"role": "pulled", "coordination": "none"}
    results: list[PullResult] = []
    manifest = coordinated_pull(
        backend=backend, uri=uri, source=source, listing_fn=listing_fn, dest=dest, models_root=root,
        options=engine_options(settings, storage_kind), node_name=settings.node_name,
        namespace=settings.effective_namespace(), kubeconfig=settings.kubeconfig,
        lease_duration_s=settings.lease_duration_s, renew_period_s=settings.lease_renew_period_s,
        jitter_s=settings.wait_jitter_s, poll_interval_s=settings.poll_interval_s,
        cancel=cancel, progress=progress, result=results, selection=selection,
    )
    extra: dict[str, object] = {"coordination": backend}
    if results:
        r = results[0]
        extra.update(role=r.role, epoch=r.epoch, took_over=r.took_over, lease_requests=r.lease_requests)
    return manifest, extra


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
    fs = fsdetect.detect_filesystem(Path(args.path))
    kind = fsdetect.resolve_storage_mode(settings.storage_mode, fs)
    if args.instance_type:
        settings = settings.model_copy(update={"instance_type": args.instance_type})
    if args.instance_type_map:
        settings = settings.model_copy(update={"instance_type_map": args.instance_type_map})
    shape = resolve_gpu_shape(settings.gpu_shape, settings)
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
    from ..coordination.choose import kubernetes_reachable

    if not args.file and kubernetes_reachable(settings.kubeconfig):
        from ..coordination import kube

        rows = kube.list_leases(kube.api_client(settings.kubeconfig), settings.effective_namespace())
    else:
        from ..coordination.filelease import list_file_leases
        from ..coordination.views import view_of

        rows = [view_of(r) for r in list_file_leases(Path(settings.models_root_dir))]
    print(format_leases(rows))
    return 0


# ------------------------------------------------------------------------------------------- the node agent
def _node_name_for_agent(args: argparse.Namespace) -> str:
    import os

    name = getattr(args, "node_name", None) or os.environ.get("MODELHERD_NODE_NAME") or os.environ.get("NODE_NAME")
    if not name or not name.strip():
        raise ConfigError("no node name: the agent must know which node it runs on",
                          hint="set NODE_NAME from the downward API (spec.nodeName), or pass --node-name")
    return name.strip()


def _kube_api(settings: Settings) -> object:
    from .kubeclient import load

    return load(settings.kubeconfig)


def cmd_agent(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    node = _node_name_for_agent(args)
    settings = settings.model_copy(update={"node_name": node})
    from .runner import NodeAgent

    startup.resume()  # a long-running process: the garbage collector runs as usual from here on
    agent = NodeAgent(settings, _kube_api(settings), node_name=node)
    return agent.run(cancel)


def cmd_explain(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .models import SpecPolicy
    from .views import explain, format_explain

    node = _node_name_for_agent(args)
    rows = explain(_kube_api(settings), node_name=node, namespace=settings.effective_namespace("ome"),
                   models_root=Path(settings.models_root_dir), storage_mode=settings.storage_mode,
                   policy=SpecPolicy.from_settings(settings))
    if args.output == "json":
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_explain(rows, node))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .views import cluster_status, format_status

    rows = cluster_status(_kube_api(settings), namespace=settings.effective_namespace("ome"))
    if args.output == "json":
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_status(rows))
    return 0


def cmd_controller(args: argparse.Namespace, settings: Settings, cancel: threading.Event) -> int:
    from .controller.controller import ModelController

    startup.resume()  # a long-running process
    controller = ModelController(
        _kube_api(settings), namespace=settings.effective_namespace("ome"), port=settings.controller_port,
        bind_address=settings.bind_address, leader_elect=settings.leader_elect,
        lease_duration_s=settings.leader_elect_lease_duration_s,
        renew_deadline_s=settings.leader_elect_renew_deadline_s,
        retry_period_s=settings.leader_elect_retry_period_s, watch_timeout_s=settings.watch_timeout_s)
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
