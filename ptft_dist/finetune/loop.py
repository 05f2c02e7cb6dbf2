"""``ptft finetune``: full or LoRA fine-tuning of a BERT-family encoder on a labelled task.

The same engine as pretraining ("one engine, two loops")::

    tasks.py    labelled splits            model.py    classifier / LoRA, export, gather under ZeRO
    predict.py  encode, pad, sharded eval  train/engine.py  DeepSpeed ZeRO 0-3 or Accelerate

Every input is checked (task files, labels, model dir, tokenizer vs model, settings) before any
process group is joined or any file is written. The train split is sharded like
``DistributedSampler`` (a fixed-seed permutation per epoch, padded by repetition, strided over
ranks), so every rank takes the same number of steps, and with the same global batch a 1-rank
and a W-rank run see the same examples in every optimizer step; batches are grouped by length
(globally, so that still holds), which halves the padding on short-text tasks. Validation runs on all ranks
each epoch with predictions gathered, so its metrics are exact; the best epoch (by
``finetune.metric_for_best``) is exported to ``output_dir/best`` (atomically), and the test split
is evaluated with that exported model at the end: the numbers describe the files users get.
A new run in an existing ``output_dir`` first removes the old run's ``best/``, results and logs.

It runs unchanged as one process or under ``deepspeed`` / ``torchrun`` / ``srun``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ptft_dist import dist
from ptft_dist.config import Config, FinetuneConfig, OptimConfig, TrainConfig, save_resolved
from ptft_dist.engine.deepspeed import build_engine
from ptft_dist.engine.schedule import lr_lambda
from ptft_dist.finetune.evaluate import (
    Encoded,
    check_metric,
    collate,
    encode,
    is_better,
    model_forward,
    predict_logits,
    task_metrics,
)
from ptft_dist.finetune.model import (
    FinetuneError,
    build_model,
    check_model_dir,
    count_parameters,
    export_model,
    load_config,
    load_exported,
    load_tokenizer,
    trainable_state_dict,
)
from ptft_dist.finetune.tasks import Split, TaskData, load_task
from ptft_dist.metrics.throughput import MetricsLogger

RESULTS = "results.json"
BEST = "best"


# --------------------------------------------------------------------------- settings


def effective_lr(ft: FinetuneConfig) -> float:
    """``finetune.lora_lr`` for LoRA when it is set, else ``finetune.lr``."""
    return float(ft.lora_lr) if ft.method == "lora" and ft.lora_lr else float(ft.lr)


def check_settings(cfg: Config) -> None:
    ft = cfg.finetune
    if ft.method not in ("full", "lora"):
        raise FinetuneError(f"finetune.method: {ft.method!r} is not one of full, lora")
    if ft.export in ("adapter", "both") and ft.method != "lora":
        raise FinetuneError(f"finetune.export={ft.export} needs finetune.method=lora (a full fine-tune has no adapter)")
    for key in ("epochs", "batch_size", "max_seq_len"):
        if getattr(ft, key) < 1:
            raise FinetuneError(f"finetune.{key} must be >= 1, got {getattr(ft, key)}")
    if ft.method == "lora" and ft.lora_r < 1:
        raise FinetuneError(f"finetune.lora_r must be >= 1, got {ft.lora_r}")
    if not 0 <= ft.warmup_ratio < 1:
        raise FinetuneError(f"finetune.warmup_ratio must be in [0, 1), got {ft.warmup_ratio}")
    if ft.lora_lr < 0:
        raise FinetuneError(f"finetune.lora_lr must be >= 0 (0 = use finetune.lr), got {ft.lora_lr}")
    if not effective_lr(ft) > 0:
        raise FinetuneError(f"finetune.lr must be > 0, got {effective_lr(ft)}")
    check_metric(ft.task_type, ft.metric_for_best)


def engine_configs(cfg: Config, max_steps: int) -> tuple[TrainConfig, OptimConfig]:
    """The pretraining engine's sections with the fine-tuning values mapped in: per-rank micro
    batch, peak lr, linear schedule with ``warmup_ratio`` warmup over ``max_steps``."""
    ft = cfg.finetune
    warmup_ratio = float(ft.warmup_ratio)
    train = dataclasses.replace(cfg.train, micro_batch_size=ft.batch_size, max_steps=max_steps)
    optim = dataclasses.replace(cfg.optim, lr=effective_lr(ft), schedule="linear",
                                warmup_steps=min(max_steps, round(warmup_ratio * max_steps)))
    return train, optim


# --------------------------------------------------------------------------- data


def subsample(split: Split, n: int, seed: int) -> Split:
    """A fixed-seed subset of ``n`` examples (``finetune.max_train_samples``), in original order."""
    if not n or n >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return Split([split.texts[i] for i in keep], [split.pairs[i] for i in keep] if split.pairs else None,
                 split.labels[keep])


MEGABATCH = 50  # global batches sorted together when grouping by length (HF's LengthGroupedSampler)


def train_shard(n: int, rank: int, world: int, seed: int, epoch: int, lengths: Optional[np.ndarray] = None,
                global_batch: int = 1) -> np.ndarray:
    """This rank's examples for one epoch, in order.

    ``DistributedSampler(shuffle=True, drop_last=False)`` semantics: a permutation seeded by
    seed + epoch, padded by repetition to a multiple of the world size, strided over ranks. With
    ``lengths`` (group by length), each run of ``MEGABATCH`` global batches of that permutation is
    sorted longest first and the full global batches are shuffled: batches of similar lengths
    (about half the padding of random batches on short-text tasks), decided on the *global* order
    so micro-batch i of every rank still comes from global batch i, as without grouping.
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).numpy()
    total = math.ceil(n / world) * world
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    if lengths is not None:
        mega = MEGABATCH * global_batch
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in (order[i:i + mega] for i in range(0, total, mega))])
        full = total // global_batch
        batches = order[:full * global_batch].reshape(full, global_batch)
        order = np.concatenate([batches[torch.randperm(full, generator=g).numpy()].reshape(-1),
                                order[full * global_batch:]])
    return order[rank:total:world]


@dataclasses.dataclass
class Prepared:
    """Everything checked before the run connects or writes."""

    task: TaskData
    encoded: dict[str, Encoded]
    tokenizer: Any
    model: torch.nn.Module
    model_dir: Path


def prepare(cfg: Config) -> Prepared:
    """Load and check the task, model directory, tokenizer and settings (raises a UserError)."""
    ft = cfg.finetune
    check_settings(cfg)
    model_dir = check_model_dir(ft.model)
    task = load_task(ft)
    task.splits["train"] = subsample(task.splits["train"], ft.max_train_samples,
                                     cfg.train.seed)
    model_config = load_config(model_dir)
    max_pos = int(getattr(model_config, "max_position_embeddings", 512))
    if ft.max_seq_len > max_pos:
        raise FinetuneError(f"finetune.max_seq_len={ft.max_seq_len} exceeds the model's max_position_embeddings={max_pos}")
    tokenizer = load_tokenizer(model_dir, model_config)
    encoded = {s: encode(tokenizer, sp.texts, sp.pairs, ft.max_seq_len) for s, sp in task.splits.items()}
    if not len(encoded["train"]):
        raise FinetuneError(f"{ft.train_file or ft.hf_dataset}: the train split is empty")
    model = build_model(model_dir, task.label_names, ft, seed=cfg.train.seed)
    return Prepared(task, encoded, tokenizer, model, model_dir)


# --------------------------------------------------------------------------- helpers


def _mean_over_ranks(values: list[torch.Tensor], device: torch.device) -> float:
    t = torch.stack(values).double().mean() if values else torch.zeros((), dtype=torch.float64)
    t = t.to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return float(t)


def _agree(error: str) -> str:
    """Rank 0's error message on every rank (so all ranks raise together instead of hanging)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    obj = [error]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


def _say(main: bool, msg: str) -> None:
    if main:
        print(f"ptft finetune: {msg}", file=sys.stderr, flush=True)


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))


# --------------------------------------------------------------------------- the loop


def finetune(cfg: Config) -> dict:
    """Fine-tune, keep the best epoch as ``output_dir/best``, evaluate it on test; returns results.json's dict."""
    t_start = time.perf_counter()
    ft = cfg.finetune
    env = dist.discover()
    prep = prepare(cfg)  # every input check happens here, before anything connects or is written
    task, enc = prep.task, prep.encoded
    dist.init_distributed(env)
    device = dist.device_for(env)
    rank, world, main = env.rank, env.world_size, env.is_main
    out_dir = Path(ft.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a new run: an old run's model, results and logs must not be taken for this one's
        (out_dir / RESULTS).unlink(missing_ok=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        for stale in ("tb", BEST):
            shutil.rmtree(out_dir / stale, ignore_errors=True)
        save_resolved(cfg, out_dir)

    train_split = task.splits["train"]
    n_train = len(train_split)
    mb = ft.batch_size
    micro_per_epoch = math.ceil(math.ceil(n_train / world) / mb)
    max_steps = max(1, ft.epochs * micro_per_epoch // max(cfg.train.grad_accum, 1))
    train_cfg, optim_cfg = engine_configs(cfg, max_steps)
    params = count_parameters(prep.model)
    engine = build_engine(prep.model, train_cfg, optim_cfg, lr_lambda(optim_cfg, max_steps), world, device)
    if main:
        engine.save_ds_config(out_dir / "ds_config.json")
    metrics = MetricsLogger(out_dir, enabled=main)
    pad_id = int(prep.tokenizer.pad_token_id)
    pad_multiple = 8 if engine.device.type == "cuda" else 1
    global_batch = mb * world * engine.grad_accum
    lengths = enc["train"].lengths() if ft.group_by_length else None
    _say(main, f"{ft.method} fine-tuning of {prep.model_dir} on {n_train} examples "
               f"({'regression' if ft.task_type == 'regression' else f'{task.num_labels} labels'}), "
               f"{params['trainable'] / 1e6:.3g}M of {params['total'] / 1e6:.3g}M parameters trained, {world} rank(s), "
               f"global batch {global_batch}, {max_steps} steps, lr {optim_cfg.lr:g}, backend {engine.backend} "
               f"ZeRO-{engine.zero_stage} {engine.precision_name}")

    def validate(engine: Any) -> dict:
        engine.eval()
        logits = predict_logits(lambda b: engine.forward(**b).logits, enc["validation"], mb, pad_id, rank, world,
                                pad_multiple)
        engine.train()
        return task_metrics(ft.task_type, task.splits["validation"].labels, logits)

    timings = {"train_s": 0.0, "validation_s": 0.0, "export_s": 0.0}
    history: list[dict] = []
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    best_validation: dict = {}
    bad_epochs = 0
    step = 0
    early_stopped = False
    for epoch in range(1, ft.epochs + 1):
        t0 = time.perf_counter()
        engine.train()
        idx = train_shard(n_train, rank, world, cfg.train.seed, epoch - 1, lengths, global_batch)
        window: list[torch.Tensor] = []
        epoch_losses: list[torch.Tensor] = []
        for s in range(0, len(idx), mb):
            batch = collate(enc["train"], idx[s:s + mb], pad_id, train_split.labels, pad_multiple)
            if ft.task_type == "regression":  # MSE against bf16/fp16 logits needs targets of the same dtype
                batch["labels"] = batch["labels"].to(engine.precision)
            out = engine.forward(**batch)
            engine.backward(out.loss)
            boundary = engine.is_accumulation_boundary
            engine.step()
            loss = out.loss.detach().float()
            window.append(loss)
            epoch_losses.append(loss)
            if boundary:
                step += 1
                if step % max(cfg.train.log_every, 1) == 0:
                    metrics.log(step, {"loss": _mean_over_ranks(window, engine.device), "lr": engine.lr,
                                       "grad_norm": engine.grad_norm, "epoch": epoch})
                    window = []
        train_loss = _mean_over_ranks(epoch_losses, engine.device)
        timings["train_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        val = validate(engine)
        timings["validation_s"] += time.perf_counter() - t0
        metrics.log(step, {"loss": train_loss, "epoch": epoch}, split="train_epoch")
        metrics.log(step, {**val, "epoch": epoch}, split="validation")
        history.append({"epoch": epoch, "step": step, "train_loss": train_loss, "validation": val})
        value = val[ft.metric_for_best]
        improved = is_better(ft.metric_for_best, value, best)
        _say(main, f"epoch {epoch}/{ft.epochs}: train loss {train_loss:.4f}; validation {_fmt(val)}"
                   + (" (best so far)" if improved else ""))
        if improved:
            best, best_epoch, best_validation, bad_epochs = value, epoch, val, 0
            t0 = time.perf_counter()
            _export_best(engine, prep, cfg, out_dir / BEST, main, {"epoch": epoch, ft.metric_for_best: value})
            timings["export_s"] += time.perf_counter() - t0
        else:
            bad_epochs += 1
            if ft.early_stopping_patience and bad_epochs >= ft.early_stopping_patience:
                early_stopped = True
                _say(main, f"early stopping: no {ft.metric_for_best} improvement for {bad_epochs} epoch(s)")
                break
    if best_epoch is None:  # the metric was never finite: keep the last epoch, so there is a model to test
        best_epoch, best_validation = len(history), history[-1]["validation"]
        _export_best(engine, prep, cfg, out_dir / BEST, main, {"epoch": best_epoch})
    metrics.close()
    engine_info = {"backend": engine.backend, "zero_stage": engine.zero_stage, "precision": engine.precision_name}
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    t0 = time.perf_counter()
    best_dir = out_dir / BEST
    ex = load_exported(best_dir, device)
    test_logits = predict_logits(model_forward(ex.model, device), enc["test"], mb, pad_id, rank, world, pad_multiple)
    test = task_metrics(ft.task_type, task.splits["test"].labels, test_logits)
    timings["test_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["train_samples_per_s"] = len(history) * n_train / max(timings["train_s"], 1e-9)
    timings = {k: round(v, 3) for k, v in timings.items()}
    results = {
        "method": ft.method,
        "model": str(prep.model_dir),
        "best_model": str(best_dir),
        "export": ft.export if ft.method == "lora" else "merged",
        "task": {"task_type": ft.task_type, "label_names": task.label_names,
                 "examples": {s: len(sp) for s, sp in task.splits.items()}},
        "validation": best_validation,
        "test": test,
        "metric_for_best": ft.metric_for_best,
        "best_metric": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "early_stopped": early_stopped,
        "steps": step,
        "world_size": world,
        **engine_info,
        "parameters": params,
        "hyperparameters": {"lr": optim_cfg.lr, "batch_size_per_rank": mb, "global_batch_size": global_batch,
                            "max_seq_len": ft.max_seq_len, "group_by_length": lengths is not None, "epochs": ft.epochs, "max_steps": max_steps,
                            "warmup_steps": optim_cfg.warmup_steps, "weight_decay": optim_cfg.weight_decay,
                            "seed": cfg.train.seed},
        "timings": timings,
        "history": history,
    }
    if main:
        MetricsLogger(out_dir, enabled=True).log(step, test, split="test")
        _write_json_atomic(out_dir / RESULTS, results)
        _say(main, f"done in {timings['total_s']:.0f}s: best epoch {best_epoch} ({ft.metric_for_best} {best_validation.get(ft.metric_for_best, float('nan')):.4f}); "
                   f"test {_fmt(test)}; model {best_dir}; results {out_dir / RESULTS}")
    return results


def _export_best(engine: Any, prep: Prepared, cfg: Config, out: Path, main: bool, extra: dict) -> None:
    """Gather the trained weights (every rank: a collective under ZeRO) and export them on rank 0."""
    trained = trainable_state_dict(engine.module, keep=main)
    error = ""
    if main:
        try:
            export_model(prep.model_dir, prep.task.label_names, cfg.finetune, trained, out, cfg.train.seed, extra)
        except Exception as exc:  # reported on every rank below, so none waits forever
            error = f"{type(exc).__name__}: {exc}"
    error = _agree(error)
    if error:
        raise RuntimeError(f"export of {out} failed on rank 0: {error}")
