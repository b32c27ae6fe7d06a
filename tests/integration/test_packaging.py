"""The distribution installs one import namespace, `modelherd`, and a `modelherd` console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


def test_wheel_ships_modelherd_testing_with_its_servers_and_model_writer(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("modelherd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "hubserver", "ociserver", "rangeserver", "models", "support"):
        assert f"modelherd/testing/{module}.py" in names
    assert "modelherd/testing/py.typed" in names
    assert "modelherd/agent/demo.py" in names


def _package_folders() -> set[str]:
    """Top-level source folders that pyproject.toml maps into the wheel."""
    import tomllib

    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    return {d.split("/", 1)[0] for d in dirs}


def test_the_containerfile_builds_from_every_package_folder_and_runs_the_agent_unprivileged() -> None:
    text = (REPO / "Containerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", text, re.M))
    assert copied == _package_folders()  # a new package folder must reach the image
    assert re.search(r"^COPY pyproject\.toml README\.md \./$", text, re.M)
    assert re.search(r"^RUN pip wheel --no-cache-dir --wheel-dir /wheels \.$", text, re.M)
    assert "pip install --no-cache-dir --no-index /wheels/*.whl" in text
    assert re.search(r"^ARG PYTHON_IMAGE=docker\.io/library/python:3\.1[1-9]-slim$", text, re.M)
    assert re.search(r"^USER 65532:65532$", text, re.M)
    assert "--uid 65532" in text and "--gid 65532" in text
    assert text.rstrip().splitlines()[-1] == 'ENTRYPOINT ["modelherd", "agent"]'
    for label in ("title", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in text


def _readme_first_command() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)\n```", readme, re.S)
    assert block is not None
    return block.group(1).strip()


def test_the_readmes_first_command_is_the_demo() -> None:
    assert _readme_first_command() == \
        "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/modelherd demo"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_readmes_first_command_runs_the_demo_from_a_fresh_venv_with_the_runtime_dependencies_only(
        tmp_path: Path) -> None:
    """The README's first command, literally, in a copy of the working tree: ``pip install .`` builds and installs
    the wheel (what the Containerfile installs), the demo exits 0, and the installed ``modelherd agent`` runs."""
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "MODELHERD_", "KUBECONFIG", "VIRTUAL_ENV", "PYTHON"))}
    env["TMPDIR"] = str(tmp_path)
    r = subprocess.run(["sh", "-c", _readme_first_command()], cwd=src, env=env, capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "nodes Ready: 4/4" in r.stdout and "1.00 x the model" in r.stdout and "demo OK" in r.stdout

    venv_python = src / ".venv" / "bin" / "python"
    where = subprocess.run([str(venv_python), "-c", "import modelherd.agent.demo as d; print(d.__file__)"],
                           capture_output=True, text=True, timeout=60, check=True, env=env).stdout.strip()
    assert "/site-packages/modelherd/agent/demo.py" in where  # the installed wheel, not the source tree
    no_numpy = subprocess.run([str(venv_python), "-c", "import numpy"], capture_output=True, timeout=60, env=env,
                              check=False)
    assert no_numpy.returncode != 0  # the demo ran on the runtime dependencies alone
    agent = subprocess.run([str(src / ".venv" / "bin" / "modelherd"), "agent", "--help"], capture_output=True,
                           text=True, timeout=60, env=env, check=False)
    assert agent.returncode == 0 and "--node-name" in agent.stdout and "--num-download-worker" in agent.stdout
    unnamed = subprocess.run([str(src / ".venv" / "bin" / "modelherd"), "agent"], capture_output=True, text=True,
                             timeout=60, env={**env, "NODE_NAME": ""}, check=False)
    assert unnamed.returncode == 2 and "NODE_NAME" in unnamed.stderr  # the agent itself started and refused
