"""The DeepSpeed config of a run: a shipped template or the user's JSON, with its ``"auto"`` fields
filled from the run config.

Templates: ``ptft_dist/engine/ds_configs/zero{stage}[_offload].json`` (package data; the repository's
top-level ``ds_configs`` is a link to that folder), or the user's own JSON
(``train.deepspeed_config``). The run config is the one source of truth: a value in the user's JSON
that contradicts it is an error naming both keys, raised before any process group or model exists
(docs/design.md, guarantee 7).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.engine.base import EngineConfigError, check_global_batch, resolve_precision

DS_CONFIG_DIR = Path(__file__).resolve().with_name("ds_configs")


def template_path(cfg_train: TrainConfig) -> Path:
    """The user's ``train.deepspeed_config``, else the shipped template for the ZeRO stage / offload."""
    if cfg_train.deepspeed_config:
        p = Path(cfg_train.deepspeed_config)
        if not p.is_file():
            raise EngineConfigError(f"train.deepspeed_config: file not found: {p}")
        return p
    if cfg_train.zero_stage not in (0, 1, 2, 3):
        raise EngineConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {cfg_train.zero_stage}")
    if cfg_train.offload_params and cfg_train.zero_stage != 3:
        raise EngineConfigError(f"train.offload_params=true needs train.zero_stage=3 (got {cfg_train.zero_stage})")
    offload = cfg_train.offload_optimizer or cfg_train.offload_params
    if offload and cfg_train.zero_stage < 2:
        raise EngineConfigError(f"train.offload_optimizer=true needs train.zero_stage 2 or 3 (got {cfg_train.zero_stage})")
    name = f"zero{cfg_train.zero_stage}" + ("_offload" if offload else "")
    return DS_CONFIG_DIR / f"{name}.json"


# --------------------------------------------------------------------------- "auto" filling


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _Resolver:
    """Fill ``"auto"`` values; check explicit ones against the run config."""

    def __init__(self, cfg: dict, source: str):
        self.cfg = cfg
        self.source = source

    def get(self, ds_key: str) -> Any:
        return _get(self.cfg, ds_key)

    def set(self, ds_key: str, value: Any) -> None:
        _set(self.cfg, ds_key, value)

    def fill(self, ds_key: str, value: Any, run_key: str, *, create: bool = True, same=None) -> None:
        """Set ``ds_key`` to ``value`` if "auto" (or missing and ``create``); else it must agree."""
        cur = self.get(ds_key)
        if cur == "auto" or (cur is _MISSING and create):
            self.set(ds_key, value)
            return
        if cur is _MISSING:
            return
        agree = same(cur, value) if same else _same(cur, value)
        if not agree:
            raise EngineConfigError(
                f"{self.source}: {ds_key}={json.dumps(cur)} contradicts {run_key}={json.dumps(value)} "
                f"(set it to \"auto\" or make both agree)")

    def default(self, ds_key: str, value: Any) -> None:
        """A tuning knob, not a run-config value: fill it only where it says "auto"."""
        if self.get(ds_key) == "auto":
            self.set(ds_key, value)

    def leftover_autos(self) -> list[str]:
        out: list[str] = []

        def walk(d: Any, prefix: str) -> None:
            if isinstance(d, dict):
                for k, v in d.items():
                    walk(v, f"{prefix}{k}.")
            elif d == "auto":
                out.append(prefix[:-1])

        walk(self.cfg, "")
        return out


# --------------------------------------------------------------------------- the steps


def _load_template(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise EngineConfigError(f"{path}: top level must be a JSON object")
    return cfg


def _fill_batch_and_precision(r: _Resolver, cfg_train: TrainConfig, cfg_optim: OptimConfig, world_size: int,
                              global_batch: int, precision: str) -> None:
    if "scheduler" in r.cfg:
        raise EngineConfigError(
            f"{r.source}: a \"scheduler\" section is not supported: the LR schedule comes from optim.schedule "
            f"(optim.warmup_steps, ...); remove the section")
    r.fill("train_micro_batch_size_per_gpu", cfg_train.micro_batch_size, "train.micro_batch_size")
    r.fill("gradient_accumulation_steps", cfg_train.grad_accum, "train.grad_accum")
    r.fill("train_batch_size", global_batch,
           "train.global_batch_size" if cfg_train.global_batch_size else
           f"train.micro_batch_size × train.grad_accum × world size {world_size}")
    r.fill("gradient_clipping", float(cfg_optim.grad_clip), "optim.grad_clip")
    r.fill("zero_optimization.stage", cfg_train.zero_stage, "train.zero_stage")
    r.fill("bf16.enabled", precision == "bf16", f"train.precision (resolved: {precision})")
    r.fill("fp16.enabled", precision == "fp16", f"train.precision (resolved: {precision})")


def _fill_offload(r: _Resolver, cfg_train: TrainConfig, is_cuda: bool) -> bool:
    """The template follows the run config; a user JSON must agree with it. Returns whether the
    optimizer state is offloaded."""
    offload_optimizer = cfg_train.offload_optimizer or cfg_train.offload_params
    for sec, flag, run_key in (("offload_optimizer", offload_optimizer, "train.offload_optimizer"),
                               ("offload_param", cfg_train.offload_params, "train.offload_params")):
        key = f"zero_optimization.{sec}.device"
        dev = r.get(key)
        if dev is _MISSING or dev == "auto":
            if flag:
                r.set(key, "cpu")
            elif dev == "auto":
                r.set(key, "none")
        elif (dev not in ("none", None)) != bool(flag):
            raise EngineConfigError(f"{r.source}: {key}={json.dumps(dev)} contradicts "
                                    f"{run_key}={json.dumps(bool(flag))}")
        r.default(f"zero_optimization.{sec}.pin_memory", is_cuda)
    return r.get("zero_optimization.offload_optimizer.device") not in (_MISSING, "none", None)


def _fill_optimizer(r: _Resolver, cfg_optim: OptimConfig) -> str:
    """Fill and check the optimizer section; returns its type, lower-cased."""

    def same_type(a: Any, b: str) -> bool:  # DeepSpeed's "Adam" with adam_w_mode (its default) is AdamW
        return str(a).lower() == b.lower() or (
            b == "AdamW" and str(a).lower() == "adam" and r.get("optimizer.params.adam_w_mode") is not False)

    r.fill("optimizer.type", {"adamw": "AdamW", "lamb": "Lamb"}[cfg_optim.name], "optim.name", same=same_type)
    r.fill("optimizer.params.lr", float(cfg_optim.lr), "optim.lr")
    r.fill("optimizer.params.betas", [float(b) for b in cfg_optim.betas], "optim.betas")
    r.fill("optimizer.params.eps", float(cfg_optim.eps), "optim.eps")
    r.fill("optimizer.params.weight_decay", float(cfg_optim.weight_decay), "optim.weight_decay")
    return str(r.cfg["optimizer"]["type"]).lower()


def _check_lamb(stage: int, device: torch.device) -> None:
    if stage > 0:
        raise EngineConfigError(
            f"optim.name=lamb with train.zero_stage={stage}: LAMB's per-layer trust ratio is wrong on ZeRO's "
            f"flattened partitions; use train.zero_stage=0 with lamb, or optim.name=adamw")
    if device.type != "cuda":
        raise EngineConfigError(
            f"optim.name=lamb needs DeepSpeed's FusedLamb, a CUDA op: not available on device {device.type}; "
            f"use optim.name=adamw here")


def _hidden_size(model: Optional[torch.nn.Module]) -> Optional[int]:
    conf = getattr(model, "config", None)
    h = getattr(conf, "hidden_size", None)
    return int(h) if isinstance(h, int) else None


def zero3_live_parameters(hidden: int) -> int:
    """ZeRO-3's bound on gathered parameters (and their reuse distance) that "auto" resolves to:
    about two transformer layers (12·h² each). ``ptft plan`` models memory and traffic with it."""
    return 24 * hidden * hidden


def _fill_buckets(r: _Resolver, h: Optional[int], stage: int, is_cuda: bool) -> None:
    """Bucket sizes and overlap: HF's conventions for ZeRO-3 (a function of the hidden size ``h``)."""
    r.default("zero_optimization.overlap_comm", is_cuda)
    r.default("zero_optimization.reduce_bucket_size", h * h if (h and stage == 3) else int(2e8))
    r.default("zero_optimization.allgather_bucket_size", int(2e8))
    r.default("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * h * h) if h else int(5e7))
    r.default("zero_optimization.stage3_param_persistence_threshold", 10 * h if h else int(1e5))
    # ZeRO-3 is chosen for memory: keep about two transformer layers (24·h² parameters) gathered, not
    # DeepSpeed's 1e9, with which every parameter stays gathered from its forward use to its backward
    # one (the whole model of any BERT, on every rank; measured: benchmarks/zero_memory.py).
    r.default("zero_optimization.stage3_max_live_parameters", zero3_live_parameters(h) if h else int(1e9))
    r.default("zero_optimization.stage3_max_reuse_distance", zero3_live_parameters(h) if h else int(1e9))


def resolve_deepspeed_config(cfg_train: TrainConfig, cfg_optim: OptimConfig, world_size: int,
                             device: torch.device, model: Optional[torch.nn.Module] = None,
                             hidden_size: Optional[int] = None) -> dict:
    """The complete DeepSpeed config for this run: template or user JSON, "auto" filled, checked.

    The hidden size (ZeRO-3 bucket sizes) comes from ``model.config`` or, before the model exists
    (it is built under the resolved config: ``engine.model_build_context``), from ``hidden_size``.

    Raises :class:`EngineConfigError` (a ValueError) naming the DeepSpeed key and the run-config
    key when the user's JSON contradicts the run config.
    """
    path = template_path(cfg_train)
    r = _Resolver(_load_template(path), f"DeepSpeed config {path}")
    precision = resolve_precision(cfg_train.precision, device)
    global_batch = check_global_batch(cfg_train, world_size)
    is_cuda = device.type == "cuda"

    _fill_batch_and_precision(r, cfg_train, cfg_optim, world_size, global_batch, precision)
    stage = r.cfg.get("zero_optimization", {}).get("stage", 0)
    offload_opt = _fill_offload(r, cfg_train, is_cuda)
    optimizer = _fill_optimizer(r, cfg_optim)
    if optimizer == "lamb":
        _check_lamb(stage, device)
    _fill_buckets(r, _hidden_size(model) or hidden_size, stage, is_cuda)
    if offload_opt and optimizer not in ("adam", "adamw"):
        raise EngineConfigError("train.offload_optimizer=true needs optim.name=adamw (DeepSpeedCPUAdam)")
    left = r.leftover_autos()
    if left:
        raise EngineConfigError(f"{r.source}: no run-config value to fill \"auto\" at: {', '.join(left)}")
    r.cfg.setdefault("zero_allow_untested_optimizer", True)
    return r.cfg
