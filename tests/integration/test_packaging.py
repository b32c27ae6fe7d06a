"""The distribution installs one import namespace, `modelherd`, and a `modelherd` console script."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_only_the_modelherd_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("modelherd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"modelherd", next(t for t in top if t.endswith(".dist-info"))}, top
    for layer in ("storage", "coordination", "agent"):
        assert f"modelherd/{layer}/__init__.py" in names
    assert "modelherd/storage/sources/hf.py" in names
    assert not any(n.startswith("modelherd/tests") or n.startswith("modelherd/bench") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "modelherd = modelherd.agent.cli:main" in text


def _loaded_after(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules starting with one of ``prefixes`` that a fresh interpreter has loaded after ``imports``."""
    code = (f"import json, sys; {imports}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def test_storage_layer_does_not_import_kubernetes() -> None:
    imports = ("import modelherd.storage.engine, modelherd.storage.verify, modelherd.storage.sources, "
               "modelherd.storage.fsdetect, modelherd.storage.gpu")
    assert _loaded_after(imports, ("kubernetes", "modelherd.coordination", "modelherd.agent")) == []


def test_a_pull_without_coordination_loads_neither_kubernetes_nor_huggingface_hubs_hf_api() -> None:
    """Start-up cost is part of every one-shot pull: the no-coordination HF path imports only what it uses."""
    imports = ("from modelherd.agent import cli, commands; from modelherd.storage.sources import hf; "
               "from modelherd.storage import engine; from modelherd.coordination import choose_backend")
    assert _loaded_after(imports, ("kubernetes", "huggingface_hub.hf_api", "oci")) == []
