"""The package layout stays walkable (docs/design.md, "Layout"): data flows one way through the
stage packages, no module imports a later stage, no import cycle, no file grows past ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ptft_dist"

# Lower layers never import higher ones (same layer: allowed). A module's layer is that of its
# first package component below ptft_dist.
LAYERS = [
    {"errors", "fsutil", "log", "config", "config_rules", "config_docs"},
    {"dist"},
    {"corpus"},
    {"stream"},
    {"checkpoint"},
    {"engine"},
    {"metrics"},
    {"pretrain"},
    {"finetune"},
    {"plan"},
    {"inspection", "demo", "cli"},
]
MAX_LINES = 520


def _layer(module: str) -> int:
    head = module.split(".")[1] if module.startswith("ptft_dist.") else ""
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py (add its package to LAYERS)")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ptft_dist module this file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ptft_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptft_dist"):
            out.add(node.module)
            for a in node.names:  # `from ptft_dist.stream import masking`
                if (PKG.parent / node.module.replace(".", "/") / f"{a.name}.py").exists():
                    out.add(f"{node.module}.{a.name}")
    return out


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module: str) -> None:
    if module == "ptft_dist":
        return
    mine = _layer(module)
    upward = sorted(m for m in _imports(MODULES[module]) if m != "ptft_dist" and _layer(m) > mine)
    assert not upward, f"{module} (layer {mine}) imports later stages: {upward}"


def test_no_import_cycle() -> None:
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n] if n in stack else [m, n]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_file_over_the_size_limit() -> None:
    big = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these files (> {MAX_LINES} lines): {big}"


def test_layout_test_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself works: a corpus module importing the pretraining loop is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ptft_dist.pretrain.loop import pretrain\n")
    assert _layer("ptft_dist.corpus.bad") < max(_layer(m) for m in _imports(bad))
