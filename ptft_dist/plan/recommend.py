"""For each ZeRO stage (and offload): what fits, the largest micro-batch, the micro-batch × accumulation
that makes the requested global batch, its step time; the stage to use; scaling from 1 to N nodes.

The micro-batch chosen is the largest divisor of the per-rank batch (global ÷ ranks) that fits, so
the global batch is exactly the one asked for; the recommended option is the fastest that fits
(within 5%, the lower stage: fewer collectives, simpler checkpoints, and the per-parameter hook
overhead of ZeRO-3 is not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ptft_dist.plan.comms import Topology
from ptft_dist.plan.hardware import GIB, PlanInputError
from ptft_dist.plan.memory import MemoryEstimate, estimate, largest_micro_batch
from ptft_dist.plan.steptime import Compute, StepTime, step_time
from ptft_dist.plan.workload import Workload

# (stage, offload optimizer, offload params, label)
OPTIONS: tuple[tuple[int, bool, bool, str], ...] = (
    (0, False, False, "zero0"), (1, False, False, "zero1"), (2, False, False, "zero2"),
    (3, False, False, "zero3"), (2, True, False, "zero2+offload"), (3, True, True, "zero3+offload"),
)
TIE = 0.05  # ZeRO-3 hook overhead (per-parameter gathers in Python) is not modelled: prefer simpler stages


@dataclass(frozen=True)
class Option:
    label: str
    stage: int
    offload: bool
    offload_params: bool
    max_micro_batch: int  # 0: does not fit even one sample
    micro_batch: int  # chosen (0 when it does not fit)
    grad_accum: int
    memory: MemoryEstimate  # at the chosen micro-batch (at 1 when nothing fits)
    step: StepTime | None

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


@dataclass(frozen=True)
class Job:
    """Everything fixed by the request: the workload, where it runs, the batch, the compute rate."""

    workload: Workload
    topo: Topology
    global_batch: int
    capacity: float  # bytes a rank may use
    compute: Compute
    overlap: bool
    on_cpu: bool
    stage0_only: str = ""  # why only ZeRO-0 can run this config (LAMB), or ""

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.topo.ranks


def check_divisible(global_batch: int, ranks: int) -> None:
    if global_batch < ranks or global_batch % ranks:
        raise PlanInputError(f"global batch {global_batch} is not divisible by the {ranks} ranks "
                             f"(nodes × gpus-per-node); use a multiple of {ranks}")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 0
    for d in range(1, int(n**0.5) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


def evaluate(job: Job, stage: int, offload: bool, offload_params: bool, label: str,
             micro_batch: int | None = None) -> Option:
    """One option at the largest micro-batch that fits (or the given one)."""
    w, ranks = job.workload, job.topo.ranks
    kw = {"on_cpu": job.on_cpu, "offload": offload, "offload_params": offload_params}
    max_mb = largest_micro_batch(w, stage, ranks, job.capacity, **kw)
    mb = micro_batch if micro_batch else _largest_divisor_at_most(job.per_rank, max_mb)
    if mb <= 0:
        return Option(label, stage, offload, offload_params, max_mb, 0, 0, estimate(w, stage, ranks, 1, **kw), None)
    accum = max(1, job.per_rank // mb)
    st = step_time(w, job.topo, stage, mb, accum, job.compute, overlap=job.overlap, offload=offload)
    return Option(label, stage, offload, offload_params, max_mb, mb, accum, estimate(w, stage, ranks, mb, **kw), st)


def all_options(job: Job) -> list[Option]:
    opts = [evaluate(job, *o) for o in OPTIONS if not (job.stage0_only and o[0] > 0)]
    if not any(o.fits for o in opts):
        best = min(opts, key=lambda o: o.memory.total)
        raise PlanInputError(
            f"does not fit at any micro-batch: {best.label} at micro-batch 1 needs {best.memory.total / GIB:.2f} GiB "
            f"per rank, a rank has {job.capacity / GIB:.2f} GiB ({(best.memory.total - job.capacity) / GIB:.2f} GiB "
            f"short); use more memory per rank, a shorter data.max_seq_len or a smaller model")
    return opts


def recommend(options: list[Option]) -> Option:
    fitting = [o for o in options if o.fits and o.step is not None]
    fastest = min(o.step.step_s for o in fitting)  # type: ignore[union-attr]
    close = [o for o in fitting if o.step.step_s <= fastest * (1 + TIE)]  # type: ignore[union-attr]
    return min(close, key=lambda o: (o.offload, o.stage))


@dataclass(frozen=True)
class ScalePoint:
    nodes: int
    ranks: int
    option: Option | None  # None: the global batch does not divide over these ranks
    efficiency: float | None  # tokens/s per node ÷ that of the smallest node count that fits


def scaling(job: Job, chosen: Option, node_counts: list[int]) -> list[ScalePoint]:
    """The chosen stage on 1..N nodes at the same global batch (accumulation shrinks as nodes grow)."""
    points: list[ScalePoint] = []
    base_per_node = None  # tokens/s per node at the smallest node count that fits
    for k in node_counts:
        topo = replace(job.topo, nodes=k)
        sub = replace(job, topo=topo)
        if job.global_batch % topo.ranks:
            points.append(ScalePoint(k, topo.ranks, None, None))
            continue
        opt = evaluate(sub, chosen.stage, chosen.offload, chosen.offload_params, chosen.label)
        if not opt.fits or opt.step is None:
            points.append(ScalePoint(k, topo.ranks, opt, None))
            continue
        tps = opt.step.tokens_per_s
        if base_per_node is None:
            base_per_node = tps / k
        points.append(ScalePoint(k, topo.ranks, opt, tps / (k * base_per_node)))
    return points


def node_counts(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n itself included)."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    out.append(n)
    return out
