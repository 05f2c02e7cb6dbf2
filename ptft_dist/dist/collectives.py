"""The small collectives every stage needs, written once: they work unchanged without a process
group (one process), on gloo (CPU) and on NCCL (GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_object(obj: Any) -> list:
    """Every rank's ``obj`` on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(values: Sequence[float] | float) -> list[float] | float:
    """Sum of numbers over ranks (float64: exact for counts below 2**53)."""
    scalar = isinstance(values, (int, float))
    t = torch.tensor([values] if scalar else list(values), dtype=torch.float64, device=collective_device())
    if is_distributed():
        dist.all_reduce(t)
    out = t.tolist()
    return out[0] if scalar else out


def all_max(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def mean_over_ranks(values: Sequence[torch.Tensor]) -> float:
    """Mean of this rank's ``values``, averaged over ranks (each rank weighs the same)."""
    t = torch.stack(list(values)).double().mean() if values else torch.zeros((), dtype=torch.float64)
    t = t.to(collective_device())
    if is_distributed():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def agree_on_error(error: str) -> str:
    """Every rank learns every rank's error (empty string: none), so all raise together instead of
    some ranks waiting forever in the next collective. Returns "" or "rank R: message | ..."."""
    errors = gather_object(error)
    if len(errors) == 1:
        return errors[0]
    return " | ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
