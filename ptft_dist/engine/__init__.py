"""Training engines: one interface (``engine/base.py``) over DeepSpeed and Accelerate.

    engine/base.py        Engine interface, precision / global-batch checks, EngineConfigError
    engine/ds_config.py   the DeepSpeed config: shipped templates (ds_configs/*.json) + "auto" filling
    engine/deepspeed.py   DeepSpeedEngine (ZeRO 0-3, offload), process-group bring-up
    engine/accelerate.py  AccelerateEngine (DDP, or Accelerate's DeepSpeed plugin on GPU)
    engine/schedule.py    learning-rate schedules (lr_lambda)
    engine/memory.py      bytes of training state per rank (the engine tests' partitioning check)

:func:`build_engine` lives here rather than in base.py because it must import both backends,
which import base.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Optional

import torch

from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.engine.accelerate import AccelerateEngine
from ptft_dist.engine.base import Engine, EngineConfigError
from ptft_dist.engine.deepspeed import (
    DeepSpeedEngine,
    ensure_process_group,
    model_init_context,
    return_freed_buffers_to_os,
)
from ptft_dist.engine.ds_config import resolve_deepspeed_config

__all__ = ["Engine", "EngineConfigError", "build_engine", "model_build_context"]


def model_build_context(cfg_train: TrainConfig, cfg_optim: OptimConfig, world_size: int, device: torch.device,
                        hidden_size: Optional[int] = None) -> contextlib.AbstractContextManager:
    """What the model must be built under for this engine: DeepSpeed ZeRO-3 partitions it while it is
    created (``deepspeed.zero.Init``, so a rank's peak memory is its share of the model, never the
    whole); every other engine takes a model built whole. Resolves (and so checks) the DeepSpeed
    config first, the same one :func:`build_engine` resolves later."""
    if cfg_train.backend != "deepspeed":
        return contextlib.nullcontext()
    device = torch.device(device)
    ds_config = resolve_deepspeed_config(cfg_train, cfg_optim, world_size, device, hidden_size=hidden_size)
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return contextlib.nullcontext()
    ensure_process_group(world_size, device)
    if device.type == "cpu":
        return_freed_buffers_to_os()
    return model_init_context(ds_config)


def build_engine(model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device) -> Engine:
    """The engine for ``cfg_train.backend``. ``lr_lambda(step)`` multiplies optim.lr (LambdaLR)."""
    device = torch.device(device)
    if cfg_train.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg_train, cfg_optim, lr_lambda, world_size, device)
    if cfg_train.backend == "accelerate":
        return AccelerateEngine(model, cfg_train, cfg_optim, lr_lambda, world_size, device)
    raise EngineConfigError(f"train.backend: {cfg_train.backend!r} is not one of deepspeed, accelerate")
