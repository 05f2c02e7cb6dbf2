"""docs/refusals.md names a test for every refusal; each named test must exist (the page cannot rot)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for `tests/bad_inputs/X.py::name` and the `::name` shorthands that follow it in a cell."""
    out = []
    for cell in text.split("|"):
        current = None
        for m in re.finditer(r"`(tests/bad_inputs/\w+\.py)?::(\w+)`", cell):
            current = m.group(1) or current
            assert current, f"'::{m.group(2)}' without a file before it in: {cell.strip()[:80]}"
            out.append((current, m.group(2)))
    return out


def test_every_test_named_in_refusals_md_exists():
    named = _named_tests((ROOT / "docs" / "refusals.md").read_text())
    assert len(named) >= 30
    missing = []
    for file, name in named:
        path = ROOT / file
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)} \
            if path.is_file() else set()
        if name not in defined:
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/refusals.md names tests that do not exist: {missing}"


def test_readme_links_the_refusals_page():
    assert "(docs/refusals.md)" in (ROOT / "README.md").read_text()
