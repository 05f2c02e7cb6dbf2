"""Preemption (docs/design.md, guarantee 6): signal → save → exit → resume.

:class:`PreemptionHandler` sets a flag on SIGUSR1/SIGTERM (nothing else happens in the handler);
:meth:`PreemptionHandler.should_stop` all-reduces it at a step boundary so every rank stops at
the same step; the loop saves with :func:`preemption_save` and calls :func:`exit_for_requeue`,
which exits with ``checkpoint.requeue_exit_code`` (default 124); the job script turns that status
into a requeue. A save that fails after the signal does not change the exit status: the previous
checkpoint is still ``latest`` (guarantee 5) and the requeued run resumes from it. Pretraining
(pretrain/loop.py) and fine-tuning (finetune/resume.py) share this protocol.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ptft_dist.checkpoint.manager import CheckpointError, CheckpointManager
from ptft_dist.config import CheckpointConfig
from ptft_dist.dist.collectives import barrier, collective_device, is_distributed
from ptft_dist.log import get_logger

log: logging.Logger = get_logger("checkpoint")
# Test hook (like corpus/steps.py's PTFT_PREPARE_FAIL_AT): "all" or a rank number: on that rank the
# checkpoint after a signal fails once the engine has written its files (tests/pretrain, tests/finetune).
FAIL_PREEMPTION_SAVE_ENV = "PTFT_FAIL_PREEMPTION_SAVE"


class PreemptionHandler:
    """SIGUSR1/SIGTERM → a flag; :meth:`should_stop` agrees on it across ranks at step boundaries.

    Usage (every rank)::

        with PreemptionHandler() as pre:
            for step in ...:
                train_step()
                if pre.should_stop():            # collective: call it on every rank, every step
                    ckpt.save(engine, step, state)
                    exit_for_requeue(cfg.checkpoint)   # sys.exit(requeue_exit_code)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum  # nothing else: we are inside an arbitrary bytecode

    def install(self) -> PreemptionHandler:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """This rank got a signal (local; use :meth:`should_stop` to decide)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank if any rank got a signal. A collective (all-reduce of one number):
        every rank must call it at the same step."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=collective_device())
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item() > 0)
        if stop and self.received is None:
            self.received = -1  # learned from another rank
        return stop


def exit_for_requeue(ckpt_cfg: CheckpointConfig) -> None:
    """After the preemption save: leave the process group cleanly and exit with
    ``checkpoint.requeue_exit_code`` (the job script requeues on that status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    sys.exit(ckpt_cfg.requeue_exit_code)


def preemption_save(checkpoints: CheckpointManager, engine: Any, step: int, client_state: dict,
                    extra_files: Optional[Callable[[Path], list[Path]]] = None) -> Optional[Path]:
    """The checkpoint after a signal (every rank calls it); the saved step dir, or None when the save
    failed. A failure is logged, not raised: ``latest`` still names the previous checkpoint, and the
    caller must still exit with the requeue code, so the scheduler requeues the job and the rerun
    resumes from that checkpoint instead of the job ending as failed (docs/design.md, guarantee 6)."""
    try:
        return checkpoints.save(_maybe_failing(engine, checkpoints.rank), step, client_state, extra_files)
    except CheckpointError as exc:
        if checkpoints.rank == 0:
            log.error("the checkpoint after the signal failed: %s", exc)
        return None


class _FailingSave:
    """The test hook's engine: writes the real files (collectives included), then reports a failure."""

    def __init__(self, engine: Any):
        self.engine = engine

    def save_checkpoint(self, ckpt_dir: Any, tag: str, client_state: dict) -> list:
        self.engine.save_checkpoint(ckpt_dir, tag, client_state)
        raise OSError(f"injected failure ({FAIL_PREEMPTION_SAVE_ENV})")


def _maybe_failing(engine: Any, rank: int) -> Any:
    spec = os.environ.get(FAIL_PREEMPTION_SAVE_ENV, "").strip()
    return _FailingSave(engine) if spec in ("all", str(rank)) else engine
