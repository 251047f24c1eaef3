"""One-way structure: `rlt_pl.modules` may use `rlt_pl.callbacks` (a module finds its StudentRewardCallback), never the
reverse, and no two files of the package import each other at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlt_pl"


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """`rlt_pl.*` names a file imports (`from a.b import c` gives `a.b` and `a.b.c`), nested imports included unless
    `top_level_only`; imports under `if TYPE_CHECKING:` are ignored (they never run)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("rlt_pl")}


def test_callbacks_never_import_modules():
    offenders = {
        _dotted(p): sorted(n for n in _imports(p, top_level_only=False) if n.startswith("rlt_pl.modules"))
        for p in (PACKAGE / "callbacks").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_between_files():
    files = {_dotted(p): p for p in PACKAGE.rglob("*.py")}
    # A package's `__init__` re-exports its submodules lazily, so an edge to a package means its `__init__` only.
    graph = {name: {n for n in _imports(p, top_level_only=True) if n in files} - {name} for name, p in files.items()}
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [node, nxt]))
            if nxt not in seen:
                visit(nxt, path + [node])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [])
    assert "rlt_pl.callbacks.student_reward" in graph["rlt_pl.modules.teacher_rl"]  # the allowed direction is seen


def test_reference_sync_refuses_a_module_without_a_reference():
    from lightning.pytorch import LightningModule

    from rlt_pl.callbacks import ReferenceSyncCallback

    with pytest.raises(ValueError, match="reference: copy"):
        ReferenceSyncCallback().setup(None, LightningModule(), "fit")
