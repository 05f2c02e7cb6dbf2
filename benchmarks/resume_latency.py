"""Resume latency: process start → first training step after resume, early vs late checkpoint.

DESIGN invariant 3 (O(1) resume): the data state is a few integers; resuming positions the stream
directly (plan lookup), never replays batches. So resuming from step 1000 must cost what resuming
from step 10 costs. One run of a tiny model makes both checkpoints (it trains to ``--early``
steps, its run dir is copied, then it continues to ``--late`` steps; both positions are in epoch 0,
the late one ``late × micro_batch`` samples into it). Each measurement copies one of the two run
dirs and starts ``ptft pretrain`` on it (auto-resume) for two more steps, timed from just before
the process is forked to

* ``to_resumed_s``: the arrival of its ``ptft pretrain: resumed from ...`` line (engine built,
  checkpoint loaded, data position restored);
* ``to_first_step_s``: the ``time`` of the first step's record in ``metrics.jsonl``
  (``train.log_every=1``), i.e. the first batch fetched (loader worker started, shard window
  loaded) and the step done.

A fresh start (empty run dir, same settings) is timed the same way as the baseline:
``resume_overhead_s`` = resumed ``to_first_step_s`` − fresh ``to_first_step_s``.

Early and late runs alternate (``--repeats`` each); medians are reported with all samples.
Prints one JSON object; ``ratio`` = late / early ``to_first_step_s`` median (O(1): ≈ 1).

    python benchmarks/resume_latency.py [--early 10] [--late 1000] [--repeats 3] [--out resume.json]
    python benchmarks/resume_latency.py --smoke    # late = 100, 1 repeat
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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
    read_metrics,
    run_checked,
    write_synthetic_corpus,
)

TINY = ["model.preset=tiny", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=2",
        "model.intermediate_size=64", "train.eval_every=0", "optim.warmup_steps=2"]


def _overrides(args: argparse.Namespace, cache: Path, max_steps: int, log_every: int) -> list[str]:
    return [*TINY, f"data.max_seq_len={args.seq_len}", f"data.num_workers={args.workers}", f"data.cache_dir={cache}",
            f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={max_steps}",
            f"train.log_every={log_every}", "checkpoint.every=0", "checkpoint.keep_last=2"]


def make_checkpoints(args: argparse.Namespace, corpus: Path, work: Path, env: dict) -> dict[str, Any]:
    run = work / "run"
    cache = work / "cache"
    t0 = time.time()
    run_checked(ptft_command("pretrain", ["--corpus", str(corpus), "--run-dir", str(run),
                                          *_overrides(args, cache, args.early, 5)]),
                env, args.timeout, log=work / "make_early.log")
    shutil.copytree(run, work / "early")
    t1 = time.time()
    run_checked(ptft_command("pretrain", ["--corpus", str(corpus), "--run-dir", str(run),
                                          *_overrides(args, cache, args.late, 50)]),
                env, args.timeout, log=work / "make_late.log")
    shutil.move(str(run), work / "late")
    recs = read_metrics(work / "late")
    last = recs[-1] if recs else {}
    return {"make_early_s": round(t1 - t0, 1), "make_late_s": round(time.time() - t1, 1),
            "late_epoch": last.get("epoch"), "late_consumed_samples": last.get("consumed_samples")}


def resume_once(args: argparse.Namespace, which: str, step: int, corpus: Path, work: Path, env: dict,
                i: int) -> dict[str, float]:
    """One start on a copy of run dir ``which`` (``fresh``: an empty run dir, no checkpoint, step = 0)."""
    run = work / f"resume_{which}_{i}"
    if which != "fresh":
        shutil.copytree(work / which, run)
    cmd = ptft_command("pretrain", ["--corpus", str(corpus), "--run-dir", str(run),
                                    *_overrides(args, work / "cache", step + 2, 1)])
    res = run_checked(cmd, env, args.timeout, log=work / f"resume_{which}_{i}.log", stamp_lines=True)
    marker = "ptft pretrain: resumed from" if step else "ptft pretrain: "  # fresh: the model summary line
    line_at = next(((t, line) for t, line in res["lines"] if line.startswith(marker)), None)
    first = next((r for r in read_metrics(run) if r["step"] == step + 1), None)
    if line_at is None or first is None:
        raise BenchError(f"start from {which} (step {step}): no '{marker}' line or no step {step + 1} record\n"
                         + res["output"][-2000:])
    if step and f"at step {step} " not in line_at[1]:
        raise BenchError(f"resume from {which}: did not resume at step {step}: {line_at[1]}")
    shutil.rmtree(run, ignore_errors=True)
    return {"to_resumed_s": line_at[0] - res["t_start"], "to_first_step_s": first["time"] - res["t_start"]}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--early", type=int, default=10, help="step of the early checkpoint")
    ap.add_argument("--late", type=int, default=1000, help="step of the late checkpoint")
    ap.add_argument("--repeats", type=int, default=3, help="resumes measured per checkpoint (alternating)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes (data.num_workers)")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true", help="late = 100, 1 repeat")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="keep the work dir (runs, logs) here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.late, args.repeats = min(args.late, 100), 1
    if not 0 < args.early < args.late:
        ap.error("need 0 < --early < --late")
    load_before = load_average()
    t_all = time.time()
    env = bench_env(threads=1)
    with tempfile.TemporaryDirectory(prefix="ptft-resume-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # every position of the run stays in epoch 0 (~0.8 * seq_len tokens per sample, 1.5x margin); 8 shards in
        # windows of 4 (data.shuffle_window_shards): the late position lies in the second window
        tokens = int(args.late * args.micro_batch * args.seq_len * 0.8 * 1.5) + 20_000
        corpus = write_synthetic_corpus(work / "corpus", n_shards=8, tokens_per_shard=tokens // 8,
                                        vocab_size=args.vocab_size)
        made = make_checkpoints(args, corpus, work, env)
        samples: dict[str, list[dict]] = {"fresh": [], "early": [], "late": []}
        for i in range(args.repeats):
            for which, step in (("fresh", 0), ("early", args.early), ("late", args.late)):
                samples[which].append(resume_once(args, which, step, corpus, work, env, i))

    def summary(which: str, step: int) -> dict[str, Any]:
        s = samples[which]
        out = {"step": step, "consumed_samples": step * args.micro_batch,
               "to_resumed_s": round(statistics.median(x["to_resumed_s"] for x in s), 3),
               "to_first_step_s": round(statistics.median(x["to_first_step_s"] for x in s), 3),
               "samples_to_first_step_s": [round(x["to_first_step_s"], 3) for x in s]}
        if step == 0:  # no checkpoint: "to_resumed_s" is the time to the model summary line
            out["to_model_built_s"] = out.pop("to_resumed_s")
        return out

    fresh, early, late = summary("fresh", 0), summary("early", args.early), summary("late", args.late)
    ratio = late["to_first_step_s"] / early["to_first_step_s"]
    report = {
        "benchmark": "resume_latency",
        "model": "tiny (2 layers, hidden 32)", "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "loader_workers": args.workers, "ranks": 1,
        "checkpoints": made,
        "fresh_start": fresh,
        "early": early,
        "late": late,
        "ratio": round(ratio, 3),
        "ratio_to_resumed": round(late["to_resumed_s"] / early["to_resumed_s"], 3),
        "resume_overhead_s": {"early": round(early["to_first_step_s"] - fresh["to_first_step_s"], 3),
                              "late": round(late["to_first_step_s"] - fresh["to_first_step_s"], 3)},
        "target": "ratio ~ 1 (O(1) data resume; the late checkpoint is "
                  f"{args.late // args.early}x further into the epoch)",
        "target_met": ratio < 1.25,
        "seconds": round(time.time() - t_all, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
