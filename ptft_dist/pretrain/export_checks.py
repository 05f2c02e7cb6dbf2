"""What ``ptft convert`` checks so that it never destroys what it reads, never replaces a folder it
did not write, and never calls a meaningless export verified (docs/design.md, guarantees 7 and 9;
docs/refusals.md, "convert").

* the output (``-o``) must not lie inside, be, or contain the run / checkpoint being read, nor the
  run's corpus: ``--overwrite`` of the run directory would delete the checkpoints it exports;
* ``--overwrite`` replaces only a previous export (it holds ``ptft_export.json``) that holds nothing
  else than what a conversion writes: a user's folder, or an export the user added notes to, stays;
* the run's ``tokenizer/`` must be the one the checkpoint was trained with (its ``tokenizer_hash``):
  a run directory reused with another corpus must not ship one vocabulary with another's weights;
* weights and logits must be finite: ``NaN - NaN`` compares as "no difference".
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Optional

import torch
import yaml

from ptft_dist.corpus.format import TOKENIZER_DIR, tokenizer_hash
from ptft_dist.corpus.tokenizer import TOKENIZER_FILES
from ptft_dist.errors import UserError
from ptft_dist.fsutil import is_within, remove_stale_temps

META = "ptft_export.json"
# what a conversion writes: save_pretrained's files (one or several safetensors shards), the
# tokenizer files it copies, and its report
EXPORT_PATTERNS = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                   "model.safetensors.index.json", META, *TOKENIZER_FILES)


class ExportCheckError(UserError, RuntimeError):
    """A conversion refused before anything is written; the message says why and what to do."""


def run_corpus(run_dir: Optional[Path]) -> Optional[Path]:
    """The local corpus the run trained on (``data.corpus`` of its resolved_config.yaml), if known."""
    resolved = run_dir / "resolved_config.yaml" if run_dir else None
    if resolved is None or not resolved.is_file():
        return None
    try:
        corpus = ((yaml.safe_load(resolved.read_text()) or {}).get("data") or {}).get("corpus") or ""
    except yaml.YAMLError:
        return None
    return Path(corpus) if corpus and "://" not in str(corpus) else None


def check_output(out: Path, step_dir: Path, run_dir: Optional[Path], overwrite: bool) -> None:
    """Refuse an ``-o`` that would overwrite an input or a folder convert did not write; then remove
    temporary exports that killed conversions left beside ``out``."""
    read = run_dir or step_dir
    for inp, what in ((read, "the run being converted" if run_dir else "the checkpoint being converted"),
                      (run_corpus(run_dir), "the run's corpus (data.corpus)")):
        if inp is None:
            continue
        if is_within(out, inp):
            raise ExportCheckError(f"-o {out}: inside {what} ({inp}); choose a folder outside it")
        if is_within(inp, out):
            raise ExportCheckError(f"-o {out}: contains {what} ({inp}); choose a folder outside it")
    _check_replaceable(out, overwrite, (run_dir / TOKENIZER_DIR) if run_dir else None)
    remove_stale_temps(out)


def _check_replaceable(out: Path, overwrite: bool, tok_dir: Optional[Path]) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportCheckError(f"-o {out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / META).is_file():
        raise ExportCheckError(f"-o {out}: not empty and not written by ptft convert (no {META}); choose a new or "
                               "empty folder (--overwrite only replaces a previous export)")
    if not overwrite:
        raise ExportCheckError(f"-o {out}: holds a previous export; pass --overwrite to replace it")
    extra = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _export_file(p, tok_dir))
    if extra:
        raise ExportCheckError(f"-o {out}: holds files ptft convert did not write ({', '.join(extra[:5])}); "
                               "not replaced: move them out or choose another folder")


def _export_file(path: Path, tok_dir: Optional[Path]) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in EXPORT_PATTERNS):
        return True
    return tok_dir is not None and (tok_dir / path.name).is_file()


def check_run_tokenizer(tok_dir: Path, trained_with: Optional[str], step_dir: Path) -> None:
    """The tokenizer to export is the one the checkpoint was trained with."""
    if not trained_with:
        return
    found = tokenizer_hash(tok_dir)
    if found != trained_with:
        raise ExportCheckError(
            f"{tok_dir}: tokenizer {found}, but {step_dir} was trained with tokenizer {trained_with} (the run "
            f"directory was reused with another corpus, or tokenizer/ replaced): exporting it would pair one "
            f"vocabulary with another's weights; copy the tokenizer/ of the corpus the run trained on into "
            f"{tok_dir.parent}")


def non_finite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in named.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(model: torch.nn.Module, step_dir: Path) -> None:
    bad = non_finite_tensors(dict(model.named_parameters()))
    if bad:
        raise ExportCheckError(
            f"{step_dir}: non-finite weights (NaN or inf in {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): "
            f"the run diverged before this checkpoint; convert an earlier one ({step_dir.parent}/step_N)")


def check_finite_logits(logits: tuple[torch.Tensor, ...], what: str) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in logits):
        raise ExportCheckError(f"{what}: non-finite logits on the probe batch: the export cannot be verified")
