"""docs/architecture.md has one row per module, and no row for a module that does not exist.

A row is a Markdown table line whose first cell is one backticked path ending in ``.py``, written relative to the
repository root (``agent/kube/client.py``), as the page's introduction says. Every module under ``storage/``,
``coordination/`` and ``agent/`` must have exactly one row; an ``__init__.py`` that holds nothing but a docstring
has none (its docstring is its description). Every path a row names must exist, in those packages or elsewhere
(``testing/``).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("storage", "coordination", "agent")
_ROW = re.compile(r"^\|\s*`([^`]+\.py)`\s*\|")


def _docstring_only(path: Path) -> bool:
    """An empty module, or one that holds only its docstring."""
    body = ast.parse(path.read_text(), filename=str(path)).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return not body


def modules(root: Path = ROOT) -> set[str]:
    """Every module file of the three packages that needs a row, relative to ``root``."""
    found: set[str] = set()
    for top in PACKAGES:
        for path in (root / top).rglob("*.py"):
            if path.name == "__init__.py" and _docstring_only(path):
                continue
            found.add(path.relative_to(root).as_posix())
    return found


def rows(text: str) -> list[str]:
    """The path named by each table row's first cell, in order (duplicates kept)."""
    return [m.group(1) for line in text.splitlines() if (m := _ROW.match(line))]


def problems(text: str, root: Path = ROOT) -> list[str]:
    named = rows(text)
    wanted = modules(root)
    out = [f"{p}: {n} rows" for p, n in sorted(Counter(named).items()) if n > 1]
    out += [f"{p}: no row in docs/architecture.md" for p in sorted(wanted - set(named))]
    out += [f"{p}: a row for a file that does not exist" for p in sorted(set(named)) if not (root / p).is_file()]
    out += [f"{p}: a row for an __init__.py that holds only a docstring (describe the package in it instead)"
            for p in sorted(set(named))
            if p.endswith("__init__.py") and (root / p).is_file() and p not in wanted
            and p.split("/", 1)[0] in PACKAGES]
    return out


def test_every_module_has_exactly_one_row() -> None:
    assert problems(DOC.read_text()) == []


def test_the_check_fails_on_a_missing_a_duplicated_and_a_stale_row() -> None:
    text = DOC.read_text()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if _ROW.match(line))
    name = rows(lines[first])[0]

    without = "\n".join(lines[:first] + lines[first + 1:])
    assert f"{name}: no row in docs/architecture.md" in problems(without)

    doubled = "\n".join([*lines[:first + 1], lines[first], *lines[first + 1:]])
    assert f"{name}: 2 rows" in problems(doubled)

    stale = text + "\n| `agent/no_such_module.py` | nothing |\n"
    assert "agent/no_such_module.py: a row for a file that does not exist" in problems(stale)


def test_a_new_module_without_a_row_fails(tmp_path: Path) -> None:
    for top in PACKAGES:
        (tmp_path / top).mkdir()
    (tmp_path / "agent" / "__init__.py").write_text('"""a docstring only: no row needed"""\n')
    (tmp_path / "agent" / "old.py").write_text("X = 1\n")
    (tmp_path / "agent" / "new.py").write_text("Y = 2\n")
    doc = "| module | owns |\n|---|---|\n| `agent/old.py` | X |\n"
    assert problems(doc, tmp_path) == ["agent/new.py: no row in docs/architecture.md"]
