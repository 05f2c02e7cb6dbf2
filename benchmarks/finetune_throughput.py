"""Fine-tuning throughput, token classification: ``ptft finetune`` vs Hugging Face ``Trainer``, same run.

Same model (a BERT directory: MiniLM-L6 from ``ptft demo-data --with-minilm`` by default), same
CoNLL data (NER sentences of the tests' generator, tests/finetune/task_factory.py: 5-15 words),
same batch, epochs, learning rate, warm-up ratio and weight decay, fp32 on CPU, one process each:

* **ptft**: the real CLI, ``ptft finetune`` with ``task_type: token_classification``, full fine-tuning,
  its defaults otherwise (DeepSpeed, ``train.zero_stage`` 2 which one rank runs as ZeRO-0,
  length-grouped batches; token classification has no packed path, and grouped batches of these
  sentences are ~98% real tokens anyway); examples/s = ``timings.train_samples_per_s`` of
  results.json (training time of the epochs, validation excluded).
* **HF**: ``Trainer`` + ``AutoModelForTokenClassification`` + ``DataCollatorForTokenClassification``
  over the same sentences tokenized with ``is_split_into_words`` and labels on the first piece of a
  word (ptft's ``label_subwords: first``), as HF's ``run_ner.py`` does; examples/s =
  ``train_samples_per_second`` of ``trainer.train()``, validation off. Twice: HF's defaults
  (random order), and ``group_by_length=True`` (``train_sampling_strategy="group_by_length"``, HF's own length grouping: the closest peer).

Runs alternate ptft / HF / HF-grouped ``--repeats`` times, so a change in the machine's load hits
all; medians are reported. ``ratio`` = ptft / HF default, ``ratio_vs_grouped`` = ptft / HF grouped.
On a shared machine wall time follows the neighbours' load: each side also reports examples per
CPU-second of training (``train_cpu_s``: its process, all threads, ``time.process_time``) and
``ratio_per_cpu_s[_vs_grouped]``, and each run the 1-minute load average it started under.

    python benchmarks/finetune_throughput.py [--model DIR] [--examples 2048] [--batch 32] [--repeats 3]
    python benchmarks/finetune_throughput.py --smoke   # tiny random BERT, a few hundred examples (~1 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PY, bench_env, emit, load_average, machine_info, ptft_command, run_checked

LR, WARMUP_RATIO, WEIGHT_DECAY, SEED = 5e-5, 0.06, 0.01, 42


def write_data(root: Path, n_train: int) -> dict[str, Path]:
    from tests.finetune.task_factory import write_conll

    root.mkdir(parents=True, exist_ok=True)
    sizes = {"train": (n_train, 1), "validation": (64, 2), "test": (64, 3)}
    return {split: write_conll(root / f"{split}.conll", n, seed) for split, (n, seed) in sizes.items()}


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence, read by ptft's own CoNLL reader (word: first column, tag: last)."""
    from ptft_dist.finetune.token_data import read_conll as ptft_read_conll

    raw = ptft_read_conll(str(path), 0, -1)
    return list(zip(raw.tokens, raw.tags))


def run_ptft(model: Path, data: dict[str, Path], args: argparse.Namespace, work: Path, tag: str) -> dict:
    out = work / f"ptft{tag}"
    ft = {"model": str(model), "task_type": "token_classification", "method": "full", "epochs": args.epochs,
          "batch_size": args.batch, "max_seq_len": args.max_seq_len, "lr": LR, "warmup_ratio": WARMUP_RATIO,
          "output_dir": str(out), **{f"{s}_file": str(p) for s, p in data.items()}}
    config = work / f"ptft{tag}.yaml"
    config.write_text(yaml.safe_dump({"finetune": ft, "optim": {"weight_decay": WEIGHT_DECAY},
                                      "train": {"seed": SEED, "precision": "fp32"}}))
    load_before = load_average()[:1]
    res = run_checked(ptft_command("finetune", ["--config", str(config), *args.ptft_set]), bench_env(args.threads),
                      timeout=args.timeout, log=work / f"ptft{tag}.log")
    results = json.loads((out / "results.json").read_text())
    timings = results["timings"]
    return {"examples_per_s": timings["train_samples_per_s"], "train_s": timings["train_s"],
            "examples_per_cpu_s": round(args.examples * args.epochs / timings["train_cpu_s"], 2),
            "train_cpu_s": timings["train_cpu_s"], "test_f1": results["test"]["f1"],
            "process_wall_s": round(res["wall_s"], 1), "load_1m_before": load_before}


def run_hf(model: Path, data: dict[str, Path], args: argparse.Namespace, work: Path, tag: str, grouped: bool) -> dict:
    spec = work / f"hf{tag}{'-grouped' if grouped else ''}.json"
    spec.write_text(json.dumps({"model": str(model), "train": str(data["train"]), "test": str(data["test"]),
                                "epochs": args.epochs, "batch": args.batch, "max_seq_len": args.max_seq_len,
                                "grouped": grouped, "output_dir": str(spec.with_suffix(""))}))
    load_before = load_average()[:1]
    res = run_checked([PY, str(Path(__file__).resolve()), "--hf-worker", str(spec)], bench_env(args.threads),
                      timeout=args.timeout, log=spec.with_suffix(".log"))
    out = json.loads(spec.with_suffix(".result").read_text())
    out["examples_per_cpu_s"] = round(args.examples * args.epochs / out["train_cpu_s"], 2)
    out["process_wall_s"], out["load_1m_before"] = round(res["wall_s"], 1), load_before
    return out


def hf_worker(spec_path: str) -> None:
    """In the HF subprocess: run_ner.py's recipe on the same sentences, batch and optimizer settings."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    spec = json.loads(Path(spec_path).read_text())
    train, test = read_conll(Path(spec["train"])), read_conll(Path(spec["test"]))
    labels = sorted({t for _, tags in train + test for t in tags})
    label_id = {t: i for i, t in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(spec["model"])

    def encode(sentences: list) -> list[dict]:
        rows = []
        for words, tags in sentences:
            enc = tok(words, is_split_into_words=True, truncation=True, max_length=spec["max_seq_len"])
            previous, ids = None, []
            for w in enc.word_ids():
                ids.append(-100 if w is None or w == previous else label_id[tags[w]])
                previous = w
            rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                         "token_type_ids": enc.get("token_type_ids", [0] * len(ids)), "labels": ids})
        return rows

    class Rows(torch.utils.data.Dataset):
        def __init__(self, rows: list[dict]):
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict:
            return self.rows[i]

    set_seed(SEED)
    model = AutoModelForTokenClassification.from_pretrained(
        spec["model"], num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id)
    steps = -(-len(train) // spec["batch"]) * spec["epochs"]
    targs = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch"], num_train_epochs=spec["epochs"],
        learning_rate=LR, warmup_steps=round(WARMUP_RATIO * steps),  # as ptft rounds finetune.warmup_ratio weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear",
        max_grad_norm=1.0, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, seed=SEED,
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if spec["grouped"] else "random")
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(encode(train)),
                      data_collator=DataCollatorForTokenClassification(tok))
    cpu0 = time.process_time()  # this process, all threads: as ptft's timings.train_cpu_s
    metrics = trainer.train().metrics
    train_cpu_s = time.process_time() - cpu0
    # entity F1 of the trained model on test, the seqeval way (a check that both sides learned alike)
    from seqeval.metrics import f1_score

    model.eval()
    gold, pred = [], []
    with torch.no_grad():
        for row, (_, tags) in zip(encode(test), test):
            logits = model(**{k: torch.tensor([v]) for k, v in row.items() if k != "labels"}).logits[0]
            first = [i for i, lab in enumerate(row["labels"]) if lab != -100]
            pred.append([labels[int(j)] for j in np.asarray(logits.argmax(-1))[first]])
            gold.append(tags[: len(first)])
    Path(spec_path).with_suffix(".result").write_text(json.dumps({
        "examples_per_s": metrics["train_samples_per_second"], "train_s": metrics["train_runtime"],
        "train_cpu_s": round(train_cpu_s, 3), "test_f1": f1_score(gold, pred)}))


def _median(runs: list[dict]) -> dict:
    ranked = sorted(runs, key=lambda r: r["examples_per_s"])
    out = dict(ranked[(len(ranked) - 1) // 2])
    out["examples_per_s_all_runs"] = [round(r["examples_per_s"], 1) for r in runs]
    out["examples_per_cpu_s_all_runs"] = [r["examples_per_cpu_s"] for r in runs]
    out["median_examples_per_cpu_s"] = statistics.median(r["examples_per_cpu_s"] for r in runs)
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="BERT-family dir (default: MiniLM-L6 from demo-data)")
    ap.add_argument("--examples", type=int, default=2048, help="training sentences")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP threads, both sides (default: usable CPUs)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, 256 examples, one repeat")
    ap.add_argument("--ptft-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a ptft config override, repeatable; e.g. train.deepspeed_config=ds_configs/zero2.json "
                         "runs the 1-rank ZeRO-2 engine of before issue 13")
    ap.add_argument("--work", type=Path, default=None, help="keep runs and logs here")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return {}
    if args.smoke:
        args.examples, args.repeats = 256, 1
    load_before, t0 = load_average(), time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="ptft-ft-tput-"))
    data = write_data(work / "data", args.examples)
    model = args.model
    if model is None and args.smoke:
        from lora_vs_full import tiny_model

        from tests.finetune.test_finetune import write_tsv

        write_tsv(work / "data" / "train.tsv", 64, 1)  # the tiny tokenizer's extra text
        model = tiny_model(work)
    elif model is None:
        from lora_vs_full import minilm

        model = minilm(work)
    sides: dict[str, list[dict]] = {"ptft": [], "hf_trainer": [], "hf_trainer_grouped": []}
    for r in range(args.repeats):
        tag = f"-{r}"
        sides["ptft"].append(run_ptft(model, data, args, work, tag))
        sides["hf_trainer"].append(run_hf(model, data, args, work, tag, grouped=False))
        sides["hf_trainer_grouped"].append(run_hf(model, data, args, work, tag, grouped=True))
    report: dict[str, Any] = {
        "benchmark": "finetune_throughput", "task": "token_classification (CoNLL NER, tests' generator)",
        "model": str(model), "examples": args.examples, "epochs": args.epochs, "batch": args.batch,
        "max_seq_len": args.max_seq_len, "precision": "fp32", "repeats": args.repeats, "ptft_set": args.ptft_set,
        **{side: _median(runs) for side, runs in sides.items()},
    }
    report["ratio"] = round(report["ptft"]["examples_per_s"] / report["hf_trainer"]["examples_per_s"], 3)
    report["ratio_vs_grouped"] = round(report["ptft"]["examples_per_s"]
                                       / report["hf_trainer_grouped"]["examples_per_s"], 3)
    report["ratio_all_repeats"] = [round(p["examples_per_s"] / h["examples_per_s"], 3)
                                   for p, h in zip(sides["ptft"], sides["hf_trainer"])]
    report["ratio_vs_grouped_all_repeats"] = [round(p["examples_per_s"] / h["examples_per_s"], 3)
                                              for p, h in zip(sides["ptft"], sides["hf_trainer_grouped"])]
    cpu = {side: report[side]["median_examples_per_cpu_s"] for side in sides}
    report["ratio_per_cpu_s"] = round(cpu["ptft"] / cpu["hf_trainer"], 3)
    report["ratio_per_cpu_s_vs_grouped"] = round(cpu["ptft"] / cpu["hf_trainer_grouped"], 3)
    report["seconds"] = round(time.time() - t0, 1)
    report["load_average_before"], report["load_average_after"] = load_before, load_average()
    report["machine"] = machine_info()
    report["median_f1"] = {side: round(statistics.median(r["test_f1"] for r in runs), 4) for side, runs in sides.items()}
    return emit(report, args.out)


if __name__ == "__main__":
    main()
