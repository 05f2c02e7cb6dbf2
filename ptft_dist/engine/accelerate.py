"""Accelerate backend of the :class:`~ptft_dist.engine.base.Engine` interface.

``accelerate.Accelerator``: DDP (gloo on CPU, NCCL on GPU) with its mixed precision; on GPU with
``train.zero_stage > 0`` it carries Accelerate's DeepSpeed plugin with the same resolved
DeepSpeed config the DeepSpeed backend would use. Losses, gradient norms and checkpoints match
DeepSpeed ZeRO-0 (tests/engine/test_engine.py compares the numbers).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from ptft_dist.checkpoint.universal import META_FILE, read_meta
from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.engine.base import (
    CLIENT_KEY,
    DTYPES,
    Engine,
    EngineConfigError,
    check_global_batch,
    param_groups,
    resolve_precision,
)
from ptft_dist.engine.deepspeed import GuardedCheckpointEngine
from ptft_dist.engine.ds_config import resolve_deepspeed_config
from ptft_dist.engine.memory import ByteCounter
from ptft_dist.fsutil import write_json_atomic
from ptft_dist.log import get_logger

log: logging.Logger = get_logger("engine")
CLIENT_FILE = "client_state.pt"  # the loop's client_state and the optimizer step, beside Accelerate's files


class AccelerateEngine(Engine):
    """DDP through Accelerate, or Accelerate's DeepSpeed plugin on GPU with train.zero_stage > 0."""

    backend = "accelerate"

    def __init__(self, model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device):
        from accelerate import Accelerator

        self.precision_name = resolve_precision(cfg_train.precision, device)
        self.precision = DTYPES[self.precision_name]
        check_global_batch(cfg_train, world_size)
        self.grad_accum = cfg_train.grad_accum
        self.grad_clip = float(cfg_optim.grad_clip)
        self._grad_norm = None
        self._global_step = 0
        self._micro = 0  # micro-batches since the last optimizer step
        self._ds = None
        self.ds_config = None
        plugin = self._deepspeed_plugin(model, cfg_train, cfg_optim, world_size, device)
        if cfg_optim.name == "lamb" and device.type != "cuda":
            raise EngineConfigError(f"optim.name=lamb needs DeepSpeed's FusedLamb, a CUDA op: not available on "
                                    f"device {device.type}; use optim.name=adamw here")
        self.acc = Accelerator(cpu=device.type == "cpu",
                               mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.precision_name],
                               step_scheduler_with_optimizer=False, deepspeed_plugin=plugin)
        if self.acc.num_processes != world_size:
            raise EngineConfigError(f"world_size={world_size} but Accelerate sees {self.acc.num_processes} processes")
        self.world_size = world_size
        self.rank = self.acc.process_index
        self.device = self.acc.device
        self.zero_stage = cfg_train.zero_stage if plugin is not None else 0
        groups = param_groups(model, float(cfg_optim.weight_decay))
        if plugin is not None:
            self._prepare_deepspeed(model, groups, cfg_optim, lr_lambda)
        else:
            self._prepare_ddp(model, groups, cfg_optim, lr_lambda, device)
        self.module = self.acc.unwrap_model(self.model)

    def _deepspeed_plugin(self, model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                          world_size: int, device: torch.device) -> Any:
        if device.type == "cuda" and cfg_train.zero_stage > 0:
            from accelerate.utils import DeepSpeedPlugin

            self.ds_config = resolve_deepspeed_config(cfg_train, cfg_optim, world_size, device, model)
            return DeepSpeedPlugin(hf_ds_config=copy.deepcopy(self.ds_config))
        if cfg_train.zero_stage > 0:
            log.info("backend=accelerate on %s: plain DDP (Accelerate's DeepSpeed plugin needs a GPU); "
                     "train.zero_stage=%d not applied", device.type, cfg_train.zero_stage)
        return None

    def _prepare_deepspeed(self, model: torch.nn.Module, groups: list[dict], cfg_optim: OptimConfig,
                           lr_lambda: Callable[[int], float]) -> None:
        from accelerate.utils import DummyOptim, DummyScheduler

        opt = DummyOptim(groups, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas), eps=cfg_optim.eps)
        sched = DummyScheduler(opt, lr_scheduler_callable=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda))
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, opt, sched)
        self._ds = self.model  # the DeepSpeedEngine
        self._guard = GuardedCheckpointEngine(self._ds.checkpoint_engine)
        self._ds.checkpoint_engine = self._guard

    def _prepare_ddp(self, model: torch.nn.Module, groups: list[dict], cfg_optim: OptimConfig,
                     lr_lambda: Callable[[int], float], device: torch.device) -> None:
        kw = {"lr": cfg_optim.lr, "betas": tuple(cfg_optim.betas), "eps": cfg_optim.eps}
        if cfg_optim.name == "lamb":
            from deepspeed.ops.lamb import FusedLamb

            opt = FusedLamb(groups, **kw)
        else:
            opt = torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        self.model, self.optimizer = self.acc.prepare(model, opt)
        self.acc.register_for_checkpointing(self.scheduler)

    # -- training
    @property
    def is_accumulation_boundary(self) -> bool:
        if self._ds is not None:
            return bool(self._ds.is_gradient_accumulation_boundary())
        return self._micro + 1 >= self.grad_accum

    def forward(self, **batch: Any) -> Any:
        batch = self._move(batch)
        if self._ds is None and not self.is_accumulation_boundary:
            with self.acc.no_sync(self.model):  # DDP decides at forward time whether backward all-reduces
                return self.model(**batch)
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        if self._ds is not None:
            self._ds.backward(loss)
        else:
            self.acc.backward(loss / self.grad_accum)

    def step(self) -> None:
        boundary = self.is_accumulation_boundary
        if self._ds is not None:
            self._ds.step()
            if boundary:
                self._global_step += 1
                n = self._ds.get_global_grad_norm()
                self._grad_norm = None if n is None else float(n)
            return
        if not boundary:
            self._micro += 1
            return
        self._micro = 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        self._grad_norm = float(self.acc.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        if not self.acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._global_step += 1

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def loss_scale(self) -> Optional[float]:
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        if self._ds is not None and self.precision_name == "fp16":
            return float(getattr(self._ds.optimizer, "cur_scale", float("nan")))
        return None

    # -- checkpoints
    def save_checkpoint(self, ckpt_dir: str | Path, tag: str, client_state: dict) -> list[Path]:
        out = Path(ckpt_dir) / tag
        if self._ds is not None:
            self._guard.clear()
        errors: list[str] = []
        try:
            self.acc.save_state(str(out), safe_serialization=True)
            if self.rank == 0:
                torch.save({CLIENT_KEY: client_state, "ptft_global_step": self._global_step}, out / CLIENT_FILE)
                write_json_atomic(out / META_FILE, self._meta(), indent=2, sort_keys=True)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        if self._ds is not None:
            errors += self._guard.errors
        if errors:
            raise OSError(f"rank {self.rank}: checkpoint write failed: {'; '.join(errors)}")
        # rank 0 writes model/optimizer/scheduler/client state; every rank its RNG file
        mine = [out / f"random_states_{self.rank}.pkl"]
        if self._ds is not None:
            mine += [Path(p) for p in self._guard.written]
        if self.rank == 0:
            mine += [p for p in out.iterdir() if p.is_file() and not p.name.startswith("random_states_")]
        return sorted(set(mine))

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str) -> dict:
        tag_dir = Path(ckpt_dir) / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {tag_dir}")
        meta = read_meta(tag_dir)
        if meta.get("backend", "accelerate") != "accelerate":
            raise EngineConfigError(f"{tag_dir} was written by the {meta['backend']} backend; "
                                    f"this run uses train.backend=accelerate")
        if self._ds is not None and meta.get("world_size", self.world_size) != self.world_size:
            raise EngineConfigError(f"{tag_dir}: saved with {meta['world_size']} ranks under Accelerate's DeepSpeed "
                                    f"plugin; changing the world size needs train.backend=deepspeed")
        self.acc.load_state(str(tag_dir))
        blob = torch.load(tag_dir / CLIENT_FILE, map_location="cpu", weights_only=False)
        self._global_step = int(blob.get("ptft_global_step", 0))
        self._micro = 0
        return dict(blob.get(CLIENT_KEY, {}))

    # -- introspection
    def state_memory_bytes(self) -> dict[str, int]:
        c = ByteCounter()
        for p in self.module.parameters():
            c.add("params", p.data)
        for p in self.module.parameters():
            c.add("grads", p.grad)
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        for st in getattr(opt, "state", {}).values():
            c.add("optimizer", st)
        return c.totals()

    def full_parameter(self, name: str) -> torch.Tensor:
        return dict(self.module.named_parameters())[name].detach().float().cpu().clone()

    def full_optimizer_state(self, name: str, key: str) -> Optional[torch.Tensor]:
        p = dict(self.module.named_parameters())[name]
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        v = opt.state.get(p, {}).get(key)
        return None if v is None else v.detach().float().cpu().clone()
