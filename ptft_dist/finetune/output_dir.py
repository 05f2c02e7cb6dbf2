"""Where a fine-tuning run may write, checked before anything is (docs/design.md, guarantees 7 and 9;
docs/refusals.md, "finetune").

A new run in an existing ``finetune.output_dir`` replaces the previous run's ``best/``,
``checkpoints/``, ``tb/``, ``results.json`` and ``metrics.jsonl`` (finetune/loop.py,
``start_output_dir``). So the folder must be new, empty, or one that ``ptft finetune`` wrote (its
``resolved_config.yaml`` is a fine-tuning config naming it); it must not lie inside the model it
reads; and no input (the model, a task file) may lie in what the run replaces: fine-tuning
``--model OUT/best`` into ``OUT`` would delete its own model first. Everything else in the folder
(a user's notes, other files) is left alone.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ptft_dist.config import FinetuneConfig
from ptft_dist.finetune.model import FinetuneError
from ptft_dist.fsutil import is_within

RESOLVED = "resolved_config.yaml"
REPLACED = ("best", "checkpoints", "tb", "results.json", "metrics.jsonl")  # what a new run removes first


def written_by_finetune(out: Path) -> bool:
    """``out`` holds the resolved config of a fine-tuning run that wrote into it."""
    try:
        data = yaml.safe_load((out / RESOLVED).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    ft = data.get("finetune") if isinstance(data, dict) else None
    if not isinstance(ft, dict) or not ft.get("model") or not ft.get("output_dir"):
        return False
    return Path(str(ft["output_dir"])).name == out.resolve().name


def _inputs(ft: FinetuneConfig, model_dir: Path) -> list[tuple[str, Path]]:
    files = [("finetune.train_file", ft.train_file), ("finetune.validation_file", ft.validation_file),
             ("finetune.test_file", ft.test_file)]
    return [("finetune.model", model_dir)] + [(k, Path(v)) for k, v in files if v and "://" not in str(v)]


def check_output_dir(ft: FinetuneConfig, model_dir: Path) -> None:
    """Refuse an output folder this run would have to overwrite an input in, or a user's folder."""
    if not str(ft.output_dir or ""):
        raise FinetuneError("finetune.output_dir: required (where best/, results.json and logs go)")
    out = Path(ft.output_dir)
    if is_within(out, model_dir):
        raise FinetuneError(f"finetune.output_dir={out} lies inside finetune.model={model_dir}: the run would write "
                            "into the model it reads; choose an output folder outside it")
    for key, path in _inputs(ft, model_dir):
        hit = next((out / name for name in REPLACED if is_within(path, out / name)), None)
        if hit is not None:
            raise FinetuneError(f"{key}={path} lies in {hit}, which this run replaces (finetune.output_dir={out}): "
                                "copy it elsewhere first, or choose another finetune.output_dir")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"finetune.output_dir={out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not written_by_finetune(out):
        raise FinetuneError(f"finetune.output_dir={out}: not empty and not written by ptft finetune (no {RESOLVED} "
                            "of a fine-tuning run naming it); choose a new or empty folder")
