"""``ptft demo``: the whole workflow on the demo data, as a newcomer meets it.

    demo data → prepare → pretrain (2 ranks, ZeRO-2 on CPU; one rank per GPU, bf16 on GPUs)
    → convert → fine-tune (full and LoRA) → test-set evaluation → summary table

Every stage runs as its own ``ptft`` command (printed before it runs), exactly as a user would
type it, so the demo doubles as a worked example. ``--quick`` shrinks every stage to a minute or
two (CI); the default fits 20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ptft_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sizes:
    """Everything that differs between the full demo and ``--quick``."""

    prepare: list[str]
    pretrain: list[str]
    finetune: list[str]


# Sized from measurements on a quiet 2-core CPU: the mini model leaves the unigram phase after
# ~200 steps of 64 x 128 tokens (held-out MLM accuracy 0.07-0.09 at 200, 0.10-0.13 at 400-500 vs
# a 0.04 unigram baseline) at ~1.4 s a step. The fine-tunes get 4,000 Rotten Tomatoes sentences
# for one epoch (125 steps, ~40 s each): the low-resource regime where pretraining shows. Measured
# from a 400-step model: test accuracy 0.69 pretrained vs 0.50 random init; with the whole train
# split (267 steps) random init catches up (0.73 vs 0.74).
FULL = Sizes(
    prepare=["prepare.tokenizer.vocab_size=8000", "prepare.shard_size_mb=1"],
    pretrain=["model.preset=mini", "train.max_steps=480", "train.micro_batch_size=32", "optim.lr=1e-3",
              "optim.warmup_steps=48", "train.eval_every=240", "train.eval_batches=20", "train.log_every=40",
              "checkpoint.every=240"],
    finetune=["finetune.epochs=1", "finetune.max_seq_len=64", "finetune.max_train_samples=4000"],
)
# CI size: the tiny model still leaves the unigram phase (MLM accuracy ~0.10 vs 0.03 at step 300,
# ~100 s; 0.050 at step 200 of a 200-step run: too close to the 1.5x the test asks); its fine-tunes learn
# (2 epochs of 6,000 sentences; the whole split gave test accuracy 0.57-0.70 full, run to run, one epoch of
# 4,000 only 0.55 with macro-F1 0.47) but pretraining this short does not beat random initialisation on
# the task, so only the full demo checks that gap.
QUICK = Sizes(
    prepare=["prepare.tokenizer.vocab_size=2000", "prepare.shard_size_mb=1"],
    pretrain=["model.preset=tiny", "train.max_steps=300", "train.micro_batch_size=32", "optim.lr=2e-3",
              "optim.warmup_steps=30", "train.eval_every=150", "train.eval_batches=5", "train.log_every=25",
              "checkpoint.every=150"],
    finetune=["finetune.epochs=2", "finetune.max_seq_len=48", "finetune.max_train_samples=6000"],
)


@dataclass
class Stage:
    name: str
    seconds: float
    metrics: dict = field(default_factory=dict)


class Demo:
    def __init__(self, out: Path, quick: bool, gpus: int):
        self.out, self.quick, self.gpus = out, quick, gpus
        self.sizes = QUICK if quick else FULL
        self.stages: list[Stage] = []
        self.py = sys.executable

    def sh(self, name: str, argv: list[str], metrics: callable | None = None) -> None:
        print(f"\n=== {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(argv, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise UserError(f"demo stage '{name}' failed with exit status {proc.returncode} (command above)")
        self.stages.append(Stage(name, time.perf_counter() - t0, metrics() if metrics else {}))

    def ptft(self, *args: str) -> list[str]:
        return [self.py, "-m", "ptft_dist.cli", *args]

    def launch(self, *args: str) -> list[str]:
        """Pretraining: 2 CPU ranks (ZeRO-2, fp32), or one rank per GPU (bf16)."""
        mode = ["deepspeed", "--num_gpus", str(self.gpus or 2)]
        return ["bash", str(ROOT / "launch.sh"), *mode, "--", "ptft", *args]

    def run(self) -> list[Stage]:
        d, o = self.out / "data", self.out
        self.sh("demo-data", self.ptft("demo-data", "--output", str(d), *([] if self.quick else ["--with-minilm"])),
                lambda: {"articles": _count_lines(d / "news" / "news_articles.jsonl")})
        self.sh("prepare", self.ptft("prepare", "-i", str(d / "news" / "news_articles.jsonl"), "-o", str(o / "corpus"),
                                     "--overwrite", f"prepare.workers={os.cpu_count() or 1}", *self.sizes.prepare),
                lambda: _prepare_metrics(o / "corpus"))
        self.sh("verify", self.ptft("verify", str(o / "corpus"), "--quiet"))
        gpu = ["train.precision=bf16", "model.preset=small"] if self.gpus else []
        self.sh("pretrain", self.launch("pretrain", "-c", str(ROOT / "configs/pretrain/tiny-cpu.yaml"),
                                        "--corpus", str(o / "corpus"), "--run-dir", str(o / "pretrain"),
                                        "train.zero_stage=2", *self.sizes.pretrain, *gpu),
                lambda: _pretrain_metrics(o / "pretrain", o / "corpus"))
        self.sh("convert", self.ptft("convert", str(o / "pretrain"), "-o", str(o / "model"), "--overwrite"),
                lambda: {k: v for k, v in json.loads((o / "model" / "ptft_export.json").read_text()).items()
                         if k in ("step", "max_abs_logit_diff", "peak_rss_over_model_size")})
        self.sh("random-init", self.ptft("convert", str(o / "pretrain"), "-o", str(o / "random_init"), "--overwrite",
                                         "--random-init"))
        rt = d / "rotten_tomatoes"
        task = [f"finetune.train_file={rt / 'train.tsv'}", f"finetune.validation_file={rt / 'validation.tsv'}",
                f"finetune.test_file={rt / 'test.tsv'}", *self.sizes.finetune]
        lr_full, lr_lora = ("1e-3", "3e-3") if self.quick else ("5e-4", "2e-3")
        runs = [("finetune-full", o / "model", "full", lr_full), ("finetune-lora", o / "model", "lora", lr_lora)]
        if not self.quick:  # the quick demo does not check pretrained vs random init (check_learning): no baseline run
            runs.append(("finetune-random-init", o / "random_init", "full", lr_full))
        for name, model, method, lr in runs:
            out_dir = o / "finetune" / name
            self.sh(name, self.ptft("finetune", "-c", str(ROOT / "configs/finetune/rotten_tomatoes.yaml"),
                                    f"finetune.model={model}", f"finetune.method={method}",
                                    f"finetune.{'lora_lr' if method == 'lora' else 'lr'}={lr}",
                                    f"finetune.output_dir={out_dir}", *task),
                    lambda out_dir=out_dir: _finetune_metrics(out_dir))
        self.sh("report", self.ptft("report", str(o / "pretrain")))
        return self.stages


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _prepare_metrics(corpus: Path) -> dict:
    m = json.loads((corpus / "manifest.json").read_text())
    return {"train_tokens": sum(s["tokens"] for s in m["splits"]["train"]), "vocab": m["vocab_size"]}


def unigram_baseline(corpus: Path) -> float:
    """MLM accuracy of always guessing the most frequent validation token: what 'learning' must beat."""
    import numpy as np

    from ptft_dist.corpus.format import load_manifest, read_shard

    m = load_manifest(corpus)
    counts = np.zeros(m.vocab_size, dtype=np.int64)
    for info in m.shards("validation"):
        counts += np.bincount(read_shard(corpus / info.path).tokens, minlength=m.vocab_size)
    return float(counts.max() / max(counts.sum(), 1))


def _pretrain_metrics(run_dir: Path, corpus: Path) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ev = [r for r in records if r["split"] == "eval"]
    tr = [r for r in records if r["split"] == "train"]
    out = {"steps": tr[-1]["step"], "tokens_per_s": round(tr[-1]["tokens_per_s"]),
           "unigram_baseline_acc": round(unigram_baseline(corpus), 4)}
    if ev:
        out.update(eval_mlm_acc=round(ev[-1]["mlm_acc"], 4), eval_nsp_acc=round(ev[-1].get("nsp_acc", 0), 4),
                   eval_ppl=round(ev[-1]["perplexity"], 1))
    return out


# A fine-tune has learned when its test predictions say something about the labels: z = MCC·√n ≥ 3.
# A constant predictor (e.g. always the majority class, accuracy 0.50-0.51 on Rotten Tomatoes) has
# MCC 0, and predictions independent of the labels give MCC ~ N(0, 1/n) (n·MCC² is the χ² statistic
# of the 2×2 table): z ≥ 3 happens by chance with p ≈ 0.001. Accuracy alone cannot tell a model
# that learned a little from one that always answers the majority class.
MIN_LEARNING_Z = 3.0


def learning_z(test_metrics: dict, n_test: int) -> float:
    """MCC·√n of a classifier's test predictions (see MIN_LEARNING_Z)."""
    return float(test_metrics["mcc"]) * math.sqrt(n_test)


def _finetune_metrics(out_dir: Path) -> dict:
    r = json.loads((out_dir / "results.json").read_text())
    n = int(r["task"]["examples"]["test"])
    return {"test_accuracy": round(r["test"]["accuracy"], 4), "test_macro_f1": round(r["test"]["macro_f1"], 4),
            "test_mcc": round(r["test"]["mcc"], 4), "learning_z": round(learning_z(r["test"], n), 2),
            "validation_accuracy": round(r["validation"]["accuracy"], 4)}


def summary(stages: list[Stage], out: Path) -> str:
    lines = ["| stage | time | key metrics |", "|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {s.seconds:.0f}s | {', '.join(f'{k} {v}' for k, v in s.metrics.items())} |")
    total = sum(s.seconds for s in stages)
    lines += ["", f"total {total / 60:.1f} min; TensorBoard logs: {out / 'pretrain' / 'tb'} and "
                  f"{out / 'finetune'}/*/tb (tensorboard --logdir {out})", f"report: {out / 'pretrain' / 'report' / 'report.md'}"]
    return "\n".join(lines)


def check_learning(stages: list[Stage], quick: bool = False) -> list[str]:
    """The demo's promise: the model learns (held-out MLM accuracy well above the unigram baseline;
    both fine-tunes of the pretrained model, full and LoRA, significantly better than a constant or
    random predictor) and, at full size, pretraining beats random initialisation."""
    by = {s.name: s.metrics for s in stages}
    problems = []
    p = by.get("pretrain", {})
    if "eval_mlm_acc" in p and p["eval_mlm_acc"] < 1.5 * p["unigram_baseline_acc"]:
        problems.append(f"held-out MLM accuracy {p['eval_mlm_acc']} is not well above the unigram baseline "
                        f"{p['unigram_baseline_acc']}")
    for name in ("finetune-full", "finetune-lora"):
        m = by.get(name, {})
        if m and m["learning_z"] < MIN_LEARNING_Z:
            problems.append(f"{name} learned nothing measurable: test MCC {m['test_mcc']} (z = {m['learning_z']} < "
                            f"{MIN_LEARNING_Z}), accuracy {m['test_accuracy']}, macro-F1 {m['test_macro_f1']}")
    full, rnd = by.get("finetune-full", {}), by.get("finetune-random-init", {})
    if not quick and full and rnd and full["test_accuracy"] <= rnd["test_accuracy"]:
        problems.append(f"fine-tuned demo model ({full['test_accuracy']}) does not beat random init ({rnd['test_accuracy']})")
    return problems


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _require_checkout() -> None:
    """The demo drives the checkout's launch.sh and configs/, which a plain ``pip install .`` does
    not ship: stop before any stage runs instead of failing at pretraining (docs/design.md, guarantee 7)."""
    needed = ("launch.sh", "configs/pretrain/tiny-cpu.yaml", "configs/finetune/rotten_tomatoes.yaml")
    missing = [n for n in needed if not (ROOT / n).is_file()]
    if missing:
        raise UserError(f"ptft demo runs from a clone of the repository: {', '.join(missing)} not found next to "
                        f"the installed package ({ROOT}); clone it and run `bash scripts/demo.sh` there")


def run_demo(output: str | Path, quick: bool = False) -> int:
    _require_checkout()
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = Demo(out, quick, _gpu_count()).run()
    table = summary(stages, out)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps([s.__dict__ for s in stages], indent=2))
    print("\n" + table)
    problems = check_learning(stages, quick)
    for p in problems:
        print(f"ptft demo: did not learn: {p}", file=sys.stderr)
    return 1 if problems else 0
