"""The ``modelherd`` command.

Exit codes (stable, documented in the README):
  0 success · 1 unexpected error · 2 bad usage, settings, URI or models root · 3 the source refused or failed
  4 an unsafe path or a refused --dest · 5 verification failed · 6 not enough disk space
  7 another pull owns the staging folder · 130 cancelled (SIGINT/SIGTERM)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from . import startup

if TYPE_CHECKING:
    from .settings import Settings

# Nothing heavy is imported at module level: main() pauses the garbage collector first (see startup.py).

log = logging.getLogger("modelherd")

EXIT_UNEXPECTED = 1
EXIT_USAGE = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="default INFO")
    p.add_argument("--log-format", choices=["text", "json"], help="default text")


def _add_kube(p: argparse.ArgumentParser, *, namespace_help: str) -> None:
    p.add_argument("--namespace", help=namespace_help)
    p.add_argument("--kubeconfig", type=Path, help="kubeconfig (default KUBECONFIG, else in-cluster)")


def _add_transfer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-root-dir", "--models-root", dest="models_root_dir", type=Path,
                   help="models root (env MODELHERD_MODELS_ROOT_DIR; default /mnt/models)")
    p.add_argument("--concurrency", type=int, help="files downloaded in parallel (default 4)")
    p.add_argument("--multipart-concurrency", type=int, help="ranged parts per large file (default 4)")
    p.add_argument("--download-retry", type=int, help="retries per request (default 5)")
    p.add_argument("--storage-mode", choices=["auto", "shared", "local"], help="override filesystem detection")
    p.add_argument("--direct-io", choices=["auto", "on", "off"],
                   help="write with O_DIRECT (default auto: on for node-local filesystems, off for shared ones)")
    p.add_argument("--registry-auth-file", type=Path, metavar="FILE",
                   help="docker config JSON with registry credentials (default REGISTRY_AUTH_FILE, else "
                        "$DOCKER_CONFIG/config.json, else ~/.docker/config.json)")
    p.add_argument("--insecure-registry", dest="insecure_registries", action="append", metavar="HOST[:PORT]",
                   help="a registry that may be spoken to in plain HTTP (repeatable; `pull` may use loopback "
                        "unlisted, the agent's CRs only when listed)")
    p.add_argument("--registry-mirror", dest="registry_mirrors", action="append", metavar="REGISTRY=MIRROR",
                   help="ask MIRROR (host[:port][/prefix], e.g. a Harbor proxy cache) before REGISTRY (repeatable)")
    p.add_argument("--http-insecure-host", dest="http_insecure_hosts", action="append", metavar="HOST[:PORT]",
                   help="a host whose http:// model folders may be fetched in plain HTTP (repeatable; `pull` may "
                        "use loopback unlisted, the agent's CRs only when listed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelherd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="download a model, verified, into the models root")
    pull.add_argument("uri", help="hf://ORG/MODEL[@REV], oci://n/NS/b/BUCKET/o/PREFIX, "
                                  "oci://REGISTRY/REPO:TAG (or @sha256:DIGEST), https://HOST/PATH/ (a folder with "
                                  "a SHA256SUMS), local:///PATH")
    pull.add_argument("--dest", type=Path, help="destination folder (default <models-root>/<org>/<model>)")
    pull.add_argument("--allow", action="append", default=None, metavar="GLOB", help="only files matching")
    pull.add_argument("--ignore", action="append", default=None, metavar="GLOB", help="skip files matching")
    pull.add_argument("--gpu-shape", default="auto",
                      help="TensorRT-LLM engines: 'auto' (NVML, then instance type), 'none', or e.g. H200x8")
    pull.add_argument("--coordination", choices=["auto", "kubernetes", "file", "none"])
    pull.add_argument("--node-name", help="holder identity (default NODE_NAME, else hostname)")
    pull.add_argument("--namespace", help="namespace for Leases (default: the pod's, else ome, as the agents)")
    pull.add_argument("--kubeconfig", type=Path, help="kubeconfig (default KUBECONFIG, else in-cluster)")
    pull.add_argument("--lease-duration", dest="lease_duration_s", type=float, help="seconds (default 30)")
    pull.add_argument("--renew-period", dest="lease_renew_period_s", type=float, help="seconds (default 10)")
    pull.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_transfer(pull)
    _add_common(pull)

    verify = sub.add_parser("verify", help="check a model folder; exit 0 when valid")
    verify.add_argument("dir", type=Path)
    verify.add_argument("--deep", action="store_true", help="recompute every checksum")
    _add_common(verify)

    detect = sub.add_parser("detect", help="print the filesystem kind of PATH and this node's GPU shape")
    detect.add_argument("path", type=Path)
    detect.add_argument("--storage-mode", choices=["auto", "shared", "local"])
    detect.add_argument("--instance-type", help="node instance type (GPU-shape fallback)")
    detect.add_argument("--instance-type-map", help="OME INSTANCE_TYPE_MAP: a JSON file or the JSON object")
    _add_common(detect)

    agent = sub.add_parser("agent", help="run the node agent (a DaemonSet pod per node) until SIGTERM")
    agent.add_argument("--node-name", help="this node (default env NODE_NAME; required)")
    _add_kube(agent, namespace_help="namespace of the status ConfigMaps and Leases (default: the pod's, else ome)")
    agent.add_argument("--port", type=int, help="HTTP port for /healthz /livez /readyz /metrics (default 8080)")
    agent.add_argument("--bind-address", help="address the HTTP server listens on (default 0.0.0.0)")
    agent.add_argument("--num-download-worker", type=int, help="models worked on in parallel (default 5)")
    agent.add_argument("--node-label-retry", type=int, help="attempts per node-label write (default 5)")
    agent.add_argument("--coordination", choices=["auto", "kubernetes", "file", "none"])
    agent.add_argument("--lease-duration", dest="lease_duration_s", type=float, help="seconds (default 30)")
    agent.add_argument("--renew-period", dest="lease_renew_period_s", type=float, help="seconds (default 10)")
    agent.add_argument("--startup-jitter", dest="startup_jitter_s", type=float,
                       help="seconds models needing origin work wait after start (default 10)")
    agent.add_argument("--model-retry-max", dest="model_retry_max_s", type=float,
                       help="cap of the back-off between retries of a failed model, seconds (default 600)")
    agent.add_argument("--verify-interval", dest="verify_interval_s", metavar="DURATION",
                       help="quick verification of every Ready model, e.g. 30s, 10m (default 10m; 0 = off)")
    agent.add_argument("--deep-verify-interval", dest="deep_verify_interval_s", metavar="DURATION",
                       help="recompute every checksum this often (default 168h; 0 = off)")
    agent.add_argument("--verify-max-mbps", dest="verify_max_mbps", type=float, metavar="MB/S",
                       help="deep verification reads at most this many MB/s (default 100; 0 = no limit)")
    _add_transfer(agent)
    _add_common(agent)

    explain = sub.add_parser("explain", help="for every model: is this node selected, and why not; dest; status")
    explain.add_argument("--node", dest="node_name", help="the node to explain for (default NODE_NAME)")
    _add_kube(explain, namespace_help="namespace of the status ConfigMaps (default: the pod's, else ome)")
    explain.add_argument("--models-root-dir", "--models-root", dest="models_root_dir", type=Path)
    explain.add_argument("-o", "--output", choices=["text", "json"], default="text")
    _add_common(explain)

    status = sub.add_parser("status", help="the cluster view: per model, nodes Ready/Updating/Failed and its Lease")
    _add_kube(status, namespace_help="namespace of the status ConfigMaps and Leases (default: the pod's, else ome)")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    _add_common(status)

    ctl = sub.add_parser("controller", help="run the status controller for clusters without OME's (one leader)")
    _add_kube(ctl, namespace_help="namespace of the status ConfigMaps and the leader Lease (default: the pod's, "
                                  "else ome)")
    ctl.add_argument("--port", dest="controller_port", type=int, metavar="PORT",
                     help="HTTP port for /healthz /livez /readyz /metrics (default 8081)")
    ctl.add_argument("--bind-address", help="address the HTTP server listens on (default 0.0.0.0)")
    ctl.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=None,
                     help="elect one active replica with the Lease modelherd-controller (default on)")
    ctl.add_argument("--leader-elect-lease-duration", dest="leader_elect_lease_duration_s", metavar="DURATION",
                     help="how long standbys wait for a silent leader (default 15s)")
    ctl.add_argument("--leader-elect-renew-deadline", dest="leader_elect_renew_deadline_s", metavar="DURATION",
                     help="the leader gives up when it could not renew for this long (default 10s)")
    ctl.add_argument("--leader-elect-retry-period", dest="leader_elect_retry_period_s", metavar="DURATION",
                     help="interval of renewals and of acquisition attempts (default 2s)")
    _add_common(ctl)

    leases = sub.add_parser("leases", help="list modelherd Leases: who downloads what, how far")
    leases.add_argument("--namespace", help="namespace of the Leases (default: the pod's, else ome)")
    leases.add_argument("--kubeconfig", type=Path)
    leases.add_argument("--models-root-dir", "--models-root", dest="models_root_dir", type=Path,
                        help="for file leases (clusters without Kubernetes)")
    leases.add_argument("--file", action="store_true", help="list the lease files under the models root")
    _add_common(leases)

    demo = sub.add_parser("demo", help="offline: N nodes pull one generated model from a loopback Hub, one download")
    demo.add_argument("--nodes", type=int, default=4, help="pull processes, one per simulated node (default 4)")
    demo.add_argument("--size-mib", type=int, default=64, help="model size in MiB (default 64)")
    demo.add_argument("--shards", type=int, default=8, help="safetensors shards (default 8)")
    demo.add_argument("--origin-rate-mib", type=float, default=2.0,
                      help="MiB/s per origin connection, so the live view has time to show (0: unthrottled)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder (models root, node logs)")
    demo.add_argument("--workdir", type=Path, help="make the temporary folder under this folder (default TMPDIR)")
    _add_common(demo)
    return parser


_SETTING_FLAGS = ("models_root_dir", "concurrency", "multipart_concurrency", "download_retry", "storage_mode",
                  "direct_io", "registry_auth_file", "insecure_registries", "registry_mirrors", "http_insecure_hosts",
                  "coordination", "node_name", "namespace", "kubeconfig", "lease_duration_s",
                  "lease_renew_period_s", "instance_type", "instance_type_map", "log_level", "log_format",
                  "port", "bind_address", "num_download_worker", "node_label_retry", "startup_jitter_s",
                  "model_retry_max_s", "verify_interval_s", "deep_verify_interval_s", "verify_max_mbps",
                  "controller_port", "leader_elect", "leader_elect_lease_duration_s",
                  "leader_elect_renew_deadline_s", "leader_elect_retry_period_s")


def load_settings(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag the user gave (flags win)."""
    from .settings import Settings

    overrides = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k, None) is not None}
    return Settings(**overrides)  # init arguments outrank the environment in pydantic-settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the structured fields a call passed in
    ``extra`` (``model``, ``state``, ``reason``, ...)."""

    _STD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._STD and not k.startswith("_")})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _setup_logging(settings: Settings) -> None:
    """One stderr handler on the root logger in ``settings.log_format`` at ``settings.log_level``, with the
    :class:`~.logredact.RedactingFilter` on it and ``settings.hf_token``/``http_token`` registered as secrets."""
    import time as _time

    from . import logredact

    level, fmt = settings.log_level, settings.log_format
    for secret in (settings.hf_token, settings.http_token):
        if secret is not None:
            logredact.register_secret(secret.get_secret_value())
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = _time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    logredact.install(logging.getLogger().handlers)
    for noisy in ("urllib3", "kubernetes", "oci", "filelock", "httpx", "httpx2", "httpcore", "httpcore2",
                  "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def _install_cancel_handlers(cancel: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning("received signal %d; cancelling", signum)
        cancel.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    startup.pause()
    try:
        return _main(argv)
    finally:
        startup.resume()


def _main(argv: Sequence[str] | None) -> int:
    from pydantic import ValidationError

    from ..storage.errors import ModelherdError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as e:
        print(f"modelherd: invalid settings: {e}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(settings)
    from . import commands

    handlers: dict[str, Callable[[argparse.Namespace, Settings, threading.Event], int]] = {
        "pull": commands.cmd_pull,
        "verify": commands.cmd_verify,
        "detect": commands.cmd_detect,
        "leases": commands.cmd_leases,
        "agent": commands.cmd_agent,
        "explain": commands.cmd_explain,
        "status": commands.cmd_status,
        "controller": commands.cmd_controller,
        "demo": commands.cmd_demo,
    }
    cancel = threading.Event()
    _install_cancel_handlers(cancel)
    try:
        return handlers[args.command](args, settings, cancel)
    except ModelherdError as e:
        print(f"modelherd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # pragma: no cover - the last line of defence
        log.exception("unexpected error")
        print(f"modelherd: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
