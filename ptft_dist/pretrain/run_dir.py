"""The run directory stays true to the run in it (docs/design.md, guarantees 7 and 9).

* ``train.run_dir`` must not lie inside ``data.corpus``: the run would write into the corpus it
  reads, and a later ``ptft prepare --overwrite`` of the corpus would delete the run.
* ``RUN/tokenizer`` is the tokenizer of the checkpoints beside it: ``ptft convert`` exports it with
  their weights. A run dir reused with another corpus (an earlier run stopped before its first
  checkpoint) gets the new corpus's tokenizer; a run dir whose checkpoints were trained with
  another tokenizer is refused before anything is loaded or written (a resume of its ``latest``
  is refused by ``RunIdentity.check_resume`` already; this covers ``checkpoint.resume=PATH``
  from elsewhere into it, which would leave two vocabularies in one run).
"""

from __future__ import annotations

from pathlib import Path

from ptft_dist.checkpoint.manager import CheckpointManager, read_manifest
from ptft_dist.config import Config
from ptft_dist.corpus.format import TOKENIZER_DIR, tokenizer_hash
from ptft_dist.corpus.tokenizer import copy_tokenizer
from ptft_dist.errors import UserError
from ptft_dist.fsutil import is_within
from ptft_dist.log import get_logger

log = get_logger("pretrain")


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot hold this run; the message names the setting."""


def check_run_dir(cfg: Config) -> None:
    """Refuse a ``train.run_dir`` inside (or equal to) a local ``data.corpus``."""
    corpus = str(cfg.data.corpus or "")
    if corpus and "://" not in corpus and is_within(cfg.train.run_dir, corpus):
        raise RunDirError(f"train.run_dir={cfg.train.run_dir} lies inside data.corpus={corpus}: the run would "
                          "write into the corpus it reads; choose a run directory outside the corpus")


def check_checkpoint_tokenizers(checkpoints: CheckpointManager, corpus_hash: str) -> None:
    """Every complete checkpoint in the run dir was trained with data.corpus's tokenizer."""
    other = [(path.name, h) for _, path in checkpoints.checkpoints()
             if (h := read_manifest(path).get("client", {}).get("tokenizer_hash")) and h != corpus_hash]
    if other:
        names = ", ".join(f"{tag} ({h})" for tag, h in other[:3])
        raise RunDirError(f"train.run_dir {checkpoints.run_dir} holds checkpoints trained with another tokenizer "
                          f"than data.corpus's ({corpus_hash}): {names}; use a new train.run_dir, or the corpus "
                          "those checkpoints were trained on")


def sync_run_tokenizer(cfg: Config, run_dir: Path, corpus_hash: str) -> Path:
    """Rank 0: ``RUN/tokenizer`` := the corpus tokenizer, unless it is that already (whole: a
    temporary copy renamed into place). Call it after :func:`check_checkpoint_tokenizers`."""
    tok = run_dir / TOKENIZER_DIR
    if (tok / "tokenizer.json").is_file():
        found = tokenizer_hash(tok)
        if found == corpus_hash:
            return tok
        log.warning(f"{tok}: tokenizer {found} (left by an earlier run on another corpus) is not data.corpus's "
                    f"({corpus_hash}), and no checkpoint here uses it: replaced by the corpus tokenizer")
    return copy_tokenizer(cfg.data.corpus, tok, cfg.data.storage_options, expected_hash=corpus_hash)
