"""Pretraining metrics: loss and accuracy sums over a window of steps, and the validation pass.

Sums stay on the device until a log step, then one all-reduce brings every rank's into one
number each: the loop syncs the host once per log interval, not once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ptft_dist.dist.collectives import all_sum, world_size
from ptft_dist.pretrain.model import PretrainOutput, model_inputs


@dataclass
class Window:
    """Sums over the steps since the last log line (tensors stay on the device until then)."""

    loss: list = field(default_factory=list)
    mlm_loss: list = field(default_factory=list)
    nsp_loss: list = field(default_factory=list)
    counts: torch.Tensor | None = None  # mlm_correct, mlm_count, nsp_correct, nsp_count

    def add(self, out: PretrainOutput) -> None:
        self.loss.append(out.loss.detach())
        self.mlm_loss.append(out.mlm_loss)
        if out.nsp_loss is not None:
            self.nsp_loss.append(out.nsp_loss)
        zero = out.mlm_count.new_zeros(())
        c = torch.stack([out.mlm_correct, out.mlm_count,
                         out.nsp_correct if out.nsp_correct is not None else zero,
                         out.nsp_count if out.nsp_count is not None else zero]).double()
        self.counts = c if self.counts is None else self.counts + c

    def reduce(self) -> dict[str, float]:
        """Means over the window and over all ranks (one all-reduce); each rank's mean weighs the same."""
        means = [torch.stack(x).double().mean() if x else torch.zeros((), dtype=torch.float64, device=self.counts.device)
                 for x in (self.loss, self.mlm_loss, self.nsp_loss)]
        packed = all_sum(torch.cat([torch.stack(means), self.counts]).tolist())
        ranks = world_size()
        loss, mlm, nsp = (v / ranks for v in packed[:3])
        mlm_ok, mlm_n, nsp_ok, nsp_n = packed[3:]
        out = {"loss": loss, "mlm_loss": mlm, "mlm_acc": mlm_ok / max(mlm_n, 1)}
        if nsp_n:
            out.update(nsp_loss=nsp, nsp_acc=nsp_ok / nsp_n)
        return out


def evaluate(engine, loader, max_batches: int) -> dict[str, float]:
    """MLM loss/accuracy/perplexity and NSP accuracy on the fixed validation stream (every rank
    calls it: the result is reduced over ranks). Empty when the stream has no batch."""
    engine.eval()
    window = Window()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            window.add(engine.forward(**model_inputs(batch)))
    engine.train()
    if window.counts is None:
        return {}
    m = window.reduce()
    m["perplexity"] = math.exp(min(m["mlm_loss"], 50.0))
    return m


def format_eval(step: int, metrics: dict[str, float]) -> str:
    """The console line of one validation pass."""
    line = (f"eval step {step}: mlm_loss {metrics['mlm_loss']:.4f} mlm_acc {metrics['mlm_acc']:.4f} "
            f"ppl {metrics['perplexity']:.1f}")
    return line + (f" nsp_acc {metrics['nsp_acc']:.4f}" if "nsp_acc" in metrics else "")
