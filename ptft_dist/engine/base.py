"""The one training-engine interface the loops talk to, and the checks every backend shares.

The pretraining and fine-tuning loops only ever call :class:`Engine`::

    engine = build_engine(model, cfg.train, cfg.optim, lr_lambda, world_size, device)
    out = engine.forward(**batch)          # micro-batch; tensors are moved to engine.device
    engine.backward(out.loss)              # loss of ONE micro-batch (1/grad_accum scaling is inside)
    boundary = engine.is_accumulation_boundary
    engine.step()                          # optimizer + LR scheduler step only at the boundary
    if boundary: log(engine.lr, engine.grad_norm, engine.loss_scale)

Semantics are DeepSpeed's: ``is_accumulation_boundary`` is read *between* ``backward`` and
``step`` and says whether that ``step()`` will update the weights. The backends live in
``engine/deepspeed.py`` and ``engine/accelerate.py``; ``build_engine`` (``engine/__init__.py``)
picks one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ptft_dist.config import TrainConfig
from ptft_dist.errors import UserError
from ptft_dist.fsutil import write_json_atomic
from ptft_dist.log import get_logger

log: logging.Logger = get_logger("engine")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLIENT_KEY = "ptft_client_state"  # the loop's client_state inside the backend's checkpoint files


class EngineConfigError(UserError, ValueError):
    """A run config / DeepSpeed JSON combination that cannot work (names the keys involved)."""


# --------------------------------------------------------------------------- precision / batch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in DTYPES:
        raise EngineConfigError(f"train.precision: {precision!r} is not one of auto, fp32, bf16, fp16")
    if device.type == "cpu" and precision != "fp32":
        log.warning("train.precision=%s on CPU: correct but very slow (CPU runs should use fp32)", precision)
    return precision


def check_global_batch(cfg_train: TrainConfig, world_size: int) -> int:
    """micro × accum × world; must equal ``train.global_batch_size`` when that is set, so a run
    moved to another world size fails early instead of silently training on another batch size."""
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(cfg_train, key) < 1:
            raise EngineConfigError(f"train.{key} must be >= 1, got {getattr(cfg_train, key)}")
    if world_size < 1:
        raise EngineConfigError(f"world size must be >= 1, got {world_size}")
    got = cfg_train.micro_batch_size * cfg_train.grad_accum * world_size
    want = cfg_train.global_batch_size
    if want and want != got:
        per = cfg_train.micro_batch_size * world_size
        hint = (f"; with {world_size} ranks use train.grad_accum={want // per}" if want % per == 0
                else f"; {want} is not a multiple of micro_batch_size × world size = {per}")
        raise EngineConfigError(
            f"train.global_batch_size={want} != train.micro_batch_size {cfg_train.micro_batch_size} × "
            f"train.grad_accum {cfg_train.grad_accum} × world size {world_size} = {got}{hint}")
    return got


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """BERT convention: no weight decay on biases and norm weights (every 1-D parameter). The shape
    is the full one: a parameter built under ZeRO-3's ``zero.Init`` holds an empty 1-D placeholder
    and keeps its real shape in ``ds_shape``."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------- the interface


class Engine:
    """Backend-independent training engine (see the module docstring for the call order)."""

    backend: str
    module: torch.nn.Module
    device: torch.device
    precision: torch.dtype
    precision_name: str
    world_size: int
    rank: int
    zero_stage: int  # 0 for Accelerate/DDP
    grad_accum: int  # micro-batches per optimizer step
    ds_config: Optional[dict]  # the resolved DeepSpeed config (None for Accelerate/DDP)
    _grad_norm: Optional[float]
    _global_step: int

    # -- training
    def forward(self, **batch: Any) -> Any:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def is_accumulation_boundary(self) -> bool:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    @property
    def grad_norm(self) -> Optional[float]:
        """2-norm of the (averaged, unclipped) gradient at the last optimizer step."""
        return self._grad_norm

    @property
    def loss_scale(self) -> Optional[float]:
        return None

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return self._global_step

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.train(False)

    def _move(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    # -- checkpoints
    def save_checkpoint(self, ckpt_dir: str | Path, tag: str, client_state: dict) -> list[Path]:
        """Every rank calls it. Writes ``ckpt_dir/tag/``; returns the files THIS rank wrote.
        Raises OSError on the rank whose write failed (only after all collectives are done)."""
        raise NotImplementedError

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str) -> dict:
        raise NotImplementedError

    def _meta(self) -> dict:
        """What a later run must know before loading: written as ``ptft_meta.json`` by rank 0."""
        return {"backend": self.backend, "zero_stage": self.zero_stage, "world_size": self.world_size,
                "precision": self.precision_name, "global_step": self.global_step,
                "torch": torch.__version__, "saved_at": time.time()}

    # -- introspection
    def state_memory_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state (master weights + moments) held by
        THIS rank right now, from the engine's own partitions/buffers (distinct storages). Call it
        between backward() and step() for the peak (gradients present, optimizer state created)."""
        raise NotImplementedError

    def full_parameter(self, name: str) -> torch.Tensor:
        """Full fp32 value of parameter ``name`` on every rank (a collective under ZeRO-3)."""
        raise NotImplementedError

    def full_optimizer_state(self, name: str, key: str) -> Optional[torch.Tensor]:
        """Full optimizer state ``key`` (exp_avg, exp_avg_sq) of parameter ``name`` (collective under ZeRO-3)."""
        raise NotImplementedError

    def save_ds_config(self, path: str | Path) -> Optional[Path]:
        """Write the resolved DeepSpeed config beside the run (None for plain DDP)."""
        if self.ds_config is None:
            return None
        return write_json_atomic(path, self.ds_config, indent=2, sort_keys=True)
