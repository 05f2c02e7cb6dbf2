"""Export memory: ``ptft convert`` peak RSS vs the fp32 model size, for 2-rank ZeRO-2 and ZeRO-3 checkpoints.

For each stage: a 2-rank CPU pretraining run under the ``deepspeed`` launcher (``--steps`` steps,
checkpoint at the end) of a ``medium`` (default) BERT, then ``ptft convert RUN -o HF_DIR`` as its
own process. Reported per stage, from the export's ``ptft_export.json``:
``peak_rss_over_model_size`` = (peak RSS − RSS after imports) / fp32 model size, the number the
package computes; and from outside, the convert process's own peak RSS (``wait4``) over the model
size (imports included: torch, transformers and DeepSpeed weigh some hundred MB).

The ZeRO partitions on disk also hold fp32 master weights and Adam moments (~4x the model): a
conversion that loaded whole rank files at once would need several times the model size; ptft
consolidates lazily, one tensor at a time. Peak RSS (``ru_maxrss``) includes file-backed pages of
memory-mapped checkpoint files (reclaimable page cache). Target: ``peak_rss_over_model_size`` < 2.5.

    python benchmarks/export_memory.py [--preset medium] [--stages 2,3] [--out export.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchError,
    bench_env,
    emit,
    load_average,
    machine_info,
    ptft_command,
    run_checked,
    write_synthetic_corpus,
)

TARGET = 2.5


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def measure(stage: int, corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    run = work / f"run_zero{stage}"
    overrides = [f"model.preset={args.preset}", "data.max_seq_len=128", "data.num_workers=0",
                 f"data.cache_dir={work / 'cache'}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.max_steps={args.steps}", "train.eval_every=0", "optim.warmup_steps=1",
                 f"train.zero_stage={stage}", "checkpoint.every=0", "train.log_every=1"]
    t0 = time.time()
    run_checked(ptft_command("pretrain", ["--corpus", str(corpus), "--run-dir", str(run), *overrides],
                             nproc=args.ranks),
                bench_env(threads=1), args.timeout, log=work / f"pretrain_zero{stage}.log")
    t_train = time.time() - t0
    tag = (run / "checkpoints" / "latest").read_text().strip()
    ckpt_mb = _dir_mb(run / "checkpoints" / tag)
    out = work / f"hf_zero{stage}"
    res = run_checked(ptft_command("convert", [str(run), "--output", str(out)]), bench_env(), args.timeout,
                      log=work / f"convert_zero{stage}.log")
    meta = json.loads((out / "ptft_export.json").read_text())
    if not meta.get("verified"):
        raise BenchError(f"zero{stage}: export not verified: {meta}")
    model_mb = meta["model_mb_fp32"]
    row = {
        "zero_stage": stage,
        "checkpoint_mb_on_disk": round(ckpt_mb, 1),
        "model_mb_fp32": model_mb,
        "peak_rss_over_model_size": meta["peak_rss_over_model_size"],
        "peak_rss_over_baseline_mb": meta["peak_rss_over_baseline_mb"],
        "peak_rss_mb": meta["peak_rss_mb"],
        "baseline_rss_mb": round(meta["peak_rss_mb"] - meta["peak_rss_over_baseline_mb"], 1),
        "process_peak_rss_mb": round(res["max_rss_mb"], 1) if res["max_rss_mb"] else None,
        "process_peak_rss_over_model_size": round(res["max_rss_mb"] / model_mb, 2) if res["max_rss_mb"] else None,
        "max_abs_logit_diff": meta["max_abs_logit_diff"],
        "convert_s": round(res["wall_s"], 1),
        "pretrain_s": round(t_train, 1),
        "target_met": meta["peak_rss_over_model_size"] < TARGET,
    }
    return row


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="medium", help="model shape (small: 4 x 512, medium: 8 x 512)")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="training steps before the checkpoint")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="keep the work dir (runs, exports, logs) here")
    args = ap.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    load_before = load_average()
    t_all = time.time()
    rows, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="ptft-export-mem-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = write_synthetic_corpus(work / "corpus", n_shards=2, tokens_per_shard=40_000,
                                        vocab_size=args.vocab_size)
        for stage in stages:
            try:
                rows.append(measure(stage, corpus, work, args))
            except BenchError as exc:
                errors[f"zero{stage}"] = str(exc)[-1500:]
    report = {
        "benchmark": "export_memory",
        "preset": args.preset, "ranks": args.ranks,
        "rows": rows,
        "errors": errors,
        "target": f"peak_rss_over_model_size < {TARGET}",
        "target_met": bool(rows) and not errors and all(r["target_met"] for r in rows),
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
    main()
