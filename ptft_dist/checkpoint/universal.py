"""Elastic resume (docs/design.md, guarantee 4): a ZeRO-1/2/3 checkpoint written by W ranks, loaded by W'.

DeepSpeed's ZeRO files are partitioned per rank, so another world size (or ZeRO stage) cannot
load them directly. :func:`convert_to_universal` runs DeepSpeed's ``ds_to_universal`` once, on
rank 0, into ``<tag>/universal/``; the engine then loads that with ``load_universal_checkpoint``.
The engine decides when from :func:`saved_world_size` and the ``ptft_meta.json`` it wrote at save
time (:func:`read_meta`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from ptft_dist.log import get_logger

log: logging.Logger = get_logger("checkpoint")

META_FILE = "ptft_meta.json"  # written by rank 0 into every checkpoint tag dir: backend, ZeRO stage, world size
UNIVERSAL_TAG = "universal"  # <tag>/universal: DeepSpeed universal checkpoint of <tag>
_CONVERTED = ".complete"  # inside <tag>/universal once the conversion finished


def read_meta(tag_dir: str | Path) -> dict:
    """The ``ptft_meta.json`` of a checkpoint ({} for one written elsewhere)."""
    p = Path(tag_dir) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _count_zero_optim_files(tag_dir: Path) -> int:
    return len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_*optim_states.pt")))


def saved_world_size(tag_dir: str | Path) -> Optional[int]:
    """World size a checkpoint was written with: ``ptft_meta.json``, else the ZeRO file count."""
    meta = read_meta(tag_dir)
    if "world_size" in meta:
        return int(meta["world_size"])
    n = _count_zero_optim_files(Path(tag_dir))
    return n or None


def convert_to_universal(ckpt_dir: str | Path, tag: str, num_workers: int = 1) -> Path:
    """DeepSpeed ZeRO-1/2/3 checkpoint ``ckpt_dir/tag`` → universal checkpoint
    ``ckpt_dir/tag/universal`` (``deepspeed.checkpoint.ds_to_universal``). Idempotent; written to
    a temporary folder and renamed, so a crash never leaves a half-converted one. Run it on one
    process (rank 0); every rank then loads it with ``Engine.load_checkpoint``."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    src = Path(ckpt_dir) / tag
    out = src / UNIVERSAL_TAG
    if (out / _CONVERTED).is_file():
        return out
    if not _count_zero_optim_files(src):
        raise FileNotFoundError(f"{src}: no ZeRO optimizer-state files (*_optim_states.pt): not a ZeRO-1/2/3 checkpoint")
    tmp = src / f".{UNIVERSAL_TAG}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=num_workers,
                              num_merge_workers=num_workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    t0 = time.time()
    with contextlib.redirect_stdout(_LogWriter()):
        ds_to_universal.main(args)
    with contextlib.suppress(OSError):
        os.remove(src / "latest_universal")  # ds_to_universal's pointer file; we address it by name
    (tmp / _CONVERTED).write_text("ok\n")
    os.replace(tmp, out)
    log.info("converted %s to a universal checkpoint in %.1f s", src, time.time() - t0)
    return out


class _LogWriter:
    """``ds_to_universal`` prints progress to stdout, which is for results: route it to debug logs."""

    def write(self, s: str) -> int:
        if s.strip():
            log.debug("ds_to_universal: %s", s.rstrip())
        return len(s)

    def flush(self) -> None:
        pass
