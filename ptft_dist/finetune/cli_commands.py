"""``ptft finetune | evaluate | predict``: argument parsing only; the work is in train.py / predict.py.

Wired into ``ptft_dist/cli.py`` by ``add_parsers(sub, add)``; also runnable on its own
(``python -m ptft_dist.finetune.cli_commands finetune ...``, or this file under ``deepspeed`` /
``torchrun``) with the same one-line error reporting as ``ptft``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import TextIO


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    for flag, key in (("model", "finetune.model"), ("method", "finetune.method"),
                      ("output_dir", "finetune.output_dir")):
        value = getattr(args, flag, None)
        if value:
            out.append(f"{key}={value}")
    return out


def cmd_finetune(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config
    from ptft_dist.finetune.train import finetune

    finetune(load_config(args.config, _overrides(args)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config
    from ptft_dist.finetune.predict import evaluate_model

    cfg = load_config(args.config, list(args.overrides))
    metrics = evaluate_model(args.model, cfg.finetune, args.split)
    print(json.dumps(metrics, indent=2))
    return 0


def read_inputs(stream: TextIO) -> Iterator[str | tuple[str, str]]:
    """One input per line; a TAB splits a line into (text, pair). Empty lines stay (one output per line)."""
    for line in stream:
        line = line.rstrip("\n").rstrip("\r")
        if "\t" in line:
            text, pair = line.split("\t", 1)
            yield text, pair
        else:
            yield line


def cmd_predict(args: argparse.Namespace) -> int:
    from ptft_dist.errors import UserError
    from ptft_dist.finetune.predict import predict

    if args.input and args.input != "-":
        try:
            stream = open(args.input, encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"--input: {args.input}: {exc.strerror}") from None
    else:
        stream = sys.stdin
    try:
        for row in predict(args.model, read_inputs(stream), batch_size=args.batch_size):
            sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    finally:
        if stream is not sys.stdin:
            stream.close()
    return 0


AddFn = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def add_parsers(sub: argparse._SubParsersAction, add: AddFn) -> None:
    """Register the three commands with cli.py's ``add(name, func, help)`` helper."""
    p = add("finetune", cmd_finetune, "fine-tune a BERT-family model on a labelled task (full or LoRA)")
    p.add_argument("--config", "-c", help="YAML config, e.g. configs/finetune/rotten_tomatoes.yaml")
    p.add_argument("--model", help="HF model directory (same as finetune.model=...)")
    p.add_argument("--method", choices=["full", "lora"], help="same as finetune.method=...")
    p.add_argument("--output-dir", help="where best/, results.json and logs go (finetune.output_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.epochs=2 finetune.lr=3e-5")

    p = add("evaluate", cmd_evaluate, "metrics of a fine-tuned model (merged or adapter dir) on a task split")
    p.add_argument("--model", required=True, metavar="DIR", help="an export (e.g. RUN/best) or adapter directory")
    p.add_argument("--config", "-c", required=True, help="YAML config whose finetune section names the task")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = add("predict", cmd_predict, "label + probabilities per input line (TAB = text pair), JSONL on stdout")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--input", "-i", default=None, metavar="FILE", help="one text per line (default: stdin)")
    p.add_argument("--batch-size", type=int, default=32)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m ptft_dist.finetune.cli_commands``): the ``ptft`` CLI itself,
    whose parser already holds these commands, with its error contract."""
    from ptft_dist.cli import main as ptft_main

    return ptft_main(argv)


if __name__ == "__main__":
    sys.exit(main())
