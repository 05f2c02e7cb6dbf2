"""Stop a diverged run instead of training on, and saving, NaN (docs/design.md, guarantees 5 and 9).

A non-finite loss (an ``optim.lr`` far too high, a NaN in ``model.init_from``, an fp32 overflow)
makes every later step NaN too; left alone the run ends with exit 0 and a ``latest`` checkpoint
of NaN weights, which ``ptft convert`` then exports. :class:`NonFiniteGuard` checks, every step,
the loss of every micro-batch on every rank and the gradient norm (one all-reduce, so all ranks
stop at the same step and none waits in a collective), and before every save the weights
themselves (a step's update can turn finite-loss weights into NaN: only the next forward would
show it). With fp16 dynamic loss scaling an overflowing gradient is expected (the engine skips
that step), so only the loss counts there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch

from ptft_dist.dist.collectives import all_sum
from ptft_dist.errors import UserError

ADVICE = "lower optim.lr (or raise optim.warmup_steps), check model.init_from, and resume from the last checkpoint"


class DivergedError(UserError, RuntimeError):
    """The loss, gradients or weights became NaN or infinite; the message names the step."""


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of this rank's parameters holding a NaN or inf (ZeRO-3: this rank's partition)."""
    bad = []
    for name, p in module.named_parameters():
        local = getattr(p, "ds_tensor", None)
        t = local if local is not None and local.numel() else p.data
        if t.numel() and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


class NonFiniteGuard:
    """Collects this rank's micro-batch losses of a step without a device sync; :meth:`check_step`
    and :meth:`check_weights` are collectives (every rank, same step)."""

    def __init__(self) -> None:
        self._bad: Optional[torch.Tensor] = None
        self._loss_sum: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        self._bad = bad if self._bad is None else self._bad | bad
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def check_step(self, step: int, engine: Any, latest: Callable[[], Optional[str]]) -> None:
        """Raise :class:`DivergedError` on every rank if any rank's loss (or the gradient norm) of
        step ``step`` was not finite. ``latest`` is only called then (it reads the run dir)."""
        bad_loss = float(self._bad) if self._bad is not None else 0.0
        loss = float(self._loss_sum) if self._loss_sum is not None else 0.0
        self._bad = self._loss_sum = None
        grad_norm = engine.grad_norm
        scaled = engine.loss_scale is not None  # fp16: overflow steps are skipped by the engine
        bad_grad = 0.0 if scaled or grad_norm is None or math.isfinite(grad_norm) else 1.0
        bad_loss_ranks, bad_grad_ranks = all_sum([bad_loss, bad_grad])
        if bad_loss_ranks or bad_grad_ranks:
            what = "loss" if bad_loss_ranks else "gradient norm"
            raise DivergedError(
                f"non-finite {what} at step {step} (loss {loss:.4g} on this rank, grad norm {grad_norm}; "
                f"{int(bad_loss_ranks)} rank(s) with a non-finite loss): the run stopped without saving it; "
                f"{_latest(latest)}; {ADVICE}")

    def check_weights(self, step: int, module: torch.nn.Module, latest: Callable[[], Optional[str]]) -> None:
        """Before a save: raise on every rank if any rank holds a non-finite weight."""
        bad = non_finite_parameters(module)
        if all_sum(float(len(bad))):
            names = ", ".join(bad[:3]) if bad else "on another rank"
            raise DivergedError(f"non-finite weights after step {step} ({names}): not saved; {_latest(latest)}; "
                                f"{ADVICE}")


def _latest(latest: Callable[[], Optional[str]]) -> str:
    tag = latest()
    return f"latest is still {tag}" if tag else "no checkpoint was saved"
