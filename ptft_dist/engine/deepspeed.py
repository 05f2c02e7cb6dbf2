"""DeepSpeed backend (ZeRO 0-3, CPU/NVMe offload) of the :class:`~ptft_dist.engine.base.Engine` interface.

The config comes from ``engine/ds_config.py`` (template or user JSON, "auto" filled from the run
config). Elastic resume (docs/design.md, guarantee 4): a ZeRO-1/2/3 checkpoint written by W ranks
is loaded by W' ranks through DeepSpeed's universal checkpoint (``checkpoint/universal.py``);
:meth:`DeepSpeedEngine.load_checkpoint` converts automatically when the saved world size
(``ptft_meta.json``) or ZeRO stage differs from the current one.

Also here: bringing up torch.distributed DeepSpeed's way, releasing the /dev/shm segment its CPU
all-reduce leaks, and :func:`model_init_context` for building models already partitioned.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ptft_dist.checkpoint.universal import META_FILE, UNIVERSAL_TAG, convert_to_universal, read_meta, saved_world_size
from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.dist.collectives import broadcast_object
from ptft_dist.dist.discover import free_port
from ptft_dist.engine.base import CLIENT_KEY, DTYPES, Engine, EngineConfigError, param_groups
from ptft_dist.engine.ds_config import resolve_deepspeed_config
from ptft_dist.engine.memory import ByteCounter
from ptft_dist.fsutil import write_json_atomic
from ptft_dist.log import get_logger

log: logging.Logger = get_logger("engine")

SHM_DIR = Path("/dev/shm")


# --------------------------------------------------------------------------- process group


def ensure_process_group(world_size: int, device: torch.device) -> None:
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
            os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        release_shm_names()


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


def return_freed_buffers_to_os() -> bool:
    """On CPU, ZeRO-3 gathers and frees every layer's parameters (and gradients) each step. glibc's
    malloc raises its mmap threshold to the size of each freed buffer, so those buffers soon come
    from the heap and stay in the process when freed: its resident memory climbs to the high-water
    mark of all of them (measured: ZeRO-3 on BERT-base used as much RSS as ZeRO-0). A fixed 1 MiB
    threshold gives every large buffer back to the OS when it is freed. Returns whether it applied
    (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


_M_MMAP_THRESHOLD = -3  # malloc.h


@contextlib.contextmanager
def model_init_context(ds_config: dict) -> Iterator[None]:
    """Build the model under this for ZeRO-3: with transformers'
    ``HfDeepSpeedConfig`` alive, a Hugging Face model built by ``_from_config`` / ``from_pretrained``
    is created inside ``deepspeed.zero.Init`` -- every parameter partitioned over the ranks as its
    module is created, rank 0 initialising one gathered module at a time -- so no rank ever holds
    the whole model. The process group must exist (``ensure_process_group``)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


# --------------------------------------------------------------------------- checkpoint writes


class GuardedCheckpointEngine:
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

    def clear(self) -> None:
        self.errors.clear()
        self.written.clear()

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


# --------------------------------------------------------------------------- the engine


class DeepSpeedEngine(Engine):
    backend = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg_train: TrainConfig, cfg_optim: OptimConfig,
                 lr_lambda: Callable[[int], float], world_size: int, device: torch.device):
        import deepspeed

        self.ds_config = resolve_deepspeed_config(cfg_train, cfg_optim, world_size, device, model)
        ensure_process_group(world_size, device)
        self.world_size = world_size
        self.rank = dist.get_rank()
        self.device = device
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage == 3 and device.type == "cpu":
            return_freed_buffers_to_os()
        self.precision_name = ("bf16" if self.ds_config.get("bf16", {}).get("enabled")
                               else "fp16" if self.ds_config.get("fp16", {}).get("enabled") else "fp32")
        self.precision = DTYPES[self.precision_name]
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])
        self._grad_norm: Optional[float] = None
        self._global_step = 0
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, float(cfg_optim.weight_decay)),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
            config=copy.deepcopy(self.ds_config),
            dist_init_required=False,
        )
        self.device = self.ds.device if isinstance(self.ds.device, torch.device) else torch.device(self.ds.device)
        self.module = self.ds.module
        self._guard = GuardedCheckpointEngine(self.ds.checkpoint_engine)
        self.ds.checkpoint_engine = self._guard
        self._norm_self = self.zero_stage == 0 and self.precision_name == "fp32"  # DS does not record it there
        if world_size == 1 and self.zero_stage == 0:
            # The mean over one rank is the identity, but DeepSpeed's ZeRO-0 still flattens every
            # gradient, all-reduces it, scales it by 1 and copies it back each step (~10% of a CPU
            # fine-tuning step, issue 13). Its own switch for "no data parallelism" turns that off.
            self.ds.enable_backward_allreduce = False

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
        self._guard.clear()
        state = {CLIENT_KEY: client_state, "ptft_global_step": self._global_step}
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
        written = [Path(p) for p in self._guard.written]
        if self.rank == 0 and not self._guard.errors:
            try:
                write_json_atomic(ckpt_dir / tag / META_FILE, self._meta(), indent=2, sort_keys=True)
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
        if self._needs_universal(tag_dir, meta):
            path, client = self._load_universal(ckpt_dir, tag)
        else:
            path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        client = client or {}
        self._global_step = int(client.get("ptft_global_step", meta.get("global_step", 0)))
        return dict(client.get(CLIENT_KEY, {}))

    def _needs_universal(self, tag_dir: Path, meta: dict) -> bool:
        """ZeRO partitions saved under another world size or stage must go through a universal checkpoint."""
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
        return universal

    def _load_universal(self, ckpt_dir: Path, tag: str) -> tuple[Optional[str], Optional[dict]]:
        """Rank 0 converts (once; every rank learns whether it worked), then every rank loads."""
        tag_dir = ckpt_dir / tag
        err = ""
        if self.rank == 0:
            try:
                convert_to_universal(ckpt_dir, tag)
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
        err = broadcast_object(err)
        if err:
            raise RuntimeError(f"universal conversion of {tag_dir} failed on rank 0: {err}")
        self.ds._config.load_universal_checkpoint = True
        try:
            return self.ds.load_checkpoint(str(tag_dir), tag=UNIVERSAL_TAG)
        finally:
            self.ds._config.load_universal_checkpoint = False

    # -- introspection
    def _inner_optimizer(self) -> Any:
        opt = self.ds.optimizer
        return getattr(opt, "optimizer", opt)

    def state_memory_bytes(self) -> dict[str, int]:
        c = ByteCounter()
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
        return c.totals()

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
