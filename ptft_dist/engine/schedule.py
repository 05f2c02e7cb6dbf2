"""Learning-rate schedules as a multiplier of the peak lr, wrapped in a torch ``LambdaLR``.

A torch scheduler (not DeepSpeed's own) so the same object drives the DeepSpeed and the
Accelerate paths: each engine wraps :func:`lr_lambda` in a ``LambdaLR`` over the optimizer it
builds (``deepspeed.initialize(lr_scheduler=...)`` then steps it after every optimizer step).

Step convention: ``f(s)`` is the multiplier for optimizer step ``s`` (0-based; ``LambdaLR`` calls
``f(0)`` at construction, ``f(1)`` after the first ``scheduler.step()``, ...).

* warmup (all schedules): ``(s + 1) / W`` for ``s < W`` -- the first step already learns, step
  ``W - 1`` is at the peak. Then, with ``p = (s - W) / (max_steps - W)`` (0 at the end of warmup,
  1 at ``max_steps``) and ``r = min_lr_ratio``:
* ``linear``: ``r + (1 - r)(1 - p)``
* ``cosine``: ``r + (1 - r)(1 + cos(pi p)) / 2``
* ``constant``: 1
* ``wsd`` (warmup-stable-decay): 1 until the last ``D = round(decay_fraction · max_steps)`` steps,
  then the **1-sqrt** decay ``r + (1 - r)(1 - sqrt(q))`` with ``q`` going 0 → 1 over those steps.
  1-sqrt rather than linear: Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations") find it matches cosine where linear decay falls short.

The closure is deliberately a plain function: ``LambdaLR.state_dict()`` then stores only the step
count, so a resumed run follows the schedule of its (possibly edited) config, not a pickled one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ptft_dist.config import ConfigError, OptimConfig

SCHEDULES = ("linear", "cosine", "wsd", "constant")


def _check(optim_cfg: OptimConfig, max_steps: int) -> None:
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ConfigError(f"train.max_steps must be a positive integer, got {max_steps!r}")
    if optim_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {optim_cfg.schedule!r} is not one of {list(SCHEDULES)}")
    if optim_cfg.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim_cfg.warmup_steps}")
    if optim_cfg.warmup_steps > max_steps:
        raise ConfigError(f"optim.warmup_steps ({optim_cfg.warmup_steps}) is larger than train.max_steps ({max_steps})")
    if not 0.0 <= optim_cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {optim_cfg.min_lr_ratio}")
    if optim_cfg.schedule == "wsd":
        if not 0.0 < optim_cfg.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {optim_cfg.decay_fraction}")
        decay = round(optim_cfg.decay_fraction * max_steps)
        if optim_cfg.warmup_steps + decay > max_steps:
            raise ConfigError(
                f"optim.decay_fraction ({optim_cfg.decay_fraction}) × train.max_steps ({max_steps}) = {decay} "
                f"decay steps do not fit after optim.warmup_steps ({optim_cfg.warmup_steps})"
            )


def lr_lambda(optim_cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak lr for each optimizer step (see the module docstring)."""
    _check(optim_cfg, max_steps)
    warmup, floor, kind = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio, optim_cfg.schedule
    span = max(1, max_steps - warmup)
    decay_steps = max(1, round(optim_cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        if kind == "wsd":
            if step < decay_start:
                return 1.0
            q = min(1.0, (step - decay_start) / decay_steps)
            return floor + (1.0 - floor) * (1.0 - math.sqrt(q))
        p = min(1.0, (step - warmup) / span)
        if kind == "linear":
            return floor + (1.0 - floor) * (1.0 - p)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))  # cosine

    return f

