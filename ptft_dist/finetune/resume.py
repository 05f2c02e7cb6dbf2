"""Checkpoints of a fine-tuning run: signal → save → exit → resume (docs/design.md, guarantees 5 and 6).

The same :class:`~ptft_dist.checkpoint.manager.CheckpointManager` and
:class:`~ptft_dist.checkpoint.preemption.PreemptionHandler` as pretraining, under
``OUTPUT_DIR/checkpoints``. A checkpoint is taken at an optimizer-step boundary, every
``finetune.checkpoint_every`` steps (0: never) and on SIGUSR1/SIGTERM, after which the run exits
with ``checkpoint.requeue_exit_code``. It holds

* the engine (model, optimizer, LR schedule) and every rank's RNG states;
* where the run is (:class:`Progress`): epoch, micro-batches of it done — the per-rank train order
  is a pure function of seed and epoch (``finetune/batches.py`` ``train_shard``), so a resume skips
  exactly those — optimizer steps, and every rank's train losses of the epoch and of the unlogged
  window (the epoch's train loss comes out the same);
* what the run has decided: history, best metric and epoch, early-stopping counter, timings;
* ``best/``, the best export so far, hard-linked into the checkpoint (an export is replaced, never
  written in place, so a link costs no space) and put back on resume: the export on disk always
  belongs to the checkpoint the run continues from;
* what the run is (:func:`identity`): a resume under other settings is refused, both values named.

An epoch's last step is saved after its validation (a resumed run never logs an epoch twice), and a
step whose gradients are still accumulating is never saved. The checkpoints only serve the resume:
they are removed once ``results.json`` is written.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ptft_dist.checkpoint.manager import (
    CHECKPOINTS_DIR,
    CheckpointError,
    CheckpointManager,
    find_checkpoint,
    restore_rng,
    verify,
)
from ptft_dist.checkpoint.preemption import PreemptionHandler, exit_for_requeue, preemption_save
from ptft_dist.dist.collectives import barrier, broadcast_object, gather_object
from ptft_dist.finetune.model import FinetuneError
from ptft_dist.finetune.settings import Plan, Settings
from ptft_dist.fsutil import remove_tree, replace_dir, temp_name
from ptft_dist.log import get_logger

log = get_logger("finetune")
BEST = "best"  # OUTPUT_DIR/best and, in a checkpoint, the best export at that step


@dataclass
class Progress:
    """How far the run is and what it has decided: everything a resume needs besides the engine."""

    history: list[dict] = field(default_factory=list)
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    best_validation: dict = field(default_factory=dict)
    bad_epochs: int = 0
    step: int = 0
    early_stopped: bool = False
    timings: dict = field(default_factory=lambda: {"train_s": 0.0, "validation_s": 0.0, "export_s": 0.0})
    epoch: int = 1  # the epoch in progress (1-based)
    epoch_micro: int = 0  # micro-batches of `epoch` this rank has trained on
    epoch_losses: list[torch.Tensor] = field(default_factory=list)  # this rank's, for the epoch's train loss
    window: list[torch.Tensor] = field(default_factory=list)  # this rank's losses since the last metrics line

    def add_loss(self, loss: torch.Tensor) -> None:
        self.epoch_micro += 1
        self.epoch_losses.append(loss)
        self.window.append(loss)

    def next_epoch(self) -> None:
        self.epoch, self.epoch_micro, self.epoch_losses, self.window = self.epoch + 1, 0, [], []

    _SHARED = ("history", "best", "best_epoch", "best_validation", "bad_epochs", "step", "early_stopped",
               "timings", "epoch", "epoch_micro")

    def state_dict(self) -> dict:
        """What every rank shares (JSON: it also lands in the checkpoint's manifest)."""
        return {k: getattr(self, k) for k in self._SHARED}

    def load_state_dict(self, state: dict, losses: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> None:
        for k in self._SHARED:
            setattr(self, k, state[k])
        self.epoch_losses, self.window = (list(t.to(device).unbind()) for t in losses)


def _as_tensor(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).float().cpu() if values else torch.zeros(0)


def identity(s: Settings, plan: Plan, n_train: int, world: int, model_dir: Path, labels: list) -> dict:
    """The settings that decide which examples each step sees and how it updates the model: a
    checkpoint only continues a run that has all of them (keys are what the user changes)."""
    ft = s.ft
    return {"ranks": world, "finetune.batch_size": ft.batch_size, "train.grad_accum": s.grad_accum,
            "finetune.epochs": ft.epochs, "train.seed": s.seed, "learning rate": s.lr, "optimizer steps": plan.max_steps,
            "finetune.method": ft.method, "finetune.model": str(model_dir), "train examples": n_train,
            "labels": [str(x) for x in labels], "finetune.task_type": ft.task_type,
            "finetune.metric_for_best": ft.metric_for_best, "finetune.max_seq_len": ft.max_seq_len,
            "finetune.group_by_length": ft.group_by_length, "finetune.warmup_ratio": ft.warmup_ratio}


def _link_tree(src: Path, dst: Path) -> list[Path]:
    """Every file of ``src`` at the same place under ``dst``: a hard link, a copy where links fail."""
    out = []
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
        out.append(target)
    return out


class Checkpointing:
    """A fine-tuning run's checkpoints and preemption handler (every rank builds one)."""

    def __init__(self, s: Settings, n_train: int, world: int, rank: int, ident: dict):
        self.cfg = s.checkpoint
        self.out_dir = Path(s.ft.output_dir)
        self.rank, self.world, self.ident = rank, world, ident
        self.manager = CheckpointManager(self.out_dir, self.cfg, rank, world)
        self.preemption = PreemptionHandler()
        self.micro_per_epoch = math.ceil(math.ceil(n_train / world) / s.ft.batch_size)  # as settings.plan_steps
        self.grad_accum = max(s.grad_accum, 1)

    # -- before the run
    def resolve(self) -> Optional[Path]:
        """The checkpoint to continue from per ``finetune.resume`` (None: a fresh start), checked
        against this run's settings. A collective: every rank calls it before anything is written."""
        err, found = "", None
        if self.rank == 0:
            try:
                found = self._resolve_on_rank0((self.cfg.resume or "auto").strip())
            except CheckpointError as exc:
                err = str(exc)
        err, found = broadcast_object((err, None if found is None else str(found)))
        if err:
            raise FinetuneError(err)
        return Path(found) if found else None

    def _resolve_on_rank0(self, mode: str) -> Optional[Path]:
        if mode == "never":
            return None  # a fresh start: start_output_dir removes the old run's checkpoints with its results
        if mode == "auto":
            self.manager.cleanup_stale()
            if self.manager.latest_tag() is None:
                return None
            try:
                path = find_checkpoint(self.manager.root)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; set finetune.resume=never to start over, or finetune.resume=PATH") from None
        else:
            try:
                path = find_checkpoint(mode)
            except CheckpointError as exc:
                raise CheckpointError(f"finetune.resume: {exc}") from None
        self._check_identity(path)
        return path

    def _check_identity(self, path: Path) -> None:
        saved = verify(path).get("client", {}).get("identity")
        if saved is None:
            raise CheckpointError(f"finetune.resume: {path} is not a fine-tuning checkpoint (no run settings in it)")
        diffs = [f"{k} {saved[k]!r} there, {v!r} here" for k, v in self.ident.items() if saved.get(k, v) != v]
        if diffs:
            raise CheckpointError(f"cannot resume from {path}: it belongs to a run with other settings ("
                                  + "; ".join(diffs) + "); resume with the same settings, or set "
                                  "finetune.resume=never (or another finetune.output_dir) to start over")

    def load(self, engine: Any, path: Optional[Path], best: Path) -> Progress:
        """A fresh :class:`Progress`, or the one saved in ``path`` with the engine, this rank's RNG
        and (rank 0) ``best/`` restored. Every rank calls it."""
        progress = Progress()
        if path is None:
            return progress
        client = self.manager.load(engine, path)
        restore_rng(client)
        progress.load_state_dict(client["progress"], client["rank_losses"][self.rank], engine.device)
        if self.rank == 0:
            _restore_best(path / BEST, best)
        barrier()
        return progress

    # -- during the run
    def last_step_of(self, epoch: int) -> int:
        """Optimizer steps done when ``epoch`` ends."""
        return epoch * self.micro_per_epoch // self.grad_accum

    def epoch_end_aligned(self, epoch: int) -> bool:
        """No gradients still accumulating at the end of ``epoch``: a checkpoint can be taken there."""
        return (epoch * self.micro_per_epoch) % self.grad_accum == 0

    def at_boundary(self, run: Any, progress: Progress) -> None:
        """At a point where a checkpoint is possible (every rank, the same points: a collective):
        save and exit for requeue if any rank got a signal, else save if one is due."""
        if self.preemption.should_stop():
            saved = preemption_save(self.manager, run.engine, progress.step, self._client(progress), self._best_files)
            if self.rank == 0:
                what = (f"saved step {progress.step}" if saved else
                        f"could not save step {progress.step} (latest is still {self.manager.latest_tag()})")
                log.info(f"signal received; {what}, exiting with {self.cfg.requeue_exit_code} for requeue")
            run.metrics.close()
            exit_for_requeue(self.cfg)
        if self.manager.should_save(progress.step):
            self.manager.save(run.engine, progress.step, self._client(progress), self._best_files)

    def _best_files(self, step_dir: Path) -> list[Path]:
        """Rank 0: the best export so far, hard-linked into the checkpoint (checked and listed in its
        manifest like the engine's files)."""
        best = self.out_dir / BEST
        return _link_tree(best, step_dir / BEST) if self.rank == 0 and best.is_dir() else []

    def _client(self, progress: Progress) -> dict:
        losses = gather_object((_as_tensor(progress.epoch_losses), _as_tensor(progress.window)))
        return {"step": progress.step, "progress": progress.state_dict(), "identity": self.ident,
                "rank_losses": losses}

    # -- after the run
    def finish(self) -> None:
        """Rank 0, once results.json is written: this run's checkpoints have served their purpose."""
        if self.rank == 0 and (self.out_dir / CHECKPOINTS_DIR).exists():
            remove_tree(self.out_dir / CHECKPOINTS_DIR)
            log.info(f"the run is complete: removed its checkpoints ({self.out_dir / CHECKPOINTS_DIR})")


def _restore_best(saved: Path, best: Path) -> None:
    """``best`` becomes the checkpoint's best export (or goes, when the checkpoint had none yet)."""
    if not saved.is_dir():
        remove_tree(best)
        return
    tmp = temp_name(best)
    try:
        _link_tree(saved, tmp)
        replace_dir(tmp, best)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
