"""What a fine-tuning run reads from its config, taken once, in one place.

``ptft finetune`` reads the ``finetune`` section, plus the engine settings of ``train.*`` and
``optim.*`` that it honours (backend, ZeRO stage, offload, DeepSpeed JSON, precision, gradient
accumulation, global batch check, seed, log interval; optimizer name, weight decay, betas, eps,
gradient clipping, min lr ratio) and of ``checkpoint.*`` (keep_last, requeue_exit_code: the
preemption protocol pretraining uses). The pretraining keys that fine-tuning has its own setting for
(``optim.lr`` → ``finetune.lr``, ``train.max_steps`` → ``finetune.epochs``, ...) are refused when
set, rather than silently overridden: a value the user wrote is either used or an error
(docs/finetuning.md, "Settings"; docs/design.md, guarantee 7).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from ptft_dist.config import CheckpointConfig, Config, FinetuneConfig, OptimConfig, TrainConfig
from ptft_dist.config_rules import FINETUNE_NOT_USED, unused_key_problems
from ptft_dist.finetune.evaluate import check_metric
from ptft_dist.finetune.kinds import default_metric
from ptft_dist.finetune.model import FinetuneError

# The train.* / optim.* / checkpoint.* keys a fine-tuning run does not read, and what to set instead.
# Every other key of those sections is honoured; the sections data, model and prepare belong to
# other stages and are refused when set (one mechanism for every command: config_rules.SCOPES).
NOT_USED: dict[str, str] = FINETUNE_NOT_USED


def refuse_unused_keys(cfg: Config) -> None:
    """A key fine-tuning does not read, set to anything but its default, is an error: the user meant
    it to change something, and fine-tuning would silently run without it."""
    problems = unused_key_problems(cfg, "finetune")
    if problems:
        raise FinetuneError(". ".join(problems))


def effective_lr(ft: FinetuneConfig) -> float:
    """``finetune.lora_lr`` for LoRA when it is set, else ``finetune.lr``."""
    return float(ft.lora_lr) if ft.method == "lora" and ft.lora_lr else float(ft.lr)


def check_settings(cfg: Config) -> None:
    """Settings that cannot work fail here, before anything connects or is written."""
    refuse_unused_keys(cfg)
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
    if ft.task_type == "extractive_qa" and ft.doc_stride >= ft.max_seq_len - 3:
        raise FinetuneError(f"finetune.doc_stride={ft.doc_stride} must be below finetune.max_seq_len - 3 "
                            f"({ft.max_seq_len - 3}): consecutive windows of a context must advance")


@dataclass(frozen=True)
class Settings:
    """Everything a fine-tuning run reads from its config, taken once after the checks."""

    ft: FinetuneConfig
    lr: float  # peak lr: finetune.lr, or finetune.lora_lr for LoRA
    seed: int  # train.seed: the new head's initialisation, the per-epoch shuffle
    log_every: int  # train.log_every (optimizer steps between metrics lines)
    grad_accum: int  # train.grad_accum
    engine_train: TrainConfig  # honoured: backend, zero_stage, offload_*, deepspeed_config, precision, global_batch_size
    engine_optim: OptimConfig  # honoured: name, weight_decay, betas, eps, grad_clip, min_lr_ratio
    checkpoint: CheckpointConfig  # every/resume from finetune.checkpoint_every/resume; keep_last, requeue_exit_code


def read_settings(cfg: Config) -> Settings:
    """The run's settings, checked (raises a UserError naming the key)."""
    check_settings(cfg)
    ft = cfg.finetune
    if not ft.metric_for_best:
        ft = dataclasses.replace(ft, metric_for_best=default_metric(ft.task_type))
    return Settings(ft=ft, lr=effective_lr(ft), seed=cfg.train.seed, log_every=max(cfg.train.log_every, 1),
                    grad_accum=cfg.train.grad_accum, engine_train=cfg.train, engine_optim=cfg.optim,
                    checkpoint=dataclasses.replace(cfg.checkpoint, every=ft.checkpoint_every, resume=ft.resume))


@dataclass(frozen=True)
class Plan:
    """The optimizer schedule, fixed once the train split and the world size are known."""

    max_steps: int
    warmup_steps: int
    engine_train: TrainConfig  # what the engine reads: finetune.batch_size per rank, max_steps
    engine_optim: OptimConfig  # peak lr, linear schedule with finetune.warmup_ratio warmup


def plan_steps(s: Settings, n_train: int, world: int, resumed_stage: Optional[int] = None) -> Plan:
    """Steps and the engine's view of the run. The fields filled in here are the ones
    :func:`refuse_unused_keys` makes sure the user did not set: nothing the user wrote is replaced
    (the ZeRO stage of a 1-rank run aside, which changes no update: :func:`effective_zero_stage`)."""
    ft = s.ft
    micro_per_epoch = math.ceil(math.ceil(n_train / world) / ft.batch_size)
    max_steps = max(1, ft.epochs * micro_per_epoch // max(s.grad_accum, 1))
    warmup = min(max_steps, round(float(ft.warmup_ratio) * max_steps))
    train = dataclasses.replace(s.engine_train, micro_batch_size=ft.batch_size, max_steps=max_steps,
                                zero_stage=effective_zero_stage(s.engine_train, world, resumed_stage))
    optim = dataclasses.replace(s.engine_optim, lr=s.lr, schedule="linear", warmup_steps=warmup)
    return Plan(max_steps, warmup, train, optim)




def effective_zero_stage(train: TrainConfig, world: int, resumed_stage: Optional[int] = None) -> int:
    """The ZeRO stage the engine runs. ZeRO-1/2 partition optimizer state and gradients over the
    ranks; at one rank there is nothing to partition, and DeepSpeed's ZeRO-1/2 optimizer only adds
    work each step (every gradient copied into a flat bucket and into a flat fp32 copy, the norm
    computed twice): on CPU that made ``ptft finetune`` slower than HF ``Trainer`` (issue 13;
    docs/finetuning.md, "Speed"). A 1-rank run therefore uses ZeRO-0: the same updates. Left as
    set: ZeRO-3 (chosen to build and hold a model partitioned), offload, the user's own DeepSpeed
    JSON, the Accelerate backend, and a run resumed from a ZeRO-1/2 checkpoint (``resumed_stage``:
    its optimizer state is in ZeRO's layout)."""
    stage = int(train.zero_stage)
    if (world == 1 and stage in (1, 2) and train.backend == "deepspeed" and not train.deepspeed_config
            and not (train.offload_optimizer or train.offload_params) and resumed_stage not in (1, 2)):
        return 0
    return stage
