"""``ptft plan``: from a pretraining config and a cluster shape to a plan -- per ZeRO stage the memory
per rank, what fits, the step time and tokens/s; the recommended stage, micro-batch and
accumulation; scaling from 1 to N nodes; the ``sbatch`` line. Nothing runs, nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptft_dist.config import Config
from ptft_dist.plan.comms import Topology, collective_seconds
from ptft_dist.plan.hardware import (
    GIB,
    PlanInputError,
    accelerator,
    host_memory_gib,
    interconnect,
    mfu_for,
)
from ptft_dist.plan.recommend import (
    Job,
    Option,
    all_options,
    check_divisible,
    evaluate,
    node_counts,
    recommend,
    scaling,
)
from ptft_dist.plan.steptime import Compute, calibrate_from_run
from ptft_dist.plan.workload import build_workload


@dataclass(frozen=True)
class PlanRequest:
    """The command line of ``ptft plan`` (besides the config)."""

    nodes: int
    gpus_per_node: int
    gpu: str
    interconnect: str = "ib400"
    nics_per_node: int | None = None
    global_batch: int | None = None
    mfu: float | None = None
    calibrate: str | None = None
    memory_gib: float | None = None
    config_path: str | None = None


def _peak_flops(accel_key: str, device_name: str, precision: str) -> tuple[float, str]:
    import torch

    from ptft_dist.metrics.throughput import device_peak_flops, gpu_peak_tflops

    if accel_key == "cpu":
        return device_peak_flops(torch.device("cpu"), torch.float32)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tflops = gpu_peak_tflops(device_name, dtype)
    if tflops is None:
        raise PlanInputError(f"no peak FLOP/s known for {device_name}")
    return tflops * 1e12, f"table: {device_name} {precision} (ptft_dist/metrics/throughput.py)"


def _compute(req: PlanRequest, accel: Any, w: Any) -> tuple[Compute, dict]:
    accel_key = accel.key
    peak, peak_source = _peak_flops(accel_key, accel.device_name, w.precision)
    if req.calibrate:
        c = calibrate_from_run(req.calibrate, accel)
        return c, {"peak_flops": peak, "peak_source": peak_source, "mfu": c.flops_per_s / peak, "ours": True}
    if req.mfu is not None:
        if not 0 < req.mfu <= 1:
            raise PlanInputError(f"--mfu {req.mfu}: must be in (0, 1]")
        src = f"--mfu {req.mfu} (given)"
        mfu, ours = req.mfu, False
    else:
        m = mfu_for(accel_key, w.precision)
        mfu, src, ours = m.mfu, m.source, m.ours
    return (Compute(peak * mfu, float(w.seq_len), f"MFU {mfu:.1%} of {peak / 1e12:.3g} TFLOP/s; {src}"),
            {"peak_flops": peak, "peak_source": peak_source, "mfu": mfu, "ours": ours})


def _capacity(req: PlanRequest, accel: Any) -> float:
    if req.memory_gib is not None:
        if req.memory_gib <= 0:
            raise PlanInputError(f"--memory-gib {req.memory_gib}: must be positive")
        return req.memory_gib * GIB
    if accel.key == "cpu":
        return host_memory_gib() * GIB / req.gpus_per_node
    return accel.memory_gib * GIB


def _global_batch(cfg: Config, req: PlanRequest, ranks: int) -> int:
    if req.global_batch:
        gb = req.global_batch
    elif cfg.train.global_batch_size:
        gb = cfg.train.global_batch_size
    else:
        gb = cfg.train.micro_batch_size * cfg.train.grad_accum * ranks
    check_divisible(gb, ranks)
    return gb


def _overlap_comm(cfg: Config, on_cpu: bool) -> bool:
    """``zero_optimization.overlap_comm`` as the run will resolve it: the user's DeepSpeed JSON when
    it sets it, else the templates' "auto" (on for CUDA). DeepSpeed never overlaps on CPU."""
    if on_cpu:
        return False
    if cfg.train.deepspeed_config:
        try:
            value = json.loads(Path(cfg.train.deepspeed_config).read_text()).get("zero_optimization", {})
            value = value.get("overlap_comm", "auto")
        except (OSError, ValueError, AttributeError) as exc:
            raise PlanInputError(f"train.deepspeed_config: {cfg.train.deepspeed_config}: {exc}") from None
        if isinstance(value, bool):
            return value
    return True


def build_job(cfg: Config, req: PlanRequest) -> tuple[Job, dict]:
    if req.nodes < 1 or req.gpus_per_node < 1:
        raise PlanInputError(f"--nodes {req.nodes} --gpus-per-node {req.gpus_per_node}: both must be >= 1")
    accel = accelerator(req.gpu)
    link = interconnect(req.interconnect)
    nics = req.nics_per_node or link.nics_per_node or req.gpus_per_node
    topo = Topology(req.nodes, req.gpus_per_node, accel, link, nics)
    w = build_workload(cfg, accel.key)
    compute, compute_info = _compute(req, accel, w)
    on_cpu = accel.key == "cpu"
    lamb = ""
    if cfg.optim.name == "lamb":
        if on_cpu:
            raise PlanInputError("optim.name=lamb needs DeepSpeed's FusedLamb, a CUDA op: plan it on a GPU, "
                                 "or use optim.name=adamw on cpu")
        lamb = "optim.name=lamb runs only at ZeRO-0 (its trust ratio is per layer; ZeRO flattens the layers)"
    job = Job(w, topo, _global_batch(cfg, req, topo.ranks), _capacity(req, accel), compute,
              overlap=_overlap_comm(cfg, on_cpu), on_cpu=on_cpu, stage0_only=lamb)
    return job, compute_info


def _configured(job: Job, cfg: Config) -> Option | None:
    t = cfg.train
    mb = t.micro_batch_size
    if job.per_rank % mb:
        return None
    return evaluate(job, t.zero_stage, t.offload_optimizer or t.offload_params, t.offload_params,
                    f"configured (zero{t.zero_stage})", micro_batch=mb)


def option_dict(o: Option, job: Job) -> dict:
    out: dict[str, Any] = {
        "label": o.label, "zero_stage": o.stage, "offload_optimizer": o.offload, "offload_params": o.offload_params,
        "fits": o.fits and o.memory.total <= job.capacity, "max_micro_batch": o.max_micro_batch,
        "micro_batch": o.micro_batch, "grad_accum": o.grad_accum, "memory_gib": o.memory.as_dict(),
    }
    if o.step is not None:
        s = o.step
        out.update(
            compute_s=s.compute_s, comm_s=s.comm_s, exposed_comm_s=s.exposed_comm_s, offload_s=s.offload_s,
            step_s=s.step_s, tokens_per_s=s.tokens_per_s,
            comm={"logged_bytes_by_op": s.comm.by_op(), "wire_bytes_per_rank": s.comm.wire_bytes,
                  "collectives": [dict(asdict(c), seconds=collective_seconds(c, job.topo))
                                  for c in s.comm.collectives]})
    return out


def make_plan(cfg: Config, req: PlanRequest) -> dict:
    """The whole plan as plain data (what ``--json`` prints; the text report renders it)."""
    job, compute_info = build_job(cfg, req)
    options = all_options(job)
    best = recommend(options)
    configured = _configured(job, cfg)
    scale = scaling(job, best, node_counts(req.nodes))
    w, topo = job.workload, job.topo
    return {
        "workload": dict(asdict(w), description=w.describe()),
        "hardware": {"gpu": topo.accel.key, "device_name": topo.accel.device_name, "source": topo.accel.source,
                     "memory_per_rank_gib": job.capacity / GIB, "interconnect": topo.link.key,
                     "interconnect_source": topo.link.source, "link_gbit_s": topo.link.gbit_s,
                     "link_efficiency": topo.link.efficiency, "link_latency_us": topo.link.latency_us,
                     "nics_per_node": topo.nics_per_node},
        "job": {"nodes": topo.nodes, "gpus_per_node": topo.per_node, "ranks": topo.ranks,
                "global_batch": job.global_batch, "per_rank_batch": job.per_rank, "overlap_comm": job.overlap,
                "config": req.config_path, "note": job.stage0_only or None},
        "compute": {"flops_per_s_per_rank": job.compute.flops_per_s, "tokens_per_sample": job.compute.tokens_per_sample,
                    "source": job.compute.source, **compute_info},
        "options": [option_dict(o, job) for o in options],
        "configured": option_dict(configured, job) if configured else None,
        "recommended": option_dict(best, job),
        "scaling": [{"nodes": p.nodes, "ranks": p.ranks,
                     "micro_batch": p.option.micro_batch if p.option else None,
                     "grad_accum": p.option.grad_accum if p.option else None,
                     "step_s": p.option.step.step_s if p.option and p.option.step else None,
                     "tokens_per_s": p.option.step.tokens_per_s if p.option and p.option.step else None,
                     "efficiency": p.efficiency} for p in scale],
        "sbatch": sbatch_line(req, best, job.global_batch),
    }


def sbatch_line(req: PlanRequest, best: Option, global_batch: int) -> str:
    """The submission that runs the recommended option with slurm/pretrain.sbatch."""
    cfg = f"PTFT_CONFIG={req.config_path} " if req.config_path else ""
    gpus = "" if req.gpu.lower() == "cpu" else f" --gpus-per-node={req.gpus_per_node}"
    over = [f"train.zero_stage={best.stage}", f"train.micro_batch_size={best.micro_batch}",
            f"train.grad_accum={best.grad_accum}", f"train.global_batch_size={global_batch}"]
    if best.offload:
        over.append("train.offload_optimizer=true")
    if best.offload_params:
        over.append("train.offload_params=true")
    return (f"{cfg}sbatch --nodes={req.nodes} --ntasks-per-node={req.gpus_per_node}{gpus} "
            f"slurm/pretrain.sbatch {' '.join(over)}")
