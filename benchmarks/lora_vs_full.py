"""LoRA vs full fine-tuning on three task types, several seeds: mean and spread of each test metric.

    python benchmarks/lora_vs_full.py [--model DIR] [--seeds 3] [--epochs 2] [--quick] [--out FILE]

Tasks: sentence classification (accuracy; Rotten Tomatoes from the demo data, ``--rt-train``
sentences, or generated sentences with ``--synthetic-classification``), NER (entity F1) and SQuAD v2
extractive QA (F1) on data written by the tests' generators (tests/finetune/task_factory.py). Each (task, method, seed) is one real ``ptft finetune`` run in a subprocess,
same data, batch and epochs for both methods; full uses ``--full-lr``, LoRA ``--lora-lr``.
``--model``: a BERT-family directory (default: MiniLM-L6 unpacked by ``ptft demo-data
--with-minilm`` into ``--work``); ``--quick``: a tiny random BERT, one seed, one epoch (checks
that the script runs, in a few minutes on 2 cores; its numbers mean nothing). Prints one JSON
report: per task and method the runs' metric, mean and standard deviation, and the LoRA - full
gap of the means, with the machine and its load average.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml
from _common import bench_env, emit, machine_info, ptft_command, run_checked  # puts the checkout on sys.path

TASKS = {  # task -> (task_type, file suffix, metric, max_seq_len, extra finetune keys)
    "classification": ("classification", "tsv", "accuracy", 64, {}),
    "ner": ("token_classification", "conll", "f1", 48, {}),
    "qa": ("extractive_qa", "json", "f1", 64, {"doc_stride": 16}),
}
SIZES = {"train": (320, 1), "validation": (64, 2), "test": (64, 3)}


def write_data(root: Path) -> None:
    from tests.finetune.task_factory import qa_examples, write_conll, write_squad_json
    from tests.finetune.test_finetune import write_tsv

    for split, (n, seed) in SIZES.items():
        write_tsv(root / f"{split}.tsv", n, seed)
        write_conll(root / f"{split}.conll", n, seed)
        write_squad_json(root / f"{split}.json", qa_examples(n, seed, unanswerable=0.25))


def tiny_model(root: Path) -> Path:
    from transformers import AutoTokenizer

    from tests.finetune.task_factory import train_tokenizer
    from tests.finetune.test_finetune import tiny_model as build

    sentences = [line.split("\t")[0] for line in (root / "data" / "train.tsv").read_text().splitlines()[1:]]
    train_tokenizer(root / "tok", extra=tuple(sentences))
    return build(root / "tiny", root / "tok", len(AutoTokenizer.from_pretrained(str(root / "tok"))))


def minilm(work: Path) -> Path:
    from ptft_dist.demo.data import fetch_demo_data

    fetch_demo_data(work / "demo", with_minilm=True)
    return work / "demo" / "minilm"


def split_files(work: Path, task: str, ext: str, args: argparse.Namespace) -> dict:
    """The task's train/validation/test files; Rotten Tomatoes (real sentences) for classification
    unless ``--synthetic-classification``."""
    if task == "classification" and not args.synthetic_classification:
        rt = work / "demo" / "rotten_tomatoes"
        return {**{f"{s}_file": str(rt / f"{s}.tsv") for s in SIZES}, "max_train_samples": args.rt_train}
    return {f"{s}_file": str(work / "data" / f"{s}.{ext}") for s in SIZES}


def run_one(work: Path, model: Path, task: str, method: str, seed: int, args: argparse.Namespace) -> float:
    task_type, ext, metric, seq, extra = TASKS[task]
    out = work / "runs" / f"{task}-{method}-{seed}"
    ft = {"model": str(model), "task_type": task_type, "method": method, "epochs": args.epochs,
          "batch_size": 16, "max_seq_len": seq, "lr": args.full_lr, "lora_lr": args.lora_lr,
          "output_dir": str(out), **split_files(work, task, ext, args), **extra}
    config = work / "configs" / f"{task}-{method}-{seed}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"finetune": ft, "train": {"seed": seed, "backend": "deepspeed", "zero_stage": 2}}))
    run_checked(ptft_command("finetune", ["--config", str(config)]), bench_env(args.threads), timeout=args.timeout,
                log=out.with_suffix(".log"))
    return float(yaml.safe_load((out / "results.json").read_text())["test"][metric])


def summarize(values: list[float]) -> dict:
    return {"runs": values, "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="BERT-family model dir (default: MiniLM-L6 from ptft demo-data)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--quick", action="store_true", help="tiny random model, 1 seed, 1 epoch: checks the script runs")
    p.add_argument("--rt-train", type=int, default=2000, help="Rotten Tomatoes train sentences (classification)")
    p.add_argument("--synthetic-classification", action="store_true",
                   help="generated sentences instead of Rotten Tomatoes for the classification task")
    p.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    p.add_argument("--out", help="also write the JSON report here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.full_lr, args.lora_lr = 1, 1, 2e-3, 5e-3
        args.synthetic_classification = True
    work = args.work or Path(tempfile.mkdtemp(prefix="lora_vs_full-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    write_data(work / "data")
    model = args.model or (tiny_model(work) if args.quick else minilm(work))
    if not args.synthetic_classification:
        from ptft_dist.demo.data import fetch_demo_data

        fetch_demo_data(work / "demo", with_minilm=False)
    report: dict = {"benchmark": "lora_vs_full", "model": str(model), "quick": args.quick, "epochs": args.epochs,
                    "seeds": args.seeds, "lr": {"full": args.full_lr, "lora": args.lora_lr}, "tasks": {}}
    for task in [t for t in args.tasks.split(",") if t]:
        if task not in TASKS:
            p.error(f"--tasks: unknown task {task!r} (one of {', '.join(TASKS)})")
        res = {m: summarize([run_one(work, model, task, m, 1 + s, args) for s in range(args.seeds)])
               for m in ("full", "lora")}
        res["metric"] = TASKS[task][2]
        res["lora_minus_full"] = res["lora"]["mean"] - res["full"]["mean"]
        report["tasks"][task] = res
    report["machine"] = machine_info()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
