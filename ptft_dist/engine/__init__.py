"""Training engines: one interface (``engine/base.py``) over DeepSpeed and Accelerate.

    engine/base.py        Engine interface, precision / global-batch checks, EngineConfigError
    engine/ds_config.py   the DeepSpeed config: shipped templates (ds_configs/*.json) + "auto" filling
    engine/deepspeed.py   DeepSpeedEngine (ZeRO 0-3, offload), process-group bring-up
    engine/accelerate.py  AccelerateEngine (DDP, or Accelerate's DeepSpeed plugin on GPU)
    engine/schedule.py    learning-rate schedules (lr_lambda)
    engine/memory.py      bytes of training state per rank

:func:`build_engine` lives here rather than in base.py because it must import both backends,
which import base.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.engine.accelerate import AccelerateEngine
from ptft_dist.engine.base import Engine, EngineConfigError
from ptft_dist.engine.deepspeed import DeepSpeedEngine

__all__ = ["Engine", "EngineConfigError", "build_engine"]


def build_engine(model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device) -> Engine:
    """The engine for ``cfg_train.backend``. ``lr_lambda(step)`` multiplies optim.lr (LambdaLR)."""
    device = torch.device(device)
    if cfg_train.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg_train, cfg_optim, lr_lambda, world_size, device)
    if cfg_train.backend == "accelerate":
        return AccelerateEngine(model, cfg_train, cfg_optim, lr_lambda, world_size, device)
    raise EngineConfigError(f"train.backend: {cfg_train.backend!r} is not one of deepspeed, accelerate")
