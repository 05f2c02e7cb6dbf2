"""Step time = compute + the exposed part of communication (+ the host optimizer step under offload).

compute = FLOPs of the step's real tokens ÷ (peak × MFU), with the MFU from a named measured run
(:data:`ptft_dist.plan.hardware.MEASURED_MFU`), ``--mfu``, or ``--calibrate RUN_DIR``: a real
``ptft pretrain`` run's own throughput (``metrics.jsonl``), which gives the achieved FLOP/s of a
rank directly (on one host its step has no communication). Communication is
:mod:`ptft_dist.plan.comms`; with ``overlap_comm`` (on for CUDA, DeepSpeed cannot overlap on CPU)
gradient reduction hides behind the backward pass (2/3 of the compute) of the micro-batches it
runs in, and ZeRO-3's gathers (prefetched) behind forward and backward; the rest is exposed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ptft_dist.plan.comms import CommPlan, Topology, collective_seconds, comm_plan
from ptft_dist.plan.hardware import Accelerator, Interconnect, PlanInputError
from ptft_dist.plan.workload import Workload

BACKWARD_SHARE = 2.0 / 3.0  # backward = 2× forward FLOPs
HOST_ADAM_GBYTE_S = 10.0  # CPU Adam under offload: ~16 B read+written per parameter at ~10 GB/s
PCIE_GBYTE_S = 25.0  # offload: gradients down, parameters up (PCIe 4 x16 ~25 GB/s achieved)
# A calibration run is one node: no inter-node link (only its intra-node hop is used).
LOOPBACK = Interconnect("none", 0.0, 2.0, 1.0, 1, "one node: no inter-node link")


@dataclass(frozen=True)
class Compute:
    """How fast one rank computes, and where that number comes from."""

    flops_per_s: float  # achieved, per rank (real tokens × FLOPs per token / second)
    tokens_per_sample: float  # real tokens per sample the FLOPs are counted on
    source: str


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    offload_s: float
    tokens_per_step: float  # all ranks, real tokens
    comm: CommPlan

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else 0.0


def _exposed(plan: CommPlan, topo: Topology, compute_s: float, accum: int, overlap: bool) -> tuple[float, float]:
    """(all communication seconds, the exposed part)."""
    total = exposed = 0.0
    hidden_window = 0.0
    hideable = 0.0
    for c in plan.collectives:
        t = collective_seconds(c, topo)
        total += t
        if overlap and c.overlappable:
            hideable += t
            if plan.stage == 3:
                hidden_window = compute_s
            elif plan.stage == 2:
                hidden_window = BACKWARD_SHARE * compute_s
            else:  # ZeRO-1: only the last micro-batch's backward reduces
                hidden_window = BACKWARD_SHARE * compute_s / accum
        else:
            exposed += t
    return total, exposed + max(0.0, hideable - hidden_window)


def step_time(w: Workload, topo: Topology, stage: int, micro_batch: int, grad_accum: int, compute: Compute, *,
              overlap: bool, offload: bool = False) -> StepTime:
    """Seconds of one optimizer step of the whole job."""
    tokens_rank = micro_batch * grad_accum * compute.tokens_per_sample
    compute_s = tokens_rank * w.flops_per_token / compute.flops_per_s
    plan = comm_plan(w, stage, topo.ranks, grad_accum)
    total, exposed = _exposed(plan, topo, compute_s, grad_accum, overlap)
    offload_s = 0.0
    if offload:
        part = w.trainable / max(topo.ranks, 1)
        offload_s = part * 16 / (HOST_ADAM_GBYTE_S * 1e9) + part * 2 * w.dtype_bytes / (PCIE_GBYTE_S * 1e9)
    return StepTime(compute_s=compute_s, comm_s=total, exposed_comm_s=exposed, offload_s=offload_s,
                    tokens_per_step=tokens_rank * topo.ranks, comm=plan)


# --------------------------------------------------------------------------- calibration


def calibrate_from_run(run_dir: str | Path, accel: Accelerator) -> Compute:
    """The achieved FLOP/s of one rank from a real one-node run's ``metrics.jsonl`` (the median step
    over its logged windows, the first one -- warm-up -- left out), with its FLOPs per token from the
    run's own ``resolved_config.yaml``. A one-node run of several ranks has the same contention for
    the node as the job being planned; its own intra-node communication (predicted, exposed part) is
    taken out of its step time, so what remains is compute."""
    from ptft_dist.config import load_config
    from ptft_dist.plan.workload import build_workload

    run = Path(run_dir)
    path, resolved = run / "metrics.jsonl", run / "resolved_config.yaml"
    if not path.is_file() or not resolved.is_file():
        raise PlanInputError(f"--calibrate {run_dir}: needs metrics.jsonl and resolved_config.yaml "
                             f"(a `ptft pretrain` run directory)")
    cfg = load_config(resolved)
    w = build_workload(cfg, accel.key)
    rows = [r for r in _jsonl(path) if r.get("split", "train") == "train" and r.get("tokens_per_s")
            and r.get("step_time_s")]
    if len(rows) < 2:
        raise PlanInputError(f"--calibrate {run_dir}: needs at least 2 logged training windows, found {len(rows)}")
    rows = rows[1:]
    last = rows[-1]
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    world = max(1, round(last["samples_per_s"] * last["step_time_s"] / (mb * accum)))
    tokens_per_sample = float(last["consumed_tokens"]) / max(float(last["consumed_samples"]), 1.0)
    step_s = statistics.median(r["step_time_s"] for r in rows)
    own = Topology(1, world, accel, LOOPBACK, 1)
    plan = comm_plan(w, cfg.train.zero_stage, world, accum)
    overlap = accel.key != "cpu"
    compute_guess = max(step_s - sum(collective_seconds(c, own) for c in plan.collectives), 0.5 * step_s)
    _, exposed = _exposed(plan, own, compute_guess, accum, overlap)
    compute_s = max(step_s - exposed, 0.5 * step_s)
    flops = mb * accum * tokens_per_sample * w.flops_per_token / compute_s
    return Compute(flops, tokens_per_sample,
                   f"calibrated: {run_dir} ({len(rows)} windows, {world} rank(s) on one node, median step "
                   f"{step_s * 1e3:.0f} ms of which {exposed * 1e3:.0f} ms its own communication, "
                   f"{tokens_per_sample:.1f} tokens/sample)")


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
