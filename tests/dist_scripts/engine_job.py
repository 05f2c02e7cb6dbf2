"""Multi-process engine checks (launched by tests/engine/test_engine.py). Every rank runs it; rank 0 writes
the numbers to OUT/<mode>.json, the test compares them.

modes:
  zero        W=2 (deepspeed launcher): ZeRO 0/1/2/3 fp32 losses over 3 steps; state memory in bf16
              (ZeRO-0 vs ZeRO-3); ZeRO-2/3 checkpoints saved after step 3 with a reference dump, a
              save/load round trip into a fresh engine, and the step-4/5 losses of the original run.
  elastic     W'=1 or 3: load those ZeRO-2/3 checkpoints (universal conversion), compare with the
              reference, train steps 4 and 5.
  accelerate  W=2 (torchrun): Accelerate/DDP losses over 3 steps, and a save/load round trip.

Global batch = MB × ACCUM × W = 12 for every W: micro-batch ``m`` of rank ``r`` is global slot
``m*W + r`` of the step, so every world size sees the same samples per step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.engine import build_engine
from tests.dist_scripts.common import batch, dump, lr_lambda, tiny_bert

GLOBAL, MB = 12, 2
PROBE = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.query.weight",
         "bert.encoder.layer.0.output.LayerNorm.bias", "cls.predictions.bias"]


def make(stage: int, world: int, backend: str = "deepspeed", precision: str = "fp32", seed: int = 0,
         offload: str = ""):
    accum = GLOBAL // (MB * world)
    tc = TrainConfig(backend=backend, zero_stage=stage, precision=precision, micro_batch_size=MB, grad_accum=accum,
                     global_batch_size=GLOBAL, offload_optimizer=bool(offload), offload_params=offload == "params")
    oc = OptimConfig(lr=2e-3, weight_decay=0.01, grad_clip=1.0)
    return build_engine(tiny_bert(seed), tc, oc, lr_lambda, world, torch.device("cpu"))


def train_step(e, step: int, rank: int, world: int) -> float:
    """One optimizer step; returns the mean micro-batch loss over all ranks."""
    losses = []
    for m in range(e.grad_accum):
        out = e.forward(**batch(step, m * world + rank, 0, mb=MB))
        e.backward(out.loss)
        losses.append(out.loss.detach().float())
        boundary = e.is_accumulation_boundary
        e.step()
    assert boundary, "the last micro-batch must be an accumulation boundary"
    t = torch.stack(losses).mean()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return float(t)


def snapshot(e) -> dict:
    names = [n for n, _ in e.module.named_parameters()]
    return {"params": {n: e.full_parameter(n) for n in names},
            "exp_avg": {n: e.full_optimizer_state(n, "exp_avg") for n in PROBE},
            "exp_avg_sq": {n: e.full_optimizer_state(n, "exp_avg_sq") for n in PROBE}}


def compare(a: dict, b: dict) -> dict:
    """Max |diff| per kind, and whether every parameter is bitwise equal."""
    out = {"params_bitwise": all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"]),
           "params_maxdiff": max(float((a["params"][n] - b["params"][n]).abs().max()) for n in a["params"])}
    for k in ("exp_avg", "exp_avg_sq"):
        out[f"{k}_bitwise"] = all(torch.equal(a[k][n], b[k][n]) for n in PROBE)
        out[f"{k}_nonzero"] = all(float(a[k][n].abs().sum()) > 0 for n in PROBE)
    return out


def mode_zero(out: Path, ckpt: Path, rank: int, world: int) -> None:
    res: dict = {"losses": {}, "mem_fp32": {}, "mem_bf16": {}, "roundtrip": {}, "continue": {}}
    for stage in (0, 1, 2, 3):
        e = make(stage, world)
        res["losses"][stage] = [train_step(e, s, rank, world) for s in range(3)]
        res["mem_fp32"][stage] = e.state_memory_bytes()  # after step(): grads freed, optimizer state present
        res[f"lr_{stage}"], res[f"grad_norm_{stage}"], res[f"gstep_{stage}"] = e.lr, e.grad_norm, e.global_step
        if stage == 0:
            e.save_checkpoint(ckpt, "z0", {"step": 3, "note": "zero0"})
            if rank == 0:
                torch.save(snapshot(e), ckpt / "z0_ref.pt")
            res["continue"][stage] = [train_step(e, s, rank, world) for s in (3, 4)]
        if stage in (2, 3):
            ref = snapshot(e)
            e.save_checkpoint(ckpt, f"z{stage}", {"step": 3, "note": f"zero{stage}"})
            if rank == 0:
                torch.save(ref, ckpt / f"z{stage}_ref.pt")
            res["continue"][stage] = [train_step(e, s, rank, world) for s in (3, 4)]
            e2 = make(stage, world, seed=99)  # different init: everything must come from the checkpoint
            client = e2.load_checkpoint(ckpt, f"z{stage}")
            got = snapshot(e2)
            res["roundtrip"][stage] = {**compare(ref, got), "client": client, "lr": e2.lr, "gstep": e2.global_step,
                                       "losses": [train_step(e2, s, rank, world) for s in (3, 4)]}
    # ZeRO-Offload (DeepSpeedCPUAdam): optimizer state (ZeRO-2) and parameters too (ZeRO-3)
    for name, stage, offload in (("2o", 2, "optimizer"), ("3o", 3, "params")):
        e = make(stage, world, offload=offload)
        res["losses"][name] = [train_step(e, s, rank, world) for s in range(3)]
        res[f"optimizer_{name}"] = type(e.ds.optimizer.optimizer).__name__
    # state memory in the production mixed-precision mode (bf16), measured between backward and step
    for stage in (0, 3):
        e = make(stage, world, precision="bf16")
        train_step(e, 0, rank, world)
        for m in range(e.grad_accum):
            o = e.forward(**batch(1, m * world + rank, 0, mb=MB))
            e.backward(o.loss)
            if m == e.grad_accum - 1:
                res["mem_bf16"][stage] = e.state_memory_bytes()
            e.step()
    res["ds_config_z3"] = e.ds_config
    if rank == 0:
        dump(out / "zero.json", res)


def mode_elastic(out: Path, ckpt: Path, rank: int, world: int) -> None:
    res: dict = {}
    for stage in (0, 2, 3):
        e = make(stage, world, seed=7)
        client = e.load_checkpoint(ckpt, f"z{stage}")
        got = snapshot(e)
        ref = torch.load(ckpt / f"z{stage}_ref.pt", weights_only=False)
        res[stage] = {**compare(ref, got), "client": client, "lr": e.lr, "gstep": e.global_step,
                      "losses": [train_step(e, s, rank, world) for s in (3, 4)]}
    if rank == 0:
        dump(out / f"elastic_{world}.json", res)


def mode_accelerate(out: Path, ckpt: Path, rank: int, world: int) -> None:
    e = make(0, world, backend="accelerate")
    res = {"losses": [train_step(e, s, rank, world) for s in range(3)], "lr": e.lr, "grad_norm": e.grad_norm,
           "mem": e.state_memory_bytes()}
    ref = snapshot(e)
    files = e.save_checkpoint(ckpt, "acc", {"step": 3})
    res["files"] = sorted(p.name for p in files)
    res["continue"] = [train_step(e, s, rank, world) for s in (3, 4)]
    e2 = make(0, world, backend="accelerate", seed=5)
    client = e2.load_checkpoint(ckpt, "acc")
    res["roundtrip"] = {**compare(ref, snapshot(e2)), "client": client, "lr": e2.lr, "gstep": e2.global_step,
                        "losses": [train_step(e2, s, rank, world) for s in (3, 4)]}
    if rank == 0:
        dump(out / "accelerate.json", res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["zero", "elastic", "accelerate"])
    ap.add_argument("out")
    ap.add_argument("ckpt")
    args, _ = ap.parse_known_args()  # the deepspeed launcher adds --local_rank
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    out, ckpt = Path(args.out), Path(args.ckpt)
    {"zero": mode_zero, "elastic": mode_elastic, "accelerate": mode_accelerate}[args.mode](out, ckpt, rank, world)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
