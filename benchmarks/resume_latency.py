"""Resume latency: process start → first training step, resuming early in an epoch vs ≥ 10 M samples into it.

docs/design.md, guarantee 3 (O(1) resume): the data position is a few integers; a resume looks the
position up in the epoch plan and loads the one shard window it falls in, it never replays the
samples before it. So resuming 10 M samples into an epoch must cost what resuming 80 samples in
costs; a loader that replayed (or scanned) would show a late/early ratio far above 1.

Corpus: one synthetic shard in the real format, hard-linked ``N`` times (same bytes and checksum,
no extra disk), so the training epoch holds > ``--late-samples`` samples (tens of millions) and is
written in seconds. Checkpoint: one real ``ptft pretrain`` run (tiny model, 1 rank, ZeRO-0) trains
``--early`` steps and saves. It is copied twice: ``early`` as is (``early × micro_batch`` samples
into the epoch), and ``late`` with its data position (``data.consumed`` in the DeepSpeed client
state and in ``COMPLETE``) moved to ``--late-samples``: training 10 M samples on this machine to
get there is out of reach, and everything else in the checkpoint is identical, so the two resumes
differ only in the position. The resumed run must say ``resumed from ... N samples into it``.

Measured through the real ``ptft pretrain`` path (auto-resume), timed from just before the process
is forked to

* ``to_resumed_s``: its ``ptft pretrain: resumed from ...`` line (engine built, checkpoint loaded,
  data position restored);
* ``to_first_step_s``: the ``time`` of the first step's record in ``metrics.jsonl``
  (``train.log_every=1``): the first batch fetched (loader worker started, the position's shard
  window loaded) and the step done.

A fresh start (empty run dir) is timed the same way as the baseline. Early, late and fresh runs
alternate (``--repeats`` each); medians are reported with all samples. ``ratio`` = late / early
``to_first_step_s`` median (target ≤ 1.05). Also, in-process and with less noise: the real
train loader, ``load_state_dict`` of each position and its first batch (``loader_first_batch``).

    python benchmarks/resume_latency.py [--late-samples 10000000] [--repeats 3] [--out resume.json]
    python benchmarks/resume_latency.py --smoke    # 1 M samples, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import math
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
    replicate_train_shards,
    run_checked,
    write_synthetic_corpus,
)

TINY = ["model.preset=tiny", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=2",
        "model.intermediate_size=64", "train.eval_every=0", "optim.warmup_steps=2"]


def _overrides(args: argparse.Namespace, cache: Path, max_steps: int, log_every: int) -> list[str]:
    return [*TINY, f"data.max_seq_len={args.seq_len}", f"data.num_workers={args.workers}", f"data.cache_dir={cache}",
            f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={max_steps}",
            f"train.log_every={log_every}", "checkpoint.every=0", "checkpoint.keep_last=2"]


def _data_config(args: argparse.Namespace, corpus: Path, cache: Path):
    from ptft_dist.config import DataConfig

    return DataConfig(corpus=str(corpus), max_seq_len=args.seq_len, cache_dir=str(cache), num_workers=args.workers)


def build_corpus(args: argparse.Namespace, work: Path) -> tuple[Path, int]:
    """A corpus whose epoch 0 holds more than ``late_samples`` (with margin); returns it and its size."""
    from ptft_dist.stream.dataset import PretrainingStream

    base = write_synthetic_corpus(work / "base", n_shards=1, tokens_per_shard=args.tokens_per_shard,
                                  vocab_size=args.vocab_size)
    per_shard = PretrainingStream(cfg=_data_config(args, base, work / "base_cache"),
                                  micro_batch_size=args.micro_batch).num_samples(0)
    copies = math.ceil(args.late_samples * 1.1 / per_shard) + 1
    corpus = replicate_train_shards(base, work / "corpus", copies)
    return corpus, copies


def move_position(step_dir: Path, consumed: int) -> None:
    """Set the checkpoint's data position (``consumed`` samples into the same epoch) where a resume reads it
    (the client state in DeepSpeed's model-states file) and in the ``COMPLETE`` manifest (sizes re-recorded)."""
    import torch

    from ptft_dist.engine.base import CLIENT_KEY

    states = step_dir / "mp_rank_00_model_states.pt"
    sd = torch.load(states, map_location="cpu", weights_only=False)
    sd[CLIENT_KEY]["data"]["consumed"] = consumed
    torch.save(sd, states)
    manifest = json.loads((step_dir / "COMPLETE").read_text())
    manifest["client"]["data"]["consumed"] = consumed
    manifest["files"][states.name] = states.stat().st_size
    (step_dir / "COMPLETE").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def make_checkpoints(args: argparse.Namespace, corpus: Path, work: Path, env: dict, late: int) -> dict[str, Any]:
    run = work / "run"
    t0 = time.time()
    run_checked(ptft_command("pretrain", ["--corpus", str(corpus), "--run-dir", str(run),
                                          *_overrides(args, work / "cache", args.early, args.early)]),
                env, args.timeout, log=work / "make.log")
    shutil.copytree(run, work / "early")
    shutil.move(str(run), work / "late")
    tag = (work / "late" / "checkpoints" / "latest").read_text().strip()
    move_position(work / "late" / "checkpoints" / tag, late)
    return {"make_s": round(time.time() - t0, 1), "tag": tag}


def resume_once(args: argparse.Namespace, which: str, step: int, consumed: int, corpus: Path, work: Path,
                env: dict, i: int) -> dict[str, float]:
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
    if step and f"{consumed} samples into it" not in line_at[1]:
        raise BenchError(f"resume from {which}: not at sample {consumed}: {line_at[1]}")
    shutil.rmtree(run, ignore_errors=True)
    return {"to_resumed_s": line_at[0] - res["t_start"], "to_first_step_s": first["time"] - res["t_start"]}


def loader_first_batch(args: argparse.Namespace, corpus: Path, cache: Path, consumed: int) -> float:
    """Seconds from a fresh train loader's ``load_state_dict`` (position ``consumed``) to its first batch."""
    from ptft_dist.stream.loader import build_train_loader

    loader = build_train_loader(_data_config(args, corpus, cache), args.micro_batch)
    state = dict(loader.state_dict(), consumed=consumed)
    t0 = time.perf_counter()
    loader.load_state_dict(state)
    it = iter(loader)
    batch = next(it)
    dt = time.perf_counter() - t0
    del it, batch
    if loader.consumed != consumed + args.micro_batch:
        raise BenchError(f"loader did not continue at sample {consumed}")
    return dt


def _summary(samples: list[dict], step: int, consumed: int) -> dict[str, Any]:
    out = {"step": step, "consumed_samples": consumed,
           "to_resumed_s": round(statistics.median(x["to_resumed_s"] for x in samples), 3),
           "to_first_step_s": round(statistics.median(x["to_first_step_s"] for x in samples), 3),
           "samples_to_first_step_s": [round(x["to_first_step_s"], 3) for x in samples]}
    if step == 0:  # no checkpoint: "to_resumed_s" is the time to the model summary line
        out["to_model_built_s"] = out.pop("to_resumed_s")
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--early", type=int, default=10, help="steps of the real run (the early checkpoint)")
    ap.add_argument("--late-samples", type=int, default=10_000_000, help="data position of the late checkpoint")
    ap.add_argument("--repeats", type=int, default=3, help="starts measured per checkpoint (alternating)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="loader worker processes (data.num_workers)")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--tokens-per-shard", type=int, default=4_000_000, help="the shard that is replicated")
    ap.add_argument("--smoke", action="store_true", help="1 M samples, 1 repeat")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="keep the work dir (runs, logs) here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.late_samples, args.repeats = min(args.late_samples, 1_000_000), 1
    load_before = load_average()
    t_all = time.time()
    env = bench_env(threads=1)
    with tempfile.TemporaryDirectory(prefix="ptft-resume-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        corpus, copies = build_corpus(args, work)
        corpus_s = time.time() - t0
        early = args.early * args.micro_batch
        late = args.late_samples // args.micro_batch * args.micro_batch
        made = make_checkpoints(args, corpus, work, env, late)
        from ptft_dist.stream.dataset import PretrainingStream

        epoch_samples = PretrainingStream(cfg=_data_config(args, corpus, work / "cache"),
                                          micro_batch_size=args.micro_batch).num_samples(0)
        runs: dict[str, list[dict]] = {"fresh": [], "early": [], "late": []}
        loader_s: dict[str, list[float]] = {"early": [], "late": []}
        for i in range(args.repeats):
            for which, step, consumed in (("fresh", 0, 0), ("early", args.early, early), ("late", args.early, late)):
                runs[which].append(resume_once(args, which, step, consumed, corpus, work, env, i))
        for _ in range(max(3, args.repeats)):
            for which, consumed in (("early", early), ("late", late)):
                loader_s[which].append(loader_first_batch(args, corpus, work / "cache", consumed))
    fresh, e, la = (_summary(runs["fresh"], 0, 0), _summary(runs["early"], args.early, early),
                    _summary(runs["late"], args.early, late))
    ratio = la["to_first_step_s"] / e["to_first_step_s"]
    lf = {k: round(statistics.median(v), 3) for k, v in loader_s.items()}
    report = {
        "benchmark": "resume_latency",
        "path": "real `ptft pretrain` (1 rank, ZeRO-0, auto-resume); late checkpoint = the early one with its data "
                "position moved",
        "model": "tiny (2 layers, hidden 32)", "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "loader_workers": args.workers, "ranks": 1,
        "corpus": {"train_shards": copies, "epoch_samples": epoch_samples, "written_s": round(corpus_s, 1)},
        "checkpoints": made,
        "fresh_start": fresh, "early": e, "late": la,
        "ratio": round(ratio, 3),
        "ratio_to_resumed": round(la["to_resumed_s"] / e["to_resumed_s"], 3),
        "resume_overhead_s": {"early": round(e["to_first_step_s"] - fresh["to_first_step_s"], 3),
                              "late": round(la["to_first_step_s"] - fresh["to_first_step_s"], 3)},
        "loader_first_batch": {"early_s": lf["early"], "late_s": lf["late"],
                               "ratio": round(lf["late"] / lf["early"], 3),
                               "samples_s": {k: [round(x, 3) for x in v] for k, v in loader_s.items()}},
        "target": f"ratio <= 1.05 (late = {late:,} samples into the epoch, early = {early})",
        "target_met": ratio <= 1.05,
        "seconds": round(time.time() - t_all, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
