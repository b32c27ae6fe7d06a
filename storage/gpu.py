"""GPU shape of this node (``H200x8``) and the TensorRT-LLM file filter that uses it.

Normalisation of GPU model names (from ``nvmlDeviceGetName`` or folder names), one rule for both:
- drop vendor/brand words (``NVIDIA``, ``Tesla``, ``GeForce``), form factors that are the default for the
  family (``SXM``, ``SXM4``, ``SXM5``), memory kinds and sizes (``HBM3``, ``80GB``, ``80G``) and MIG profile
  words; keep the family token upper-cased (``H100``, ``A100``, ``L40S``, ``GH200``);
- keep the form factors that change the part: ``PCIe`` and ``NVL`` as a suffix: ``"NVIDIA H100 PCIe"`` →
  ``H100-PCIe``, ``"NVIDIA H100 NVL"`` → ``H100-NVL``, ``"NVIDIA H100 80GB HBM3"`` → ``H100``,
  ``"NVIDIA A100-SXM4-80GB"`` → ``A100``, ``"NVIDIA A100 80GB PCIe"`` → ``A100-PCIe``;
- so memory size does not distinguish shapes (OME's ``A100-80G`` and ``A100-40G`` both read as ``A100``).

Shape names are ``<model>x<count>``; a count of 0 means "unknown" (an instance-type map entry without a
count) and the name is then the model alone. Folder names are matched in the spellings found in the wild:
``H100x8``, ``h100_8``, ``h100-x8``, ``8xH100``, ``H100-PCIe-x8``, ``A100-80G`` (model only: any count).

Decisions:
- MIG: a MIG-enabled GPU counts as one physical GPU of its model (NVML's device index enumerates physical
  GPUs); a warning is logged, since an engine built for whole GPUs may not fit the slices;
- mixed GPU models on one node: :class:`~.errors.ConfigError`. Picking the majority could hand a TRT-LLM
  rank an engine built for another GPU; the operator must say which shape to use.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .types import RemoteFile

log = logging.getLogger("modelherd.storage.gpu")

# Families recognised in folder names (NVML names are normalised whatever the family).
KNOWN_FAMILIES = frozenset({
    "T4", "V100", "P100", "A2", "A10", "A10G", "A16", "A30", "A40", "A100", "A800", "A6000",
    "L4", "L20", "L40", "L40S", "H20", "H100", "H200", "H800", "GH200", "B100", "B200", "B300", "GB200", "GB300",
})
_VARIANTS = {"pcie": "PCIe", "nvl": "NVL"}
_BRAND = {"nvidia", "tesla", "geforce"}
_IGNORED = re.compile(r"^(sxm\d*|hbm\d*e?|\d+(gb|g)|mig|\d+g\.\d+gb|\d+c\.\d+g\.\d+gb)$")
_FAMILY = re.compile(r"^[a-z]{1,3}\d{1,4}[a-z]?$")
MAX_COUNT = 128


def _tokens(name: str, *, lower: bool = True) -> list[str]:
    return [t.lower() if lower else t for t in re.split(r"[\s_\-]+", name.strip()) if t]


def normalize_gpu_model(name: str | bytes) -> str:
    """Canonical model name for an NVML device name (see the module docstring for the rule)."""
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    family, variant, rest = "", "", []
    for word in _tokens(name, lower=False):
        t = word.lower()
        if t in _BRAND or _IGNORED.match(t):
            continue
        if t in _VARIANTS:
            variant = _VARIANTS[t]
        elif not family and _FAMILY.match(t):
            family = t.upper()
        else:
            rest.append(word)
    if not family:  # e.g. "RTX 6000 Ada Generation": keep every word as NVML spells it
        family = "-".join(rest) or "UNKNOWN"
    return f"{family}-{variant}" if variant else family


@dataclass(frozen=True)
class GpuShape:
    """``count`` GPUs of ``model`` (a normalised name); ``count == 0`` means the count is unknown."""

    model: str
    count: int

    @property
    def name(self) -> str:
        return f"{self.model}x{self.count}" if self.count else self.model

    def matches(self, other: GpuShape) -> bool:
        """Same model, and the same count unless either count is unknown."""
        return self.model.lower() == other.model.lower() and (
            not self.count or not other.count or self.count == other.count)

    def __str__(self) -> str:
        return self.name


def _strict_model(text: str) -> str | None:
    """A folder-name model part → normalised model, or ``None`` unless it is a known family."""
    family, variant = "", ""
    for t in _tokens(text.replace(".", "-")):
        if t in _VARIANTS and not variant:
            variant = _VARIANTS[t]
        elif t.upper() in KNOWN_FAMILIES and not family:
            family = t.upper()
        elif not _IGNORED.match(t):
            return None
    if not family:
        return None
    return f"{family}-{variant}" if variant else family


def parse_shape(text: str) -> GpuShape | None:
    """Read a folder name (or map value) as a GPU shape; ``None`` if it does not look like one."""
    s = text.strip().lower()
    candidates: list[tuple[str, int]] = [(s, 0)]
    for pat, mi, ci in ((r"(\d+)x[-_]?(.+)", 2, 1), (r"(.+?)[-_]?x[-_]?(\d+)", 1, 2), (r"(.+?)[-_](\d+)", 1, 2)):
        m = re.fullmatch(pat, s)
        if m and 1 <= int(m.group(ci)) <= MAX_COUNT:
            candidates.insert(0, (m.group(mi), int(m.group(ci))))
            break
    for model_text, count in candidates:
        model = _strict_model(model_text)
        if model:
            return GpuShape(model, count)
    return None


# ---- NVML ----------------------------------------------------------------------------------------------


class NvmlReplay:
    """A recorded NVML reading (the format of ``tests/data/nvml-h200.json``) behind pynvml's call shapes.

    Lets the real detection code path run without a GPU (tests, ``modelherd detect`` dry runs).
    """

    class NVMLError(Exception):
        pass

    def __init__(self, reading: dict[str, Any]) -> None:
        self.devices: list[dict[str, Any]] = list(reading.get("devices", []))
        self.initialised = False

    @classmethod
    def from_file(cls, path: Path) -> NvmlReplay:
        return cls(json.loads(Path(path).read_text()))

    def nvmlInit(self) -> None:  # pynvml's names
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def _need_init(self) -> None:
        if not self.initialised:
            raise self.NVMLError("Uninitialized")

    def nvmlDeviceGetCount(self) -> int:
        self._need_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._need_init()
        if not 0 <= i < len(self.devices):
            raise self.NVMLError("Invalid Argument")
        return i

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self.devices[handle]["name"])

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        mode = self.devices[handle].get("mig_mode")
        if mode is None:
            raise self.NVMLError("Not Supported")
        return list(mode)


def shape_from_nvml(nvml: Any) -> GpuShape | None:
    """The node's shape read through a pynvml-shaped module; ``None`` when it has no GPU.

    Raises the module's ``NVMLError`` when NVML is unusable, ``ConfigError`` for mixed GPU models.
    """
    nvml.nvmlInit()
    try:
        names: list[str] = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            names.append(normalize_gpu_model(nvml.nvmlDeviceGetName(h)))
            try:
                if nvml.nvmlDeviceGetMigMode(h)[0]:
                    log.warning("GPU %d (%s) has MIG enabled; counted as one whole GPU", i, names[-1])
            except Exception:  # MIG mode is optional information (NotSupported on many GPUs)
                pass
    finally:
        nvml.nvmlShutdown()
    if not names:
        return None
    models = Counter(names)
    if len(models) > 1:
        raise ConfigError(f"mixed GPU models on this node: {dict(models)}",
                          hint="set the GPU shape explicitly (instance-type map) for this node")
    return GpuShape(names[0], len(names))


# ---- instance-type map (OME's INSTANCE_TYPE_MAP format: {"BM.GPU.H100.8": "H100", ...}) -------------------


def load_instance_type_map(path: Path | str) -> dict[str, str]:
    """Read a JSON object mapping instance types to GPU names (OME's ``INSTANCE_TYPE_MAP`` format).

    ``path`` is a file, or — as OME's chart passes it, from a ConfigMap key into the environment — the JSON
    object itself (text starting with ``{``).
    """
    if str(path).lstrip().startswith("{"):
        text = str(path)
        path = "(INSTANCE_TYPE_MAP)"
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the instance-type map {path}: {e.strerror}",
                              hint="mount the ConfigMap or fix the instance type map path") from e
    if not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"instance-type map {path} is not JSON: {e}",
                          hint='write a JSON object like {"BM.GPU.H100.8": "H100"}') from e
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise ConfigError(f"instance-type map {path} must map instance types to GPU names (strings)",
                          hint='write a JSON object like {"BM.GPU.H100.8": "H100"}')
    return doc


_COUNT_IN_TYPE = (re.compile(r"\.(\d+)$"), re.compile(r"(?:^|[-_.])(\d+)x(?!large)"), re.compile(r"-(\d+)g$"))


def shape_from_instance_type(instance_type: str, mapping: dict[str, str]) -> GpuShape | None:
    """The shape an instance type maps to. The map value names the model and may carry a count
    (``H100x8``); otherwise the count is read from the instance type when it spells one (``BM.GPU.H100.8``,
    ``gd-8xh100ib-i128``, ``a3-highgpu-8g``), else it is 0 (unknown)."""
    value = mapping.get(instance_type)
    if not value:
        return None
    parsed = parse_shape(value) or GpuShape(normalize_gpu_model(value), 0)
    if parsed.count:
        return parsed
    for pat in _COUNT_IN_TYPE:
        m = pat.search(instance_type.lower())
        if m and 1 <= int(m.group(1)) <= MAX_COUNT:
            return GpuShape(parsed.model, int(m.group(1)))
    return parsed


def detect_gpu_shape(*, nvml: Any = None, instance_type: str = "",
                     instance_type_map: dict[str, str] | None = None) -> GpuShape | None:
    """This node's GPU shape: NVML first (``pynvml`` unless ``nvml`` is given), then the instance-type map.

    ``None`` when neither says. Logs which source decided.
    """
    if nvml is None:
        try:
            import pynvml

            nvml = pynvml
        except ImportError:
            log.info("pynvml not installed; using the instance-type map")
    if nvml is not None:
        try:
            shape = shape_from_nvml(nvml)
        except ConfigError:
            raise
        except Exception as e:  # pynvml raises NVMLError subclasses, or OSError from ctypes
            log.info("NVML unavailable (%s); using the instance-type map", type(e).__name__)
        else:
            if shape is not None:
                log.info("GPU shape %s (from NVML)", shape.name)
                return shape
            log.info("NVML reports no GPU; using the instance-type map")
    shape = shape_from_instance_type(instance_type, instance_type_map or {}) if instance_type else None
    if shape is not None:
        log.info("GPU shape %s (from instance type %s)", shape.name, instance_type)
    else:
        log.info("GPU shape unknown (no NVML, instance type %r not in the map)", instance_type)
    return shape


# ---- TensorRT-LLM ------------------------------------------------------------------------------------------

F = TypeVar("F", RemoteFile, str)


def _path(f: RemoteFile | str) -> str:
    return f.path if isinstance(f, RemoteFile) else str(f)


def _shape_dirs(path: str) -> list[tuple[str, GpuShape]]:
    return [(seg, s) for seg in path.split("/")[:-1] if (s := parse_shape(seg)) is not None]


def is_trtllm_layout(paths: Iterable[RemoteFile | str]) -> bool:
    """True when some ``*.engine`` file lies under a folder named like a GPU shape."""
    return any(_path(p).endswith(".engine") and _shape_dirs(_path(p)) for p in paths)


def trtllm_filter(files: Sequence[F], shape: GpuShape | None) -> list[F]:
    """Keep files under a folder matching ``shape`` plus every file under no shape-named folder.

    Raises :class:`ConfigError` naming the shapes available when the model has shape folders and none
    matches (or the node's shape is unknown).
    """
    kept: list[F] = []
    available: set[str] = set()
    matched: set[str] = set()
    for f in files:
        dirs = _shape_dirs(_path(f))
        if not dirs:
            kept.append(f)
            continue
        available.update(seg for seg, _ in dirs)
        hit = [seg for seg, s in dirs if shape is not None and s.matches(shape)]
        if hit:
            kept.append(f)
            matched.update(hit)
    if available and not matched:
        raise ConfigError(
            f"no TensorRT-LLM engines for GPU shape {shape.name if shape else 'unknown'}; "
            f"the model has: {', '.join(sorted(available))}",
            hint="build engines for this shape, or run on a node with one of the shapes listed")
    if len(matched) > 1:
        log.warning("several engine folders match %s: %s", shape, ", ".join(sorted(matched)))
    return kept
