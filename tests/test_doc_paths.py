"""Every repository path that the README, docs, configs, DeepSpeed configs, SLURM templates and
scripts name exists (a user copying ``configs/finetune/X.yaml`` from a template must find it).

A path is a word starting with one of the top-level folders below that is not part of a longer
path (``$PTFT_OUT/slurm/row-000/`` is an output, not ours). ``{a,b}`` is expanded, ``*`` must
match at least one file, and ``<...>`` marks a placeholder (not checked).
"""

from __future__ import annotations

import glob
import re
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("configs", "ds_configs", "slurm", "docs", "scripts", "benchmarks", "tests", "ptft_dist")
PATH_RE = re.compile(r"(?<![\w./$~-])((?:" + "|".join(TOP) + r")/[\w./*{},<>-]*)")
SCANNED = ("README.md", "docs/*.md", "slurm/*", "configs/**/*", "ds_configs/*", "launch.sh", "scripts/*.sh")
ALLOWED_MISSING: frozenset[str] = frozenset()  # keep empty: fix the reference instead


def scanned_files() -> list[Path]:
    out = {Path(p) for pattern in SCANNED for p in glob.glob(str(ROOT / pattern), recursive=True)}
    return sorted(p for p in out if p.is_file())


def expand_braces(path: str) -> list[str]:
    parts = re.split(r"\{([^{}]*)\}", path)  # text, alternatives, text, ...
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in product(*choices)]


def referenced_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) for every repository path in ``text``, trailing punctuation removed."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in PATH_RE.finditer(line):
            out.append((n, m.group(1).rstrip(".,:;")))
    return out


def exists(path: str) -> bool:
    if "<" in path:  # a placeholder such as row-<iii>
        return True
    for p in expand_braces(path):
        if "*" in p:
            if not glob.glob(str(ROOT / p)):
                return False
        elif not (ROOT / p).exists():
            return False
    return True


def test_the_scanner_finds_and_judges_paths():
    text = ("see `configs/pretrain/{tiny-cpu,base-gpu}.yaml`, ds_configs/*.json and slurm/README.md.\n"
            "output in $PTFT_OUT/slurm/row-<iii>/ and RUN_DIR/checkpoints; configs/finetune/sst2.yaml\n")
    found = [p for _, p in referenced_paths(text)]
    assert found == ["configs/pretrain/{tiny-cpu,base-gpu}.yaml", "ds_configs/*.json", "slurm/README.md",
                     "configs/finetune/sst2.yaml"]
    assert [exists(p) for p in found] == [True, True, True, False]
    assert not exists("configs/pretrain/{tiny-cpu,no-such}.yaml") and not exists("slurm/*.nothing")


def test_every_named_repository_path_exists():
    files = scanned_files()
    assert {f.relative_to(ROOT).as_posix() for f in files} >= {"README.md", "slurm/finetune.sbatch", "launch.sh",
                                                                "configs/finetune/rotten_tomatoes.yaml"}
    broken, checked = [], 0
    for f in files:
        for n, path in referenced_paths(f.read_text(errors="replace")):
            checked += 1
            if path not in ALLOWED_MISSING and not exists(path):
                broken.append(f"{f.relative_to(ROOT)}:{n}: {path}")
    assert checked > 50, checked
    assert not broken, "paths named but missing from the repository:\n" + "\n".join(broken)
