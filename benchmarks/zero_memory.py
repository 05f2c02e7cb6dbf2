"""Per-rank training-state memory per ZeRO stage (0, 1, 2, 3, 2 + CPU offload, 3 + CPU offload), 2 ranks.

Each configuration is one run of 2 CPU ranks (gloo) under the real ``deepspeed`` launcher, built
the way ``ptft pretrain`` builds it (``build_pretrainer`` → ``build_engine`` with the ZeRO template
of ``ds_configs/``, the streaming loader), same model and batch for all. Every rank takes two
training steps and reads, between the second ``backward()`` and ``step()`` (gradients present,
optimizer state created: the peak), ``engine.state_memory_bytes()``: bytes of parameters,
gradients and optimizer state (fp32 master partitions + Adam moments) this rank holds. Plus its
resident set size (RSS) then, its peak RSS, and the RSS baseline (imports + process group, before
the model exists).

Prints one JSON object: a row per configuration (per-rank numbers: the mean over ranks and the
max), and ``ratio_to_zero0`` of the state bytes and of RSS above baseline. Expected: ZeRO-1 cuts the
optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters, each ~1/world size. In
fp32 (all CPU runs) ZeRO-1/2/3 keep an fp32 master partition beside the fp32 parameters (so
ZeRO-1 = 3.5/4 of ZeRO-0 for Adam, ZeRO-3 = 2.5/4), and DeepSpeed 0.19's ZeRO-2 keeps the
gradients of its partition as views of the whole ``param.grad`` tensors (its compact partition
buffer is only used when gradients are accumulated in another dtype than the parameters, e.g. bf16
training): every gradient tensor that overlaps a rank's partition stays alive in full, so in fp32
ZeRO-2 saves no more than ZeRO-1. On a CPU "offload" moves state between two places in the same
RAM: it changes the optimizer (DeepSpeedCPUAdam) and adds buffers, it does not save memory.

    python benchmarks/zero_memory.py [--preset small] [--configs 0,1,2,3,2o,3o] [--out zero.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEEPSPEED,
    BenchError,
    bench_env,
    emit,
    free_port,
    load_average,
    machine_info,
    run_checked,
    write_synthetic_corpus,
)

# name -> (zero stage, offload optimizer, offload params)
CONFIGS: dict[str, tuple[int, bool, bool]] = {
    "0": (0, False, False),
    "1": (1, False, False),
    "2": (2, False, False),
    "3": (3, False, False),
    "2o": (2, True, False),
    "3o": (3, True, True),
}
LABELS = {"0": "zero0", "1": "zero1", "2": "zero2", "3": "zero3", "2o": "zero2+offload_optimizer",
          "3o": "zero3+offload_optimizer+params"}
MB = 2.0**20


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def worker(args: argparse.Namespace) -> None:
    """One rank (under the deepspeed launcher): build, two steps, measure, write rank{R}.json."""
    import torch

    from ptft_dist.config import load_config
    from ptft_dist.corpus.format import load_manifest
    from ptft_dist.dist.discover import discover
    from ptft_dist.dist.rendezvous import device_for, init_distributed
    from ptft_dist.engine import build_engine
    from ptft_dist.engine.schedule import lr_lambda
    from ptft_dist.metrics.parameters import count_parameters
    from ptft_dist.pretrain.model import build_pretrainer
    from ptft_dist.stream.loader import MODEL_INPUTS, build_train_loader

    stage, off_opt, off_par = CONFIGS[args.config]
    cfg = load_config(None, [
        f"data.corpus={args.corpus}", f"data.max_seq_len={args.seq_len}", "data.num_workers=0",
        f"data.cache_dir={args.cache_dir}", f"model.preset={args.preset}",
        f"train.micro_batch_size={args.micro_batch}", "train.max_steps=10", f"train.zero_stage={stage}",
        f"train.offload_optimizer={str(off_opt).lower()}", f"train.offload_params={str(off_par).lower()}",
        "train.precision=fp32", "optim.warmup_steps=1",
    ])
    env = discover()
    init_distributed(env)
    device = device_for(env)
    rss_baseline = _rss_mb()
    torch.manual_seed(0)
    manifest = load_manifest(cfg.data.corpus)
    model = build_pretrainer(cfg.model, manifest.vocab_size, manifest.special_tokens["pad"], nsp=cfg.data.nsp)
    n_params = count_parameters(model)["total"]
    engine = build_engine(model, cfg.train, cfg.optim, lr_lambda(cfg.optim, cfg.train.max_steps), env.world_size,
                          device)
    rss_after_init = _rss_mb()
    loader = build_train_loader(cfg.data, cfg.train.micro_batch_size, env.world_size, env.rank, num_workers=0)
    batches = loader.forever()
    state: dict[str, int] = {}
    rss_at_peak = 0.0
    t0 = time.perf_counter()
    for step in range(2):
        batch = next(batches)
        out = engine.forward(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        engine.backward(out.loss)
        if step == 1:
            state = engine.state_memory_bytes()
            rss_at_peak = _rss_mb()
        engine.step()
    step_s = (time.perf_counter() - t0) / 2
    rec = {
        "rank": env.rank, "world_size": env.world_size, "zero_stage": engine.zero_stage,
        "optimizer": type(engine._inner_optimizer()).__name__ if hasattr(engine, "_inner_optimizer") else None,
        "parameters": n_params, "state_bytes": state,
        "rss_baseline_mb": round(rss_baseline, 1), "rss_after_init_mb": round(rss_after_init, 1),
        "rss_at_step_mb": round(rss_at_peak, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "step_s": round(step_s, 3),
    }
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"rank{env.rank}.json").write_text(json.dumps(rec))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def measure(name: str, corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out_dir = work / f"zero_{name}"
    cmd = [DEEPSPEED, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", "--config", name, "--corpus", str(corpus), "--preset", args.preset,
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--cache-dir", str(work / "cache"),
           "--out-dir", str(out_dir)]
    t0 = time.time()
    run_checked(cmd, bench_env(threads=1), args.timeout, log=work / f"zero_{name}.log")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    if len(ranks) != args.ranks:
        raise BenchError(f"{name}: {len(ranks)} of {args.ranks} ranks reported")

    def agg(get) -> dict[str, float]:
        vals = [get(r) for r in ranks]
        return {"mean": round(sum(vals) / len(vals), 1), "max": round(max(vals), 1)}

    row: dict[str, Any] = {"config": LABELS[name], "zero_stage": ranks[0]["zero_stage"],
                           "optimizer": ranks[0]["optimizer"], "parameters": ranks[0]["parameters"]}
    for key in ("params", "grads", "optimizer", "total"):
        row[f"{key}_mb"] = agg(lambda r, k=key: r["state_bytes"].get(k, 0) / MB)
    row["rss_at_step_mb"] = agg(lambda r: r["rss_at_step_mb"])
    row["rss_above_baseline_mb"] = agg(lambda r: r["rss_at_step_mb"] - r["rss_baseline_mb"])
    row["peak_rss_mb"] = agg(lambda r: r["peak_rss_mb"])
    row["step_s"] = agg(lambda r: r["step_s"])
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model shape (same for every configuration)")
    ap.add_argument("--configs", default="0,1,2,3,2o,3o", help="ZeRO stages; 'o' = with CPU offload")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--timeout", type=float, default=900, help="per configuration, seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="keep the work dir (logs, per-rank JSON) here")
    # worker mode (started by the deepspeed launcher)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown {bad}; choose from {list(CONFIGS)}")
    load_before = load_average()
    t_all = time.time()
    rows, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="ptft-zero-mem-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = write_synthetic_corpus(work / "corpus", n_shards=2, tokens_per_shard=60_000,
                                        vocab_size=args.vocab_size)
        for name in names:
            try:
                rows.append(measure(name, corpus, work, args))
            except BenchError as exc:
                errors[LABELS[name]] = str(exc)[-1500:]
            print(f"zero_memory: {LABELS[name]} done ({time.time() - t_all:.0f}s)", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["config"] == "zero0"), None)
    if base:
        for r in rows:
            r["ratio_to_zero0"] = {
                "state_total": round(r["total_mb"]["mean"] / max(base["total_mb"]["mean"], 1e-9), 3),
                "optimizer": round(r["optimizer_mb"]["mean"] / max(base["optimizer_mb"]["mean"], 1e-9), 3),
                "grads": round(r["grads_mb"]["mean"] / max(base["grads_mb"]["mean"], 1e-9), 3),
                "params": round(r["params_mb"]["mean"] / max(base["params_mb"]["mean"], 1e-9), 3),
                "rss_above_baseline": round(r["rss_above_baseline_mb"]["mean"]
                                            / max(base["rss_above_baseline_mb"]["mean"], 1e-9), 3),
            }
    report = {
        "benchmark": "zero_memory",
        "preset": args.preset, "ranks": args.ranks, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "precision": "fp32", "device": "cpu",
        "fp32_model_mb": round(rows[0]["parameters"] * 4 / MB, 1) if rows else None,
        "rows": rows,
        "errors": errors,
        "seconds": round(time.time() - t_all, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }
    emit(report, args.out)
    if errors:
        sys.exit(1)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
