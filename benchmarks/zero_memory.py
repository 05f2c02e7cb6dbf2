"""Measured peak memory per rank for each ZeRO stage, 2 ranks, the real ``ptft pretrain`` code path.

Each configuration is one run of 2 ranks under the real ``deepspeed`` launcher (CPU: gloo, fp32;
GPU: NCCL, one GPU per rank). Every rank builds the real :class:`~ptft_dist.pretrain.loop.Trainer`
(model built as ``ptft pretrain`` builds it -- under ZeRO-3 inside ``deepspeed.zero.Init`` --,
engine, streaming loader) and takes ``--steps`` training steps. Nothing is counted from engine
attributes; the figures are what the operating system / allocator report:

* CPU: ``peak_above_baseline_mb`` = the process's peak resident set (``getrusage`` ru_maxrss)
  minus its RSS once the imports are done and before the Trainer exists (the baseline), per rank:
  the headline. A sampling thread (every 10 ms and at each phase change) splits it into phases
  (build = model + engine + loader; forward, backward, optimizer step) and also samples what the C
  allocator has handed out and not got back (glibc ``mallinfo2``, all arenas:
  ``in_use_peak_above_baseline_mb``), the CPU counterpart of the GPU allocator's peak: RSS minus
  it is freed memory malloc kept.
* GPU: ``torch.cuda.max_memory_allocated`` per rank (the allocator's peak), same phases.

``zero3_built_whole`` is ZeRO-3 with the model built whole on every rank and partitioned only by
``deepspeed.initialize`` (what ``ptft pretrain`` did before it built under ``zero.Init``): its peak
shows what building partitioned saves. ``ratio_to_zero0`` = peak above baseline ÷ ZeRO-0's.
Target: ZeRO-3 ≤ 0.6x ZeRO-0 at 2 ranks on a model whose weights dominate (BERT-base, fp32).

What to expect in fp32 (Adam: weights 4 + gradients 4 + two moments 8 bytes per parameter,
16 in all for ZeRO-0, plus a flat copy of the gradients for the all-reduce): ZeRO-1/2/3 also keep
an fp32 master copy of their partition beside the fp32 weights (DeepSpeed's mixed-precision
layout, kept in fp32), so at 2 ranks ZeRO-3's state is (2 + 2 + 2 + 4) / 16 = 0.625 of ZeRO-0's
before activations and gathered layers: ≤ 0.6 is out of reach at 2 ranks in fp32 (in bf16 the
state goes 16 → 8 bytes per parameter at 2 ranks). ZeRO-2 in DeepSpeed 0.19 keeps the full
``param.grad`` tensors that overlap its partition in fp32, and on a CPU "offload" moves state
between two places in the same RAM (it adds buffers, it does not save memory).

    python benchmarks/zero_memory.py [--preset base] [--configs 0,1,2,3,3w] [--steps 2] [--out zero.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile
import threading
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

# name -> (zero stage, offload optimizer, offload params, build the model whole first)
CONFIGS: dict[str, tuple[int, bool, bool, bool]] = {
    "0": (0, False, False, False),
    "1": (1, False, False, False),
    "2": (2, False, False, False),
    "3": (3, False, False, False),
    "3w": (3, False, False, True),
    "2o": (2, True, False, False),
    "3o": (3, True, True, False),
}
LABELS = {"0": "zero0", "1": "zero1", "2": "zero2", "3": "zero3", "3w": "zero3_built_whole",
          "2o": "zero2+offload_optimizer", "3o": "zero3+offload_optimizer+params"}
MB = 2.0**20
PHASES = ("build", "forward", "backward", "optimizer")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _malloc_in_use_mb() -> float:
    """Bytes the C allocator (glibc malloc, all arenas) has handed out and not got back: what the
    program holds, without the freed memory malloc keeps for reuse (RSS includes that)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / MB


class PeakSampler:
    """Peak RSS and allocator in-use bytes (CPU) or allocated bytes (GPU) per named phase, sampled
    every ``interval`` s and at every phase change."""

    def __init__(self, cuda: bool, interval: float = 0.01):
        import psutil

        self.cuda, self.interval, self.proc = cuda, interval, psutil.Process()
        self.phase, self.peaks, self.peaks_in_use = "start", {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def now_mb(self) -> float:
        import torch

        return (torch.cuda.memory_allocated() if self.cuda else self.proc.memory_info().rss) / MB

    def in_use_mb(self) -> float:
        import torch

        return torch.cuda.memory_allocated() / MB if self.cuda else _malloc_in_use_mb()

    def _note(self) -> None:
        v, u = self.now_mb(), self.in_use_mb()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), v)
        self.peaks_in_use[self.phase] = max(self.peaks_in_use.get(self.phase, 0.0), u)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._note()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def enter(self, phase: str) -> None:
        self._note()
        self.phase = phase
        self._note()

    def stop(self) -> None:
        self._note()
        self._stop.set()
        self._thread.join()


def worker(args: argparse.Namespace) -> None:
    """One rank (under the deepspeed launcher): the real Trainer, ``--steps`` steps, rank{R}.json."""
    import contextlib

    import torch

    from ptft_dist.config import load_config
    from ptft_dist.pretrain import loop
    from ptft_dist.pretrain.model import model_inputs

    stage, off_opt, off_par, whole = CONFIGS[args.config]
    cfg = load_config(None, [
        f"data.corpus={args.corpus}", f"data.max_seq_len={args.seq_len}", "data.num_workers=0",
        f"data.cache_dir={args.cache_dir}", f"model.preset={args.preset}", f"train.run_dir={args.run_dir}",
        f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps + 1}",
        f"train.zero_stage={stage}", f"train.offload_optimizer={str(off_opt).lower()}",
        f"train.offload_params={str(off_par).lower()}", "train.precision=fp32" if not args.gpu else "train.precision=auto",
        "train.eval_every=0", "checkpoint.every=0", "optim.warmup_steps=1",
        *([f"train.deepspeed_config={args.ds_json}"] if args.ds_json else []),
    ])
    if whole:  # the old way: every rank builds the whole model, deepspeed.initialize partitions it
        loop.model_build_context = lambda *a, **k: contextlib.nullcontext()
    cuda = args.gpu and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    sampler = PeakSampler(cuda)
    baseline, in_use_baseline = sampler.now_mb(), sampler.in_use_mb()
    sampler.start()
    sampler.enter("build")
    t0 = time.perf_counter()
    trainer = loop.Trainer(cfg)
    build_s = time.perf_counter() - t0
    after_build = sampler.now_mb()
    batches = trainer.train_loader.forever()
    engine = trainer.engine
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):  # Trainer.train_step's calls (grad_accum 1), each phase sampled on its own
        batch = next(batches)
        sampler.enter(f"forward{i}")
        out = engine.forward(**model_inputs(batch))
        sampler.enter(f"backward{i}")
        engine.backward(out.loss)
        sampler.enter(f"optimizer{i}")
        engine.step()
        sampler.enter("between")
    step_s = (time.perf_counter() - t0) / args.steps
    sampler.stop()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / MB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    rec = {
        "rank": trainer.env.rank, "world_size": trainer.env.world_size, "zero_stage": trainer.engine.zero_stage,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "RSS (getrusage ru_maxrss)",
        "parameters": sum(int(getattr(p, "ds_numel", p.numel())) for p in trainer.model.parameters()),
        "baseline_mb": round(baseline, 1), "after_build_mb": round(after_build, 1), "peak_mb": round(peak, 1),
        "peak_above_baseline_mb": round(peak - baseline, 1),
        **{f"sampled_peak_{ph}_mb": round(max(v for k, v in sampler.peaks.items() if k.rstrip("0123456789") == ph)
                                          - baseline, 1) for ph in PHASES},
        "in_use_baseline_mb": round(in_use_baseline, 1),
        "in_use_peak_above_baseline_mb": round(max(sampler.peaks_in_use.values()) - in_use_baseline, 1),
        "per_phase_rss_mb": {k: round(v - baseline, 1) for k, v in sampler.peaks.items()},
        "per_phase_in_use_mb": {k: round(v - in_use_baseline, 1) for k, v in sampler.peaks_in_use.items()},
        "build_s": round(build_s, 2), "step_s": round(step_s, 2),
    }
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"rank{trainer.env.rank}.json").write_text(json.dumps(rec))
    torch.distributed.barrier()
    os._exit(0)  # the numbers are written; skip the teardown of the process group and loader


def measure(name: str, corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out_dir = work / f"zero_{name}"
    cmd = [DEEPSPEED, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--worker", "--config", name, "--corpus", str(corpus), "--preset", args.preset,
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
           "--cache-dir", str(work / "cache"), "--run-dir", str(work / f"run_{name}"), "--out-dir", str(out_dir)]
    if args.gpu:
        cmd.append("--gpu")
    if args.ds_json:
        cmd += ["--ds-json", args.ds_json]
    t0 = time.time()
    run_checked(cmd, bench_env(threads=1), args.timeout, log=work / f"zero_{name}.log")
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    if len(ranks) != args.ranks:
        raise BenchError(f"{name}: {len(ranks)} of {args.ranks} ranks reported")

    def agg(key: str) -> dict[str, float]:
        vals = [r[key] for r in ranks]
        return {"mean": round(sum(vals) / len(vals), 1), "max": round(max(vals), 1)}

    row: dict[str, Any] = {"config": LABELS[name], "zero_stage": ranks[0]["zero_stage"], "measure": ranks[0]["measure"],
                           "parameters": ranks[0]["parameters"]}
    for key in ("baseline_mb", "peak_mb", "peak_above_baseline_mb", *[f"sampled_peak_{ph}_mb" for ph in PHASES],
                "in_use_peak_above_baseline_mb", "build_s", "step_s"):
        row[key] = agg(key)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", help="model shape (same for every configuration)")
    ap.add_argument("--configs", default="0,1,2,3,3w",
                    help=f"any of {list(CONFIGS)} ('o': CPU offload; '3w': ZeRO-3 built whole)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--gpu", action="store_true", help="one GPU per rank (NCCL), torch.cuda.max_memory_allocated")
    ap.add_argument("--timeout", type=float, default=1200, help="per configuration, seconds")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="keep the work dir (logs, per-rank JSON) here")
    # worker mode (started by the deepspeed launcher)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ds-json", default=None, help="a DeepSpeed JSON for every configuration (train.deepspeed_config)")
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
        corpus = write_synthetic_corpus(work / "corpus", n_shards=2, tokens_per_shard=40_000,
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
            r["ratio_to_zero0"] = round(r["peak_above_baseline_mb"]["mean"]
                                        / max(base["peak_above_baseline_mb"]["mean"], 1e-9), 3)
            r["in_use_ratio_to_zero0"] = round(r["in_use_peak_above_baseline_mb"]["mean"]
                                               / max(base["in_use_peak_above_baseline_mb"]["mean"], 1e-9), 3)
    z3 = next((r for r in rows if r["config"] == "zero3"), None)
    report = {
        "benchmark": "zero_memory",
        "preset": args.preset, "ranks": args.ranks, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "steps": args.steps, "precision": "bf16" if args.gpu else "fp32", "device": "cuda" if args.gpu else "cpu",
        "fp32_model_mb": round(rows[0]["parameters"] * 4 / MB, 1) if rows else None,
        "rows": rows,
        "target": "zero3 peak above baseline <= 0.6x zero0 (2 ranks)",
        "target_met": bool(z3 and base and z3["ratio_to_zero0"] <= 0.6),
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
