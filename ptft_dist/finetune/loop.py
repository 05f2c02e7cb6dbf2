"""``ptft finetune``: full or LoRA fine-tuning of a BERT-family encoder on a labelled task.

The same engine as pretraining ("one engine, two loops")::

    finetune/settings.py  what the run reads       finetune/tasks.py     labelled splits
    finetune/batches.py   encode, pad, shards      finetune/model.py     classifier / LoRA, export
    finetune/evaluate.py  sharded eval, metrics    engine/               DeepSpeed ZeRO 0-3 or Accelerate

The run reads its settings once (finetune/settings.py): the ``finetune`` section, plus the
engine settings of ``train.*`` / ``optim.*`` it honours; a pretraining-only key set to anything
but its default is refused instead of silently ignored (docs/finetuning.md, "Settings"). Every
input is checked (settings, task files, labels, model dir, tokenizer vs model) before any process
group is joined or any file is written (docs/design.md, guarantee 7). The train split is sharded
like ``DistributedSampler`` so every rank takes the same number of steps and a 1-rank and a W-rank
run with the same global batch see the same examples in every step (docs/design.md, guarantee 2).
Validation runs on all ranks each epoch with predictions gathered, so its metrics are exact; the
best epoch (by ``finetune.metric_for_best``) is exported to ``output_dir/best`` atomically
(docs/design.md, guarantees 5 and 8), and the test split is evaluated with that exported model at
the end: the numbers describe the files users get. A new run in an existing ``output_dir`` first
removes the old run's ``best/``, results, logs and checkpoints, so they cannot be taken for this
run's. A run that was interrupted (SIGUSR1/SIGTERM, or killed after a ``finetune.checkpoint_every``
checkpoint) continues from its latest checkpoint (``finetune.resume=auto``) to the same metrics
and the same ``best/`` as an uninterrupted run (finetune/resume.py; docs/design.md, guarantee 6).

It runs unchanged as one process or under ``deepspeed`` / ``torchrun`` / ``srun``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ptft_dist.checkpoint.manager import CHECKPOINTS_DIR
from ptft_dist.checkpoint.universal import read_meta
from ptft_dist.config import Config, save_resolved
from ptft_dist.dist.collectives import broadcast_object, mean_over_ranks
from ptft_dist.dist.discover import discover
from ptft_dist.dist.layout import DistEnv
from ptft_dist.dist.rendezvous import device_for, init_distributed
from ptft_dist.engine import build_engine
from ptft_dist.engine.compile import compile_engine, compile_seconds
from ptft_dist.engine.schedule import lr_lambda
from ptft_dist.finetune import kinds
from ptft_dist.finetune.batches import Encoded, batches, train_shard
from ptft_dist.finetune.evaluate import is_better, model_forward, predict_logits
from ptft_dist.finetune.model import (
    FinetuneError,
    build_model,
    check_model_dir,
    export_model,
    load_config,
    load_exported,
    load_tokenizer,
    trainable_state_dict,
)
from ptft_dist.finetune.output_dir import check_output_dir
from ptft_dist.finetune.packing import enable_packing
from ptft_dist.finetune.resume import BEST, Checkpointing, Progress, identity
from ptft_dist.finetune.settings import Plan, Settings, plan_steps, read_settings
from ptft_dist.finetune.tasks import TaskData
from ptft_dist.fsutil import remove_tree, write_json_atomic
from ptft_dist.log import get_logger
from ptft_dist.metrics.logger import MetricsLogger
from ptft_dist.metrics.parameters import count_parameters

RESULTS = "results.json"

log = get_logger("finetune")


# --------------------------------------------------------------------------- data and model


@dataclass
class Prepared:
    """Everything checked before the run connects or writes."""

    settings: Settings
    task: TaskData
    encoded: dict[str, Encoded]
    tokenizer: Any
    model: torch.nn.Module
    model_dir: Path


def prepare(cfg: Config) -> Prepared:
    """Load and check the settings, task, model directory and tokenizer (raises a UserError)."""
    s = read_settings(cfg)
    ft = s.ft
    model_dir = check_model_dir(ft.model)
    check_output_dir(ft, model_dir)
    task = kinds.load(ft)
    model_config = load_config(model_dir)
    max_pos = int(getattr(model_config, "max_position_embeddings", 512))
    if ft.max_seq_len > max_pos:
        raise FinetuneError(f"finetune.max_seq_len={ft.max_seq_len} exceeds the model's max_position_embeddings={max_pos}")
    tokenizer = load_tokenizer(model_dir, model_config)
    encoded = {name: kinds.encode_split(tokenizer, ft, task, name, ft.max_seq_len, train=name == "train")
               for name in task.splits}
    if not len(encoded["train"]):
        raise FinetuneError(f"{ft.train_file or ft.hf_dataset}: the train split is empty")
    model = build_model(model_dir, task.label_names, ft, seed=s.seed)
    if ft.unpad:
        enable_packing(model)  # the training module only; exports are built fresh (finetune/packing.py)
    return Prepared(s, task, encoded, tokenizer, model, model_dir)


def start_output_dir(cfg: Config, out_dir: Path, resuming: bool = False) -> None:
    """Rank 0: an old run's model, results, logs and checkpoints must not be taken for this run's
    (a resumed run keeps its own: they are this run's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        (out_dir / RESULTS).unlink(missing_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        for stale in ("tb", BEST, CHECKPOINTS_DIR):
            remove_tree(out_dir / stale)
    save_resolved(cfg, out_dir)


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """The run once the process group and the engine are up."""

    prep: Prepared
    plan: Plan
    engine: Any
    device: torch.device
    rank: int
    world: int
    main: bool
    out_dir: Path
    metrics: MetricsLogger
    params: dict
    pad_id: int
    pad_multiple: int  # 8 on GPU (tensor cores), 1 on CPU
    global_batch: int
    lengths: Optional[np.ndarray]  # train example lengths when grouping by length
    ckpt: Optional[Checkpointing] = None  # checkpoints and the preemption handler (finetune/resume.py)

    def say(self, msg: str) -> None:
        if self.main:
            log.info(msg)


def build_run(prep: Prepared, env: DistEnv, device: torch.device, resume_from: Optional[Path] = None) -> Run:
    """The engine around the prepared model, and what every step needs from it."""
    s = prep.settings
    resumed_stage = read_meta(resume_from).get("zero_stage") if resume_from is not None else None
    plan = plan_steps(s, len(prep.encoded["train"]), env.world_size, resumed_stage)
    if env.is_main and plan.engine_train.zero_stage != s.engine_train.zero_stage:
        log.info(f"1 rank: ZeRO-{s.engine_train.zero_stage} has nothing to partition; running ZeRO-"
                 f"{plan.engine_train.zero_stage} (the same updates, without ZeRO's per-step gradient copies)")
    params = count_parameters(prep.model)
    engine = build_engine(prep.model, plan.engine_train, plan.engine_optim,
                          lr_lambda(plan.engine_optim, plan.max_steps), env.world_size, device)
    if s.ft.compile:
        compile_engine(engine)
    out_dir = Path(s.ft.output_dir)
    if env.is_main:
        engine.save_ds_config(out_dir / "ds_config.json")
    return Run(prep, plan, engine, device, env.rank, env.world_size, env.is_main, out_dir,
               MetricsLogger(out_dir, enabled=env.is_main), params, int(prep.tokenizer.pad_token_id),
               8 if engine.device.type == "cuda" else 1, s.ft.batch_size * env.world_size * engine.grad_accum,
               prep.encoded["train"].lengths() if s.ft.group_by_length else None)


def announce(run: Run) -> None:
    ft, task, engine, params = run.prep.settings.ft, run.prep.task, run.engine, run.params
    labels = kinds.describe(ft.task_type, task)
    n, feats = len(task.splits["train"]), len(run.prep.encoded["train"])
    examples = f"{n} examples" + (f" ({feats} windows)" if feats != n else "")
    run.say(f"{ft.method} fine-tuning of {run.prep.model_dir} on {examples} ({labels}), "
            f"{params['trainable'] / 1e6:.3g}M of {params['total'] / 1e6:.3g}M parameters trained, "
            f"{run.world} rank(s), global batch {run.global_batch}, {run.plan.max_steps} steps, "
            f"lr {run.plan.engine_optim.lr:g}, backend {engine.backend} ZeRO-{engine.zero_stage} {engine.precision_name}")
    report_task_notes(task, run.main)


def report_task_notes(task: TaskData, main: bool) -> None:
    """What the task's data made the run skip or makes its numbers mean less (also in results.json)."""
    if not main:
        return
    for split, n in task.empty_skipped.items():
        log.info(f"{split} split: {n} empty text(s) skipped")
    for warning in task.warnings:
        log.warning(warning)


def train_epoch(run: Run, epoch: int, progress: Progress) -> float:
    """One pass over this rank's shard (its rest, when resumed inside the epoch); returns the
    epoch's mean train loss over all ranks."""
    s, engine = run.prep.settings, run.engine
    split = run.prep.task.splits["train"]
    engine.train()
    idx = train_shard(len(run.prep.encoded["train"]), run.rank, run.world, s.seed, epoch - 1, run.lengths, run.global_batch)
    idx = idx[progress.epoch_micro * s.ft.batch_size:]  # a resumed epoch skips what it already trained on
    last_step = run.ckpt.last_step_of(epoch)
    for batch in batches(run.prep.encoded["train"], idx, s.ft.batch_size, run.pad_id,
                         kinds.train_labels(s.ft.task_type, split), run.pad_multiple):
        if s.ft.task_type == "regression":  # MSE against bf16/fp16 logits needs targets of the same dtype
            batch["labels"] = batch["labels"].to(engine.precision)
        out = engine.forward(**batch)
        engine.backward(out.loss)
        boundary = engine.is_accumulation_boundary
        engine.step()
        progress.add_loss(out.loss.detach().float())
        if boundary:
            progress.step += 1
            if progress.step % s.log_every == 0:
                run.metrics.log(progress.step, {"loss": mean_over_ranks(progress.window), "lr": engine.lr,
                                                "grad_norm": engine.grad_norm, "epoch": epoch})
                progress.window = []
            if progress.step < last_step:  # an epoch's last step is checkpointed after its validation
                run.ckpt.at_boundary(run, progress)
    return mean_over_ranks(progress.epoch_losses)


def validate(run: Run) -> dict:
    """Metrics of the whole validation split: every rank a shard, logits gathered."""
    engine = run.engine
    engine.eval()
    outputs = predict_logits(lambda b: kinds.head_output(engine.forward(**b)), run.prep.encoded["validation"],
                             run.prep.settings.ft.batch_size, run.pad_id, run.rank, run.world, run.pad_multiple)
    engine.train()
    return kinds.split_metrics(run.prep.settings.ft, run.prep.task, "validation", run.prep.encoded["validation"],
                               outputs)


def end_epoch(run: Run, progress: Progress, epoch: int, train_loss: float, val: dict) -> bool:
    """Record the epoch, export it when it is the best so far; True when early stopping ends the run."""
    ft = run.prep.settings.ft
    run.metrics.log(progress.step, {"loss": train_loss, "epoch": epoch}, split="train_epoch")
    run.metrics.log(progress.step, {**val, "epoch": epoch}, split="validation")
    progress.history.append({"epoch": epoch, "step": progress.step, "train_loss": train_loss, "validation": val})
    value = val[ft.metric_for_best]
    improved = is_better(ft.metric_for_best, value, progress.best)
    run.say(f"epoch {epoch}/{ft.epochs}: train loss {train_loss:.4f}; validation {_fmt(val)}"
            + (" (best so far)" if improved else ""))
    if improved:
        progress.best, progress.best_epoch, progress.best_validation, progress.bad_epochs = value, epoch, val, 0
        t0 = time.perf_counter()
        export_best(run, {"epoch": epoch, ft.metric_for_best: value, **_kept_for_inference(ft, val)})
        progress.timings["export_s"] += time.perf_counter() - t0
        return False
    progress.bad_epochs += 1
    if ft.early_stopping_patience and progress.bad_epochs >= ft.early_stopping_patience:
        progress.early_stopped = True
        run.say(f"early stopping: no {ft.metric_for_best} improvement for {progress.bad_epochs} epoch(s)")
        return True
    return False


def fit(run: Run, progress: Progress) -> Progress:
    """Train → validate → export the best, epoch by epoch, from where ``progress`` stands."""
    epochs = run.prep.settings.ft.epochs
    for epoch in range(progress.epoch, epochs + 1):
        t0, c0, cpu0 = time.perf_counter(), compile_seconds(), time.process_time()  # compile time kept apart
        train_loss = train_epoch(run, epoch, progress)
        c1 = compile_seconds()
        progress.timings["train_s"] += time.perf_counter() - t0 - (c1 - c0)
        # CPU seconds of this process (all its threads): a second view of throughput on a shared machine
        # (benchmarks/finetune_throughput.py); heavy oversubscription inflates it too (OpenMP spin-waits)
        progress.timings["train_cpu_s"] = progress.timings.get("train_cpu_s", 0.0) + time.process_time() - cpu0 - (c1 - c0)
        t0 = time.perf_counter()
        val = validate(run)
        c2 = compile_seconds()
        progress.timings["validation_s"] += time.perf_counter() - t0 - (c2 - c1)
        if c2 > c0:
            progress.timings["compile_s"] = progress.timings.get("compile_s", 0.0) + c2 - c0
        if end_epoch(run, progress, epoch, train_loss, val) or epoch == epochs:
            break
        progress.next_epoch()
        if run.ckpt.epoch_end_aligned(epoch):
            run.ckpt.at_boundary(run, progress)
    if progress.best_epoch is None:  # the metric was never finite: keep the last epoch, so there is a model to test
        progress.best_epoch, progress.best_validation = len(progress.history), progress.history[-1]["validation"]
        export_best(run, {"epoch": progress.best_epoch, **_kept_for_inference(run.prep.settings.ft, progress.best_validation)})
    return progress


def _kept_for_inference(ft: Any, val: dict) -> dict:
    """What ``ptft predict`` / ``evaluate`` must repeat of the run: QA's windows and span search, and
    SQuAD v2's no-answer threshold tuned on validation."""
    if ft.task_type != "extractive_qa":
        return {}
    keep = {"doc_stride": ft.doc_stride, "max_answer_length": ft.max_answer_length, "n_best": ft.n_best}
    return {**keep, "null_threshold": val["null_threshold"]} if "null_threshold" in val else keep


def export_best(run: Run, extra: dict) -> None:
    """Gather the trained weights (every rank: a collective under ZeRO) and export them on rank 0."""
    prep, out = run.prep, run.out_dir / BEST
    trained = trainable_state_dict(run.engine.module, keep=run.main)
    error = ""
    if run.main:
        try:
            export_model(prep.model_dir, prep.task.label_names, prep.settings.ft, trained, out, prep.settings.seed,
                         extra)
        except Exception as exc:  # reported on every rank below, so none waits forever
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast_object(error)
    if error:
        raise RuntimeError(f"export of {out} failed on rank 0: {error}")


def close_engine(run: Run) -> dict:
    """Free the engine (its optimizer state) before the test model is loaded; returns its description."""
    run.metrics.close()
    engine = run.engine
    info = {"backend": engine.backend, "zero_stage": engine.zero_stage, "precision": engine.precision_name}
    run.engine = engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return info


def evaluate_best_on_test(run: Run) -> dict:
    """The exported ``best/`` model on the test split: the numbers describe the files users get (QA:
    with the no-answer threshold tuned on validation for that model)."""
    ex = load_exported(run.out_dir / BEST, run.device)
    outputs = predict_logits(model_forward(ex.model, run.device), run.prep.encoded["test"],
                             run.prep.settings.ft.batch_size, run.pad_id, run.rank, run.world, run.pad_multiple)
    return kinds.split_metrics(run.prep.settings.ft, run.prep.task, "test", run.prep.encoded["test"], outputs,
                               null_threshold=ex.extra.get("null_threshold"))


def results_of(run: Run, progress: Progress, test: dict, engine_info: dict) -> dict:
    """results.json's content."""
    s, task = run.prep.settings, run.prep.task
    ft = s.ft
    return {
        "method": ft.method,
        "model": str(run.prep.model_dir),
        "best_model": str(run.out_dir / BEST),
        "export": ft.export if ft.method == "lora" else "merged",
        "task": {"task_type": ft.task_type, "label_names": task.label_names,
                 "examples": {name: len(sp) for name, sp in task.splits.items()},
                 "features": {name: len(enc) for name, enc in run.prep.encoded.items()},
                 "empty_texts_skipped": task.empty_skipped, **task.info},
        "warnings": task.warnings,
        "validation": progress.best_validation,
        "test": test,
        "metric_for_best": ft.metric_for_best,
        "best_metric": progress.best,
        "best_epoch": progress.best_epoch,
        "epochs_run": len(progress.history),
        "early_stopped": progress.early_stopped,
        "steps": progress.step,
        "world_size": run.world,
        **engine_info,
        "parameters": run.params,
        "hyperparameters": {"lr": run.plan.engine_optim.lr, "batch_size_per_rank": ft.batch_size,
                            "global_batch_size": run.global_batch, "max_seq_len": ft.max_seq_len,
                            "group_by_length": run.lengths is not None, "epochs": ft.epochs,
                            "max_steps": run.plan.max_steps, "warmup_steps": run.plan.warmup_steps,
                            "weight_decay": run.plan.engine_optim.weight_decay, "seed": s.seed},
        "timings": progress.timings,
        "history": progress.history,
    }


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))


# --------------------------------------------------------------------------- the pipeline


def finetune(cfg: Config) -> dict:
    """Fine-tune, keep the best epoch as ``output_dir/best``, evaluate it on test; returns results.json's dict."""
    t_start = time.perf_counter()
    env = discover()
    prep = prepare(cfg)  # every input check happens here, before anything connects or is written
    init_distributed(env)
    device = device_for(env)
    ckpt = open_checkpoints(prep, env)
    resume_from = ckpt.resolve()  # a collective; refuses a checkpoint of other settings before anything is written
    if env.is_main:
        start_output_dir(cfg, Path(prep.settings.ft.output_dir), resuming=resume_from is not None)
    run = build_run(prep, env, device, resume_from)
    run.ckpt = ckpt
    progress = ckpt.load(run.engine, resume_from, run.out_dir / BEST)
    announce(run)
    if resume_from is not None:
        run.metrics.resume_from(progress.step)  # the steps after the checkpoint are logged again
        run.say(f"resumed from {resume_from} at step {progress.step} (epoch {progress.epoch}, "
                f"{progress.epoch_micro} micro-batches into it)")
    with ckpt.preemption:  # installed until results.json is written: a late signal lets the run finish
        results = _train_and_test(run, progress, t_start)
    ckpt.finish()
    return results


def _train_and_test(run: Run, progress: Progress, t_start: float) -> dict:
    prep = run.prep
    progress = fit(run, progress)
    engine_info = close_engine(run)

    t0 = time.perf_counter()
    test = evaluate_best_on_test(run)
    timings = progress.timings
    timings["test_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["train_samples_per_s"] = len(progress.history) * len(prep.task.splits["train"]) / max(timings["train_s"], 1e-9)
    progress.timings = {k: round(v, 3) for k, v in timings.items()}
    results = results_of(run, progress, test, engine_info)
    if run.main:
        write_results(run, progress, results)
    return results


def open_checkpoints(prep: Prepared, env: DistEnv) -> Checkpointing:
    """The run's checkpoints, with the settings a resume must share (finetune/resume.py)."""
    s, n_train = prep.settings, len(prep.encoded["train"])
    plan = plan_steps(s, n_train, env.world_size)
    ident = identity(s, plan, n_train, env.world_size, prep.model_dir, prep.task.label_names)
    return Checkpointing(s, n_train, env.world_size, env.rank, ident)


def write_results(run: Run, progress: Progress, results: dict) -> None:
    ft, path = run.prep.settings.ft, run.out_dir / RESULTS
    MetricsLogger(run.out_dir, enabled=True).log(progress.step, results["test"], split="test")
    write_json_atomic(path, results)
    best = progress.best_validation.get(ft.metric_for_best, float("nan"))
    run.say(f"done in {progress.timings['total_s']:.0f}s: best epoch {progress.best_epoch} "
            f"({ft.metric_for_best} {best:.4f}); test {_fmt(results['test'])}; model {run.out_dir / BEST}; "
            f"results {path}")
