"""Imports flow one way: storage <- coordination <- agent, and inside agent/ from the CLI down to the access layer.

Every ``import`` in the source is read with :mod:`ast` — function-local and ``TYPE_CHECKING`` ones included, since
an import moved into a function to dodge a cycle is still a cycle — and resolved to a ``modelherd`` module. The
test fails on any import cycle between modules and on any import that climbs: from a lower package to a higher
one, or inside ``agent/`` from a lower layer to a higher one (or sideways between two units of one layer).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"storage": "modelherd.storage", "coordination": "modelherd.coordination", "agent": "modelherd.agent"}
PACKAGE_ORDER = ["storage", "coordination", "agent"]  # each may import only those before it

# agent/: units (a top-level module or a sub-package), lowest layer first. A unit imports only from its own unit
# and from units of lower layers.
AGENT_LAYERS: list[set[str]] = [
    {"durations", "logredact", "startup", "server", "kube", "ome"},  # building blocks; kube = all API-server I/O
    {"settings"},  # the one reader of the environment, grouped by concern
    {"transfer", "basemodels"},  # settings -> storage options; a CR -> ModelSpec
    {"watching", "reporting"},  # informers, queues, node selection; the status writers
    {"lifecycle"},  # one model on this node: the reconciler and its collaborators
    {"process"},  # the shared run/stop/informer skeleton of the agent and the controller
    {"runner", "controller", "views"},  # the node agent, the status controller, read-only views
    {"demo"},
    {"commands"},  # the CLI's subcommands
    {"cli"},  # argument parsing and the entry point
]



def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def _sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every modelherd module ``name`` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("modelherd."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("modelherd."):
                module = node.module
            else:
                continue
            for alias in node.names:  # ``from . import x`` imports the module x
                full = f"{module}.{alias.name}"
                add(full if full in known else module)
    return out


@functools.cache
def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def _package(module: str) -> str:
    return module.split(".")[1]


def _agent_unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "agent" else None


def _layer(unit: str) -> int:
    for i, units in enumerate(AGENT_LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"agent/{unit} is in no layer of tests/unit/test_layering.py: give it one")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_package_init(module: str, graph: dict[str, set[str]]) -> bool:
    return any(other.startswith(module + ".") for other in graph)


def _within_package(m: str, t: str, graph: dict[str, set[str]]) -> bool:
    """``m`` is a package importing its own module ``t``, or a module importing its own package's __init__."""
    return t.startswith(m + ".") or (m.startswith(t + ".") and _is_package_init(t, graph))


def test_the_source_has_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle with them
    pruned = {m: {t for t in deps if not _within_package(m, t, graph)} for m, deps in graph.items()}
    assert _cycles(pruned) == []


def test_packages_import_only_downward() -> None:
    climbs = [f"{m} -> {t}" for m, deps in _graph().items() for t in deps
              if PACKAGE_ORDER.index(_package(t)) > PACKAGE_ORDER.index(_package(m))]
    assert climbs == []


def test_agent_units_import_only_from_lower_layers() -> None:
    wrong = []
    for m, deps in _graph().items():
        unit = _agent_unit(m)
        if unit is None:
            continue
        for t in deps:
            other = _agent_unit(t)
            if other is None or other == unit:
                continue
            if _layer(other) >= _layer(unit):
                wrong.append(f"{m} (layer {_layer(unit)}) -> {t} (layer {_layer(other)})")
    assert wrong == []


def test_every_agent_unit_has_a_layer() -> None:
    units = {u for m in _graph() if (u := _agent_unit(m)) is not None}
    for unit in units:
        _layer(unit)


def test_the_walker_sees_function_local_imports(tmp_path: Path) -> None:
    """The check could fail: a function-local upward import is found (guards the walker itself)."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..commands import engine_options\n")
    found = _imports("modelherd.agent.lifecycle.x", src, {"modelherd.agent.commands"})
    assert found == {"modelherd.agent.commands"}
