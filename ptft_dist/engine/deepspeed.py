"""One small training-engine interface over DeepSpeed (ZeRO 0-3, offload) and Accelerate.

The pretraining loop only ever talks to :class:`Engine`::

    engine = build_engine(model, cfg.train, cfg.optim, lr_lambda, world_size, device)
    out = engine.forward(**batch)          # micro-batch; tensors are moved to engine.device
    engine.backward(out.loss)              # loss of ONE micro-batch (1/grad_accum scaling is inside)
    boundary = engine.is_accumulation_boundary
    engine.step()                          # optimizer + LR scheduler step only at the boundary
    if boundary: log(engine.lr, engine.grad_norm, engine.loss_scale)

Semantics are DeepSpeed's: ``is_accumulation_boundary`` is read *between* ``backward`` and
``step`` and says whether that ``step()`` will update the weights.

DeepSpeed config: ``ds_configs/zero{stage}[_offload].json`` (or the user's own JSON,
``train.deepspeed_config``) with its ``"auto"`` fields filled from the run config. A value in
the user's JSON that contradicts the run config is an error naming both keys (invariant 7).

Elastic resume (invariant 4): a ZeRO-1/2/3 checkpoint written by W ranks is loaded by W' ranks
through DeepSpeed's universal checkpoint: :func:`convert_to_universal` (``ds_to_universal``)
runs once on rank 0 into ``<tag>/universal/`` and the engine loads it with
``checkpoint.load_universal``. :meth:`Engine.load_checkpoint` does this automatically when
the saved world size (``ptft_meta.json``) or ZeRO stage differs from the current one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.errors import UserError

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
META_FILE = "ptft_meta.json"  # written by rank 0 into every checkpoint tag dir
UNIVERSAL_TAG = "universal"  # <tag>/universal: DeepSpeed universal checkpoint of <tag>
CLIENT_KEY = "ptft_client_state"  # the loop's client_state inside DeepSpeed's model-states file
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EngineConfigError(UserError, ValueError):
    """A run config / DeepSpeed JSON combination that cannot work (names the keys involved)."""


# --------------------------------------------------------------------------- precision / batch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in _DTYPES:
        raise EngineConfigError(f"train.precision: {precision!r} is not one of auto, fp32, bf16, fp16")
    if device.type == "cpu" and precision != "fp32":
        log.warning("train.precision=%s on CPU: correct but very slow (CPU runs should use fp32)", precision)
    return precision


def check_global_batch(cfg_train: TrainConfig, world_size: int) -> int:
    """micro × accum × world; must equal ``train.global_batch_size`` when that is set."""
    for key in ("micro_batch_size", "grad_accum"):
        if getattr(cfg_train, key) < 1:
            raise EngineConfigError(f"train.{key} must be >= 1, got {getattr(cfg_train, key)}")
    if world_size < 1:
        raise EngineConfigError(f"world size must be >= 1, got {world_size}")
    got = cfg_train.micro_batch_size * cfg_train.grad_accum * world_size
    want = cfg_train.global_batch_size
    if want and want != got:
        per = cfg_train.micro_batch_size * world_size
        hint = (f"; with {world_size} ranks use train.grad_accum={want // per}" if want % per == 0
                else f"; {want} is not a multiple of micro_batch_size × world size = {per}")
        raise EngineConfigError(
            f"train.global_batch_size={want} != train.micro_batch_size {cfg_train.micro_batch_size} × "
            f"train.grad_accum {cfg_train.grad_accum} × world size {world_size} = {got}{hint}")
    return got


# --------------------------------------------------------------------------- DeepSpeed config


def _template_path(cfg_train: TrainConfig) -> Path:
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


class _Resolver:
    """Fill ``"auto"`` values; check explicit ones against the run config."""

    def __init__(self, cfg: dict, source: str):
        self.cfg = cfg
        self.source = source

    @staticmethod
    def _get(d: dict, dotted: str) -> Any:
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return _MISSING
            d = d[part]
        return d

    @staticmethod
    def _set(d: dict, dotted: str, value: Any) -> None:
        parts = dotted.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {})
        d[parts[-1]] = value

    def fill(self, ds_key: str, value: Any, run_key: str, *, create: bool = True, same=None) -> None:
        """Set ``ds_key`` to ``value`` if "auto" (or missing and ``create``); else it must agree."""
        cur = self._get(self.cfg, ds_key)
        if cur == "auto" or (cur is _MISSING and create):
            self._set(self.cfg, ds_key, value)
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
        if self._get(self.cfg, ds_key) == "auto":
            self._set(self.cfg, ds_key, value)

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


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _hidden_size(model: Optional[torch.nn.Module]) -> Optional[int]:
    conf = getattr(model, "config", None)
    h = getattr(conf, "hidden_size", None)
    return int(h) if isinstance(h, int) else None


def resolve_deepspeed_config(cfg_train: TrainConfig, cfg_optim: OptimConfig, world_size: int,
                             device: torch.device, model: Optional[torch.nn.Module] = None) -> dict:
    """The complete DeepSpeed config for this run: template or user JSON, "auto" filled, checked.

    Raises :class:`EngineConfigError` (a ValueError) naming the DeepSpeed key and the run-config
    key when the user's JSON contradicts the run config.
    """
    path = _template_path(cfg_train)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise EngineConfigError(f"{path}: top level must be a JSON object")
    source = f"DeepSpeed config {path}"
    r = _Resolver(cfg, source)
    precision = resolve_precision(cfg_train.precision, device)
    global_batch = check_global_batch(cfg_train, world_size)
    is_cuda = device.type == "cuda"

    if "scheduler" in cfg:
        raise EngineConfigError(
            f"{source}: a \"scheduler\" section is not supported: the LR schedule comes from optim.schedule "
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

    # Offload: the template follows the run config; a user JSON must agree with it.
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    for sec, flag, run_key in (("offload_optimizer", cfg_train.offload_optimizer or cfg_train.offload_params,
                                "train.offload_optimizer"),
                               ("offload_param", cfg_train.offload_params, "train.offload_params")):
        dev = r._get(cfg, f"zero_optimization.{sec}.device")
        if dev is _MISSING or dev == "auto":
            if flag:
                r._set(cfg, f"zero_optimization.{sec}.device", "cpu")
            elif dev == "auto":
                r._set(cfg, f"zero_optimization.{sec}.device", "none")
        elif (dev not in ("none", None)) != bool(flag):
            raise EngineConfigError(f"{source}: zero_optimization.{sec}.device={json.dumps(dev)} contradicts "
                                    f"{run_key}={json.dumps(bool(flag))}")
        if r._get(cfg, f"zero_optimization.{sec}.pin_memory") == "auto":
            r._set(cfg, f"zero_optimization.{sec}.pin_memory", is_cuda)
    offload_opt = r._get(cfg, "zero_optimization.offload_optimizer.device") not in (_MISSING, "none", None)

    # Optimizer.
    ds_type = {"adamw": "AdamW", "lamb": "Lamb"}[cfg_optim.name]
    r.fill("optimizer.type", ds_type, "optim.name",
           same=lambda a, b: str(a).lower() == b.lower() or (b == "AdamW" and str(a).lower() == "adam"
                                                             and r._get(cfg, "optimizer.params.adam_w_mode") is not False))
    r.fill("optimizer.params.lr", float(cfg_optim.lr), "optim.lr")
    r.fill("optimizer.params.betas", [float(b) for b in cfg_optim.betas], "optim.betas")
    r.fill("optimizer.params.eps", float(cfg_optim.eps), "optim.eps")
    r.fill("optimizer.params.weight_decay", float(cfg_optim.weight_decay), "optim.weight_decay")
    if str(cfg["optimizer"]["type"]).lower() == "lamb":
        if stage > 0:
            raise EngineConfigError(
                f"optim.name=lamb with train.zero_stage={stage}: LAMB's per-layer trust ratio is wrong on ZeRO's "
                f"flattened partitions; use train.zero_stage=0 with lamb, or optim.name=adamw")
        if not is_cuda:
            raise EngineConfigError(
                f"optim.name=lamb needs DeepSpeed's FusedLamb, a CUDA op: not available on device {device.type}; "
                f"use optim.name=adamw here")

    # Bucket sizes and overlap (HF conventions for ZeRO-3: a function of the hidden size).
    h = _hidden_size(model)
    r.default("zero_optimization.overlap_comm", is_cuda)
    r.default("zero_optimization.reduce_bucket_size", h * h if (h and stage == 3) else int(2e8))
    r.default("zero_optimization.allgather_bucket_size", int(2e8))
    r.default("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * h * h) if h else int(5e7))
    r.default("zero_optimization.stage3_param_persistence_threshold", 10 * h if h else int(1e5))

    if offload_opt and str(cfg["optimizer"]["type"]).lower() not in ("adam", "adamw"):
        raise EngineConfigError("train.offload_optimizer=true needs optim.name=adamw (DeepSpeedCPUAdam)")
    left = r.leftover_autos()
    if left:
        raise EngineConfigError(f"{source}: no run-config value to fill \"auto\" at: {', '.join(left)}")
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


# --------------------------------------------------------------------------- helpers


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """BERT convention: no weight decay on biases and norm weights (every 1-D parameter)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_process_group(world_size: int, device: torch.device) -> None:
    """Bring up torch.distributed DeepSpeed's way unless the caller (ptft_dist.dist) already did;
    either way DeepSpeed's communication layer is attached to the existing group."""
    import deepspeed

    initialized = dist.is_available() and dist.is_initialized()
    if initialized and dist.get_world_size() != world_size:
        raise EngineConfigError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    if world_size == 1:  # a single process, possibly started without a launcher
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        if not initialized:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        release_shm_names()


SHM_DIR = Path("/dev/shm")


def release_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    DeepSpeed's shm all-reduce (ops/csrc/cpu/comm/shm.cpp) creates a 67 MB /dev/shm segment per
    rank at init and never unlinks it: every CPU run leaks world_size x 67 MB of RAM until reboot
    (a test suite, gigabytes). Each rank maps all its peers' segments inside init; after a barrier
    the names are unused, and the memory is freed when the last process holding a mapping exits."""
    if not SHM_DIR.is_dir():
        return
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / name).unlink()


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


class _ByteCounter:
    """Bytes of distinct storages (a view into a flat buffer counts the buffer once)."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, obj: Any, depth: int = 0) -> None:
        self.bytes.setdefault(kind, 0)
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0 and obj.untyped_storage().nbytes() == 0:
                return
            key = _storage_key(obj)
            if key in self.seen:
                return
            self.seen.add(key)
            self.bytes[kind] += obj.untyped_storage().nbytes()
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for o in obj:
                self.add(kind, o, depth + 1)
        elif depth < 3 and isinstance(obj, dict):
            for o in obj.values():
                self.add(kind, o, depth + 1)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(tag_dir: str | Path) -> dict:
    p = Path(tag_dir) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


class _GuardedCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine so a failed write (ENOSPC, EIO, ...) on one rank is
    recorded instead of raised inside ``save_checkpoint``: that call has collectives after the
    writes (barrier), and a rank leaving early would hang the others. The error is raised by
    :meth:`Engine.save_checkpoint` once DeepSpeed's collectives are done."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.errors: list[str] = []
        self.written: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save(self, state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if self.errors:  # already failed: do not write more of this checkpoint
            return None
        try:
            out = self._inner.save(state_dict, path, *args, **kwargs)
            self.written.append(str(path))
            return out
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc} (writing {path})")
            with contextlib.suppress(OSError):
                os.remove(path)
            return None


# --------------------------------------------------------------------------- universal checkpoint


def _count_zero_optim_files(tag_dir: Path) -> int:
    return len([p for p in tag_dir.glob("*zero_pp_rank_*_mp_rank_*optim_states.pt")])


def saved_world_size(tag_dir: str | Path) -> Optional[int]:
    """World size a checkpoint was written with: ``ptft_meta.json``, else the ZeRO file count."""
    meta = read_meta(tag_dir)
    if "world_size" in meta:
        return int(meta["world_size"])
    n = _count_zero_optim_files(Path(tag_dir))
    return n or None


def convert_to_universal(ckpt_dir: str | Path, tag: str, num_workers: int = 1) -> Path:
    """DeepSpeed ZeRO-1/2/3 checkpoint ``ckpt_dir/tag`` → universal checkpoint
    ``ckpt_dir/tag/universal`` (``deepspeed.checkpoint.ds_to_universal``). Idempotent; written to
    a temporary folder and renamed, so a crash never leaves a half-converted one. Run it on one
    process (rank 0); every rank then loads it with :meth:`Engine.load_checkpoint`."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    src = Path(ckpt_dir) / tag
    out = src / UNIVERSAL_TAG
    if (out / ".complete").is_file():
        return out
    if not _count_zero_optim_files(src):
        raise FileNotFoundError(f"{src}: no ZeRO optimizer-state files (*_optim_states.pt): not a ZeRO-1/2/3 checkpoint")
    tmp = src / f".{UNIVERSAL_TAG}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=num_workers,
                              num_merge_workers=num_workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    t0 = time.time()
    with contextlib.redirect_stdout(_LogWriter()):
        ds_to_universal.main(args)
    with contextlib.suppress(OSError):
        os.remove(src / "latest_universal")  # ds_to_universal's pointer file; we address it by name
    (tmp / ".complete").write_text("ok\n")
    os.replace(tmp, out)
    log.info("converted %s to a universal checkpoint in %.1f s", src, time.time() - t0)
    return out


class _LogWriter:
    def write(self, s: str) -> int:
        if s.strip():
            log.debug("ds_to_universal: %s", s.rstrip())
        return len(s)

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------- the interface


class Engine:
    """Backend-independent training engine (see module docstring for the call order)."""

    backend: str
    module: torch.nn.Module
    device: torch.device
    precision: torch.dtype
    precision_name: str
    world_size: int
    rank: int
    zero_stage: int  # 0 for Accelerate/DDP
    grad_accum: int  # micro-batches per optimizer step
    ds_config: Optional[dict]  # the resolved DeepSpeed config (None for Accelerate/DDP)

    # -- training
    def forward(self, **batch: Any) -> Any:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def is_accumulation_boundary(self) -> bool:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    @property
    def grad_norm(self) -> Optional[float]:
        """2-norm of the (averaged, unclipped) gradient at the last optimizer step."""
        return self._grad_norm

    @property
    def loss_scale(self) -> Optional[float]:
        return None

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load_checkpoint)."""
        return self._global_step

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.train(False)

    def _move(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    # -- checkpoints
    def save_checkpoint(self, ckpt_dir: str | Path, tag: str, client_state: dict) -> list[Path]:
        """Every rank calls it. Writes ``ckpt_dir/tag/``; returns the files THIS rank wrote.
        Raises OSError on the rank whose write failed (only after all collectives are done)."""
        raise NotImplementedError

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str) -> dict:
        raise NotImplementedError

    def _meta(self) -> dict:
        return {"backend": self.backend, "zero_stage": self.zero_stage, "world_size": self.world_size,
                "precision": self.precision_name, "global_step": self.global_step,
                "torch": torch.__version__, "saved_at": time.time()}

    # -- introspection
    def state_memory_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state (master weights + moments) held by
        THIS rank right now, from the engine's own partitions/buffers (distinct storages). Call it
        between backward() and step() for the peak (gradients present, optimizer state created)."""
        raise NotImplementedError

    def full_parameter(self, name: str) -> torch.Tensor:
        """Full fp32 value of parameter ``name`` on every rank (a collective under ZeRO-3)."""
        raise NotImplementedError

    def full_optimizer_state(self, name: str, key: str) -> Optional[torch.Tensor]:
        """Full optimizer state ``key`` (exp_avg, exp_avg_sq) of parameter ``name`` (collective under ZeRO-3)."""
        raise NotImplementedError

    def save_ds_config(self, path: str | Path) -> Optional[Path]:
        if self.ds_config is None:
            return None
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(p, self.ds_config)
        return p


class DeepSpeedEngine(Engine):
    backend = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device):
        import deepspeed

        self.ds_config = resolve_deepspeed_config(cfg_train, cfg_optim, world_size, device, model)
        _ensure_process_group(world_size, device)
        self.world_size = world_size
        self.rank = dist.get_rank()
        self.device = device
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.precision_name = ("bf16" if self.ds_config.get("bf16", {}).get("enabled")
                               else "fp16" if self.ds_config.get("fp16", {}).get("enabled") else "fp32")
        self.precision = _DTYPES[self.precision_name]
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])
        self._grad_norm: Optional[float] = None
        self._global_step = 0
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=_param_groups(model, float(cfg_optim.weight_decay)),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            config=copy.deepcopy(self.ds_config),
            dist_init_required=False,
        )
        self.device = self.ds.device if isinstance(self.ds.device, torch.device) else torch.device(self.ds.device)
        self.module = self.ds.module
        self._guard = _GuardedCheckpointEngine(self.ds.checkpoint_engine)
        self.ds.checkpoint_engine = self._guard
        self._norm_self = self.zero_stage == 0 and self.precision_name == "fp32"  # DS does not record it there

    # -- training
    def forward(self, **batch: Any) -> Any:
        return self.ds(**self._move(batch))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    @property
    def is_accumulation_boundary(self) -> bool:
        return bool(self.ds.is_gradient_accumulation_boundary())

    def step(self) -> None:
        boundary = self.is_accumulation_boundary
        if boundary and self._norm_self:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self._grad_norm = (float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                           for g in grads])))
                               if grads else 0.0)
        self.ds.step()
        if boundary:
            self._global_step += 1
            if not self._norm_self:
                n = self.ds.get_global_grad_norm()
                self._grad_norm = None if n is None else float(n)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def loss_scale(self) -> Optional[float]:
        if self.precision_name != "fp16":
            return None
        opt = self.ds.optimizer
        for attr in ("cur_scale", "loss_scale"):
            v = getattr(opt, attr, None)
            if isinstance(v, (int, float, torch.Tensor)):
                return float(v)
        return None

    # -- checkpoints
    def save_checkpoint(self, ckpt_dir: str | Path, tag: str, client_state: dict) -> list[Path]:
        ckpt_dir = Path(ckpt_dir)
        self._guard.errors.clear()
        self._guard.written.clear()
        state = {CLIENT_KEY: client_state, "ptft_global_step": self._global_step}
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
        written = [Path(p) for p in self._guard.written]
        if self.rank == 0 and not self._guard.errors:
            try:
                _write_json_atomic(ckpt_dir / tag / META_FILE, self._meta())
                written.append(ckpt_dir / tag / META_FILE)
            except OSError as exc:
                self._guard.errors.append(f"{type(exc).__name__}: {exc} (writing {META_FILE})")
        if self._guard.errors:
            raise OSError(f"rank {self.rank}: checkpoint write failed: {'; '.join(self._guard.errors)}")
        return written

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str) -> dict:
        ckpt_dir = Path(ckpt_dir)
        tag_dir = ckpt_dir / tag
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {tag_dir}")
        meta = read_meta(tag_dir)
        if meta.get("backend", "deepspeed") != "deepspeed":
            raise EngineConfigError(f"{tag_dir} was written by the {meta['backend']} backend; "
                                    f"this run uses train.backend=deepspeed")
        saved_ws = saved_world_size(tag_dir)
        saved_stage = int(meta.get("zero_stage", self.zero_stage))
        universal = self.zero_stage > 0 and (saved_ws != self.world_size or saved_stage != self.zero_stage)
        if saved_stage == 0 and self.zero_stage > 0:
            raise EngineConfigError(f"{tag_dir}: a ZeRO-0 checkpoint cannot seed ZeRO-{self.zero_stage} optimizer "
                                    f"state; resume with train.zero_stage=0")
        if universal:
            log.info("checkpoint %s: saved with %s ranks / ZeRO-%s, loading into %s ranks / ZeRO-%s via a universal "
                     "checkpoint", tag_dir, saved_ws, saved_stage, self.world_size, self.zero_stage)
            err = ""
            if self.rank == 0:
                try:
                    convert_to_universal(ckpt_dir, tag)
                except Exception as exc:
                    err = f"{type(exc).__name__}: {exc}"
            err = _broadcast_str(err)
            if err:
                raise RuntimeError(f"universal conversion of {tag_dir} failed on rank 0: {err}")
            self.ds._config.load_universal_checkpoint = True
            try:
                path, client = self.ds.load_checkpoint(str(tag_dir), tag=UNIVERSAL_TAG)
            finally:
                self.ds._config.load_universal_checkpoint = False
        else:
            path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        client = client or {}
        self._global_step = int(client.get("ptft_global_step", meta.get("global_step", 0)))
        return dict(client.get(CLIENT_KEY, {}))

    # -- introspection
    def _inner_optimizer(self) -> Any:
        opt = self.ds.optimizer
        return getattr(opt, "optimizer", opt)

    def state_memory_bytes(self) -> dict[str, int]:
        c = _ByteCounter()
        for p in self.module.parameters():
            ds_tensor = getattr(p, "ds_tensor", None)
            if ds_tensor is not None:  # ZeRO-3: the partition, plus the full data if gathered/persistent
                c.add("params", ds_tensor)
            c.add("params", p.data)
        for p in self.module.parameters():
            c.add("grads", p.grad)
        outer = self.ds.optimizer
        for name, value in vars(outer).items():
            lname = name.lower()
            if "grad" in lname or "ipg" in lname:
                c.add("grads", value)
        inner = self._inner_optimizer()
        for group in inner.param_groups:  # fp32 master partitions (ZeRO) / the params themselves (ZeRO-0)
            for p in group["params"]:
                c.add("grads", p.grad)
                c.add("optimizer", p)
        for st in inner.state.values():
            c.add("optimizer", st)
        # fp32 master copies of mixed-precision optimizers not visible through the inner optimizer
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat",
                     "fp32_groups_flat_partition"):
            c.add("optimizer", getattr(outer, name, None))
        out = {k: c.bytes.get(k, 0) for k in ("params", "grads", "optimizer")}
        out["total"] = sum(out.values())
        return out

    def _named_param(self, name: str) -> torch.nn.Parameter:
        params = dict(self.module.named_parameters())
        if name not in params:
            raise KeyError(f"no parameter named {name!r}")
        return params[name]

    def full_parameter(self, name: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        p = self._named_param(name)
        if self.zero_stage == 0:
            return p.detach().float().cpu().clone()
        return safe_get_full_fp32_param(p).detach().float().cpu().clone()

    def _relink_optimizer_fragments(self) -> None:
        """ZeRO-1/2 link each parameter to its slice of the optimizer state after the first
        ``_optimizer_step(group)``, i.e. before the state of param groups 2.. exists (DeepSpeed
        0.19): their fragments stay empty and ``safe_get_full_optimizer_state`` fails. Re-link
        once the state exists. (Checkpoints are unaffected: they are written from the state dict.)"""
        opt = self.ds.optimizer
        fp32_groups = getattr(opt, "single_partition_of_fp32_groups", None)
        bit16_groups = getattr(opt, "bit16_groups", None)
        if fp32_groups is None or bit16_groups is None:
            return
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        state = opt.optimizer.state
        for lp_group, hp in zip(bit16_groups, fp32_groups):
            if state.get(hp):
                lazy_init_hp_params_optimizer_state(lp_group, hp, state)

    def full_optimizer_state(self, name: str, key: str) -> Optional[torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        p = self._named_param(name)
        if self.zero_stage == 0:
            st = self._inner_optimizer().state.get(p, {})
            v = st.get(key)
            return None if v is None else v.detach().float().cpu().clone()
        self._relink_optimizer_fragments()
        v = safe_get_full_optimizer_state(p, key)
        return None if v is None else v.detach().float().cpu().clone()


def _broadcast_str(s: str) -> str:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return s
    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


class AccelerateEngine(Engine):
    """``accelerate.Accelerator``: DDP (gloo on CPU, NCCL on GPU) with its mixed precision; on GPU with
    train.zero_stage > 0 it carries Accelerate's DeepSpeed plugin (same resolved DeepSpeed config)."""

    backend = "accelerate"

    def __init__(self, model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device):
        from accelerate import Accelerator

        self.precision_name = resolve_precision(cfg_train.precision, device)
        self.precision = _DTYPES[self.precision_name]
        check_global_batch(cfg_train, world_size)
        self.grad_accum = cfg_train.grad_accum
        self.grad_clip = float(cfg_optim.grad_clip)
        self._grad_norm = None
        self._global_step = 0
        self._micro = 0  # micro-batches since the last optimizer step
        self._ds = None
        self.ds_config = None
        plugin = None
        if device.type == "cuda" and cfg_train.zero_stage > 0:
            from accelerate.utils import DeepSpeedPlugin

            self.ds_config = resolve_deepspeed_config(cfg_train, cfg_optim, world_size, device, model)
            plugin = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(self.ds_config))
        elif cfg_train.zero_stage > 0:
            log.info("backend=accelerate on %s: plain DDP (Accelerate's DeepSpeed plugin needs a GPU); "
                     "train.zero_stage=%d not applied", device.type, cfg_train.zero_stage)
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
        groups = _param_groups(model, float(cfg_optim.weight_decay))
        kw = {"lr": cfg_optim.lr, "betas": tuple(cfg_optim.betas), "eps": cfg_optim.eps}
        if plugin is not None:
            from accelerate.utils import DummyOptim, DummyScheduler

            opt = DummyOptim(groups, **kw)
            sched = DummyScheduler(opt, lr_scheduler_callable=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda))
            self.model, self.optimizer, self.scheduler = self.acc.prepare(model, opt, sched)
            self._ds = self.model  # the DeepSpeedEngine
            self._guard = _GuardedCheckpointEngine(self._ds.checkpoint_engine)
            self._ds.checkpoint_engine = self._guard
        else:
            if cfg_optim.name == "lamb":
                from deepspeed.ops.lamb import FusedLamb

                opt = FusedLamb(groups, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas), eps=cfg_optim.eps)
            else:
                opt = torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
            self.model, self.optimizer = self.acc.prepare(model, opt)
            self.acc.register_for_checkpointing(self.scheduler)
        self.module = self.acc.unwrap_model(self.model)

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
            self._guard.errors.clear()
            self._guard.written.clear()
        errors: list[str] = []
        try:
            self.acc.save_state(str(out), safe_serialization=True)
            if self.rank == 0:
                torch.save({CLIENT_KEY: client_state, "ptft_global_step": self._global_step},
                           out / "client_state.pt")
                _write_json_atomic(out / META_FILE, self._meta())
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
        blob = torch.load(tag_dir / "client_state.pt", map_location="cpu", weights_only=False)
        self._global_step = int(blob.get("ptft_global_step", 0))
        self._micro = 0
        return dict(blob.get(CLIENT_KEY, {}))

    # -- introspection
    def state_memory_bytes(self) -> dict[str, int]:
        c = _ByteCounter()
        for p in self.module.parameters():
            c.add("params", p.data)
        for p in self.module.parameters():
            c.add("grads", p.grad)
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        for st in getattr(opt, "state", {}).values():
            c.add("optimizer", st)
        out = {k: c.bytes.get(k, 0) for k in ("params", "grads", "optimizer")}
        out["total"] = sum(out.values())
        return out

    def full_parameter(self, name: str) -> torch.Tensor:
        return dict(self.module.named_parameters())[name].detach().float().cpu().clone()

    def full_optimizer_state(self, name: str, key: str) -> Optional[torch.Tensor]:
        p = dict(self.module.named_parameters())[name]
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        v = opt.state.get(p, {}).get(key)
        return None if v is None else v.detach().float().cpu().clone()


def build_engine(model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device) -> Engine:
    """The engine for ``cfg_train.backend``. ``lr_lambda(step)`` multiplies optim.lr (LambdaLR)."""
    device = torch.device(device)
    if cfg_train.backend == "deepspeed":
        return DeepSpeedEngine(model, cfg_train, cfg_optim, lr_lambda, world_size, device)
    if cfg_train.backend == "accelerate":
        return AccelerateEngine(model, cfg_train, cfg_optim, lr_lambda, world_size, device)
    raise EngineConfigError(f"train.backend: {cfg_train.backend!r} is not one of deepspeed, accelerate")


def model_init_context(cfg_train: TrainConfig, ds_config: Optional[dict] = None) -> contextlib.AbstractContextManager:
    """Build very large models under this: ZeRO-3 partitions parameters as they are created
    (``deepspeed.zero.Init``), so no rank ever holds the whole model. Other stages: no-op."""
    if cfg_train.backend == "deepspeed" and cfg_train.zero_stage == 3 and ds_config is not None:
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()
