"""The one-call GPU benchmark behind ``pretrain_throughput.py --gpu``: shapes x (padded, packed,
eager, compiled), each next to HF ``Trainer`` on the same model, data and batch.

Shapes (bf16, ZeRO-2, one GPU): BERT-base seq 128 (micro-batch 128) and BERT-large seq 512
(micro-batch 32). Per shape, HF Trainer once, then ptft in these variants (``--variants``):

* ``padded``            model.unpad=false: the encoder runs every padded position (as HF does)
* ``packed``            model.unpad=true: ptft_varlen; BERT's attention dropout 0.1 means the
                        pad-around SDPA kernel on CUDA (torch's varlen_attn has no dropout)
* ``packed+nodrop``     attention dropout 0 (HF gets the same config, measured again): torch's
                        varlen_attn (flash) runs
* ``packed+nodrop+compile``  the same, model.compile=true (DeepSpeed engine.compile(), inductor):
                        eager vs compiled on the same kernel
* (``--variants`` only) ``packed+compile``, ``padded+compile``

Each row: seq/s per GPU (real tokens/s over the mean real tokens per sample of the run's data),
tokens/s, MFU (model FLOPs of the real tokens over the data-sheet peak: ptft_dist/metrics/
throughput.py), compile_s (from ptft's metrics, not in the rate), the ratio to HF Trainer's
seq/s on the same shape, and any failure as text (one broken variant never hides the others).

``--matrix`` without ``--gpu``: the same on CPU (fp32, ZeRO-0), shapes mini-128 and base-128.
``--smoke-cpu``: the same logic, every variant, tiny shapes on CPU (fp32, ZeRO-2 over one gloo
rank): what tests/benchmarks/test_gpu_matrix.py runs so the GPU call can work first time.
A time budget (``--budget-s``, 450 s on GPU) skips the remaining runs, marked as skipped, rather
than overrun the 8 minutes.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

NODROP = {"attention_probs_dropout_prob": 0.0}
VARIANTS = {
    "padded": {"unpad": False},
    "packed": {"unpad": True},
    "packed+nodrop": {"unpad": True, **NODROP},
    "packed+nodrop+compile": {"unpad": True, "compile": True, **NODROP},
    "packed+compile": {"unpad": True, "compile": True},
    "padded+compile": {"unpad": False, "compile": True},
}
# One compile per shape keeps the GPU call under 8 minutes; the others run with --variants.
DEFAULT_VARIANTS = ["padded", "packed", "packed+nodrop", "packed+nodrop+compile"]
# name: (preset, seq_len, micro_batch, warmup_steps, measured_steps)
GPU_SHAPES = {"base-128": ("base", 128, 128, 10, 30), "large-512": ("large", 512, 32, 10, 30)}
SMOKE_SHAPES = {"tiny-64": ("tiny", 64, 8, 2, 2), "tiny-128": ("tiny", 128, 4, 2, 2)}
# --matrix on CPU (fp32, ZeRO-0): the CPU figures, same variants
CPU_SHAPES = {"mini-128": ("mini", 128, 32, 3, 9), "base-128": ("base", 128, 32, 2, 4)}


def _hf_overrides(variant: dict) -> dict:
    """HF Trainer gets the model config of the variant (dropout), never ptft's run switches."""
    return {k: v for k, v in variant.items() if k not in ("unpad", "compile")}


def _row(res: dict, mean_tokens: float, fpt_model: float, peak: float) -> dict[str, Any]:
    tps = res["tokens_per_s"]
    row = {"seq_per_s": round(tps / mean_tokens, 1), "tokens_per_s": round(tps, 1),
           "mfu": round(tps * fpt_model / peak, 4), "final_loss": res.get("final_loss")}
    for key in ("compile_s", "mem_max_allocated_mb", "mem_rss_mb", "process_wall_s"):
        if res.get(key) is not None:
            row[key] = res[key]
    return row


def run_shape(pt: Any, base: Any, shape: tuple, variants: list[str], work: Path, peak: float, timeout: float,
              deadline: float) -> dict[str, Any]:
    """HF once and ptft per variant on one shape; failures and skips are recorded, not raised."""
    preset, seq_len, mb, warmup, steps = shape
    setup = replace(base, preset=preset, seq_len=seq_len, micro_batch=mb, warmup_steps=warmup, steps=steps,
                    log_every=warmup, model_overrides={})
    corpus = pt.corpus_for(setup, work, None)
    feats = pt.extract_features(corpus, setup, work / "features.npz", work / "cache")
    mean_tokens, fpt = feats["mean_tokens_per_sample"], feats["flops_per_token"]["model"]
    out: dict[str, Any] = {"preset": preset, "seq_len": seq_len, "micro_batch": mb, "parameters": feats["parameters"],
                           "mean_tokens_per_sample": mean_tokens, "model_flops_per_token": round(fpt)}
    hf_cache: dict[str, dict] = {}
    for name in variants:
        v = VARIANTS[name]
        if time.time() > deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        s = replace(setup, model_overrides=dict(v))
        tag = "_" + name.replace("+", "_")
        try:
            res = pt.run_ptft(s, corpus, work, peak / 1e12, timeout, tag)
            row = _row(res, mean_tokens, fpt, peak)
            hf_key = repr(sorted(_hf_overrides(v).items()))
            if hf_key not in hf_cache and time.time() < deadline:
                hf_s = replace(setup, model_overrides=_hf_overrides(v))
                hf_cache[hf_key] = _row(pt.run_hf(hf_s, corpus, work / "features.npz", work, timeout, tag),
                                        mean_tokens, fpt, peak)
            if hf_key in hf_cache:
                row["hf_trainer"] = hf_cache[hf_key]
                row["ratio_vs_hf"] = round(row["seq_per_s"] / max(hf_cache[hf_key]["seq_per_s"], 1e-9), 3)
            out[name] = row
        except Exception as exc:  # one broken variant must not hide the others' numbers
            out[name] = {"failed": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    return out


def main(pt: Any, args: argparse.Namespace) -> dict:
    """Called by pretrain_throughput.py (``pt``) with its parsed arguments."""
    import tempfile

    base = pt.make_setup(args)
    shapes = SMOKE_SHAPES if args.smoke_cpu else GPU_SHAPES if args.gpu else CPU_SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    variants = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.smoke_cpu:  # CPU would run nearly full batches padded (pretrain/model.py): walk the packed branch
        os.environ["PTFT_CPU_MIN_PAD_SHARE"] = "0"
    budget = args.budget_s or (450.0 if args.gpu and not args.smoke_cpu else 3600.0)
    t0 = time.time()
    load_before = pt.load_average()
    report: dict[str, Any] = {"benchmark": "pretrain_throughput --gpu (matrix)", "device": base.device,
                              "precision": base.precision, "zero_stage": base.zero_stage, "variants": variants}
    peak, report["peak_source"] = pt.peak_flops(base, args.peak_tflops)
    report["peak_tflops"] = round(peak / 1e12, 4)
    with tempfile.TemporaryDirectory(prefix="ptft-gpu-matrix-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for name, shape in shapes.items():
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            report[name] = run_shape(pt, base, shape, variants, work, peak, args.timeout, t0 + budget)
    over = [(s, v) for s in shapes for v, row in report[s].items()
            if isinstance(row, dict) and row.get("mfu", 0) > 1.0]
    if over:
        raise SystemExit(f"MFU above 100% in {over} against {report['peak_tflops']} TFLOP/s: the peak is wrong")
    report["seconds"] = round(time.time() - t0, 1)
    report["load_average_before"] = load_before
    report["load_average_after"] = pt.load_average()
    report["machine"] = pt.machine_info()
    return pt.emit(report, args.out)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variants", default=None, help=f"with --gpu: comma list of {list(VARIANTS)} (default {DEFAULT_VARIANTS})")
    ap.add_argument("--shapes", default=None, help="with --gpu: comma list of shape names (default all)")
    ap.add_argument("--budget-s", type=float, default=None, help="with --gpu: skip runs after this (default 450 s)")


def failures(report: dict) -> list[str]:
    """Every variant that failed, as 'shape/variant: why' (for callers and the smoke test)."""
    out: list[Optional[str]] = []
    for shape, rows in report.items():
        if isinstance(rows, dict):
            out += [f"{shape}/{v}: {r['failed']}" for v, r in rows.items() if isinstance(r, dict) and "failed" in r]
    return [x for x in out if x]
