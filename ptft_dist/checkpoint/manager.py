"""Checkpoints that are whole or invisible (invariant 5), auto-resume, keep-last-K, preemption.

On-disk layout (``run_dir`` must be on a filesystem every rank sees)::

    run_dir/checkpoints/
      latest                  text: the tag of the newest COMPLETE checkpoint ("step_1200")
      step_1200/              one checkpoint (tag = step_{N}, N = optimizer steps done)
        COMPLETE              JSON manifest (step, world size, every rank's files and sizes);
                              written after all ranks' files are written, fsync'd and checked
        ptft_meta.json        backend, ZeRO stage, world size, precision
        rng_state_{r}.pt      rank r's RNG states (python, numpy, torch, CUDA)
        mp_rank_00_model_states.pt, *zero_pp_rank_{r}_*optim_states.pt ...  DeepSpeed's files
        (Accelerate: model.safetensors, optimizer.bin, custom_checkpoint_0.pkl, client_state.pt, ...)
        universal/            created on demand when resuming with another world size
      zero_to_fp32.py         DeepSpeed's consolidation script (copied by DeepSpeed)

Protocol of :meth:`CheckpointManager.save` (every rank calls it, at a step boundary):

1. rank 0 removes a stale ``step_N`` (left by a crash; never the one ``latest`` names);
2. every rank writes its files through the engine and its RNG file, fsyncs and checks them
   (exist, non-empty); a write error is caught on that rank;
3. all ranks exchange their result: if any rank failed, rank 0 removes the partial directory
   and EVERY rank raises :class:`CheckpointError` (``latest`` still names the previous one);
4. rank 0 writes ``COMPLETE``, then moves ``latest`` atomically (temp file + fsync + rename +
   directory fsync), then prunes to the last ``keep_last`` checkpoints (never the latest).

A kill at any instant therefore leaves ``latest`` naming a whole checkpoint; the half-written
directory is deleted by :meth:`CheckpointManager.resolve_resume` on the next start.

Preemption (invariant 6): :class:`PreemptionHandler` sets a flag on SIGUSR1/SIGTERM (nothing
else happens in the handler); :meth:`PreemptionHandler.should_stop` all-reduces it at a step
boundary so every rank stops at the same step; the loop saves and exits with
``checkpoint.requeue_exit_code`` (default 124), which the job script turns into a requeue.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ptft_dist.config import CheckpointConfig
from ptft_dist.errors import UserError

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
_TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written / found / trusted (the message says which and why)."""


# --------------------------------------------------------------------------- collectives


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(obj: Any) -> list:
    """Every rank's ``obj`` on every rank ([obj] without a process group)."""
    if not _dist_on():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _flag_device() -> torch.device:
    if _dist_on() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """temp file in the same directory + fsync + rename + directory fsync."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _remove_tree(path: Path) -> None:
    """Rename first (atomic), then delete: a crash mid-delete never leaves a half checkpoint
    under a checkpoint's name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _jsonable(state: dict) -> dict:
    """The JSON-safe part of the client state, kept in the manifest so a resume can be checked
    (model shape, tokenizer) before any tensor is loaded."""
    out = {}
    for k, v in state.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """RNG states of this process: python, numpy, torch CPU and (when present) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(client_state: dict) -> bool:
    """Put back the RNG states saved by :meth:`CheckpointManager.save` (``client_state["rng"]``,
    this rank's). Returns False when there is nothing for this rank (e.g. more ranks than saved)."""
    rng = client_state.get("rng") if "rng" in client_state else client_state
    if not rng or "torch" not in rng:
        return False
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])
    return True


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save / find / prune checkpoints of one run. Construct it on every rank."""

    def __init__(self, run_dir: str | Path, ckpt_cfg: CheckpointConfig, rank: int, world_size: int):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.cfg = ckpt_cfg
        self.rank = rank
        self.world_size = world_size

    # -- naming
    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{int(step)}"

    def path_for(self, step: int) -> Path:
        return self.root / self.tag_for(step)

    def latest_tag(self) -> Optional[str]:
        p = self.root / LATEST
        if not p.is_file():
            return None
        tag = p.read_text().strip()
        return tag or None

    def latest_path(self) -> Optional[Path]:
        tag = self.latest_tag()
        return self.root / tag if tag else None

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (step, path), oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            s = step_of(p.name)
            if s is not None and p.is_dir() and (p / COMPLETE).is_file():
                out.append((s, p))
        return sorted(out)

    def should_save(self, step: int) -> bool:
        """Periodic checkpoint due after optimizer step ``step`` (``checkpoint.every``; 0 = never)."""
        return self.cfg.every > 0 and step > 0 and step % self.cfg.every == 0

    # -- resume
    def resolve_resume(self) -> Optional[Path]:
        """The checkpoint to resume from per ``checkpoint.resume`` (every rank calls it):

        * ``auto``: the one ``latest`` names, or None (fresh start). Stale directories (newer than
          ``latest`` or without ``COMPLETE``: an interrupted save) are deleted first, by rank 0.
        * ``never``: None; refuses a run dir that already holds checkpoints (it would mix runs).
        * a path: a checkpoint directory (or a run / checkpoints dir with a ``latest``); an error
          if it does not exist or holds no checkpoint files.
        """
        mode = (self.cfg.resume or "auto").strip()
        err, result = "", None
        if self.rank == 0:
            try:
                result = self._resolve_on_rank0(mode)
            except CheckpointError as exc:
                err = str(exc)
        err, result = _broadcast((err, None if result is None else str(result)))
        if err:
            raise CheckpointError(err)
        return Path(result) if result else None

    def _resolve_on_rank0(self, mode: str) -> Optional[Path]:
        if mode == "never":
            latest = self.latest_tag()
            if latest:
                raise CheckpointError(
                    f"checkpoint.resume=never but {self.root} already holds checkpoints (latest: {latest}); "
                    f"use a new train.run_dir, delete {self.root}, or set checkpoint.resume=auto")
            self.cleanup_stale()
            return None
        if mode == "auto":
            self.cleanup_stale()
            latest = self.latest_path()
            if latest is None:
                return None
            if not latest.is_dir():
                raise CheckpointError(f"{self.root / LATEST} names {latest.name}, which does not exist: the run dir "
                                      f"was altered; set checkpoint.resume to an existing checkpoint path")
            self.verify(latest)
            return latest
        path = Path(mode)
        for root in (path / "checkpoints", path):  # a run dir or a checkpoints dir: follow its latest
            if (root / LATEST).is_file() and not (path / COMPLETE).is_file():
                path = root / (root / LATEST).read_text().strip()
                break
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume={mode}: no such checkpoint directory ({path})")
        self.verify(path)
        return path

    @staticmethod
    def verify(path: Path) -> dict:
        """A checkpoint dir is usable: its COMPLETE manifest's files exist with their sizes
        (or, for a checkpoint from elsewhere without one, it holds non-empty model files)."""
        manifest_p = path / COMPLETE
        if manifest_p.is_file():
            manifest = json.loads(manifest_p.read_text())
            bad = []
            for rel, size in manifest.get("files", {}).items():
                f = path / rel
                if not f.is_file():
                    bad.append(f"{rel} missing")
                elif f.stat().st_size != size:
                    bad.append(f"{rel} has {f.stat().st_size} bytes, expected {size}")
            if bad:
                raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(bad[:5])}")
            return manifest
        model_files = [p for pat in ("*model_states.pt", "model.safetensors", "*.safetensors", "pytorch_model.bin")
                       for p in path.glob(pat) if p.stat().st_size > 0]
        if not model_files:
            raise CheckpointError(f"{path}: not a checkpoint (no {COMPLETE} manifest and no model-state files)")
        log.warning("%s has no %s manifest (not written by this tool?): trusting its model files", path, COMPLETE)
        return {}

    def cleanup_stale(self) -> list[Path]:
        """Rank 0: delete step dirs an interrupted save left behind (newer than ``latest``, or
        incomplete), and temp/trash leftovers. Never touches the checkpoint ``latest`` names."""
        if self.rank != 0 or not self.root.is_dir():
            return []
        latest = self.latest_tag()
        latest_step = step_of(latest) if latest else None
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith((".trash-", f".{LATEST}.tmp")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                continue
            s = step_of(p.name)
            if s is None or not p.is_dir() or p.name == latest:
                continue
            newer = latest_step is None or s > latest_step
            if newer or not (p / COMPLETE).is_file():
                log.warning("removing stale checkpoint dir %s (interrupted save; latest is %s)", p, latest)
                _remove_tree(p)
                removed.append(p)
        return removed

    # -- save
    def save(self, engine: Any, step: int, client_state: dict) -> Path:
        """Write checkpoint ``step_{step}`` on every rank; move ``latest`` only when every rank's
        files are written and checked; prune. Raises :class:`CheckpointError` on every rank if any
        rank failed (the partial directory is removed, ``latest`` is unchanged)."""
        tag = self.tag_for(step)
        path = self.root / tag
        t0 = time.time()
        # 1. rank 0 prepares the directory (a stale one of the same name goes first)
        err = ""
        already = False
        if self.rank == 0:
            try:
                if self.latest_tag() == tag and (path / COMPLETE).is_file():
                    already = True
                else:
                    self.root.mkdir(parents=True, exist_ok=True)
                    if path.exists():
                        log.warning("removing stale %s before saving over it", path)
                        _remove_tree(path)
                    path.mkdir()
            except OSError as exc:
                err = f"{type(exc).__name__}: {exc}"
        err, already = _broadcast((err, already))
        if err:
            raise CheckpointError(f"checkpoint {tag}: cannot create {path}: {err}; latest is still "
                                  f"{self.latest_tag()}")
        if already:
            log.info("checkpoint %s already saved", tag)
            return path

        # 2. every rank writes and checks its own files
        state = dict(client_state)
        state.setdefault("step", step)
        state["world_size"] = self.world_size
        state["rng"] = capture_rng()
        files: dict[str, int] = {}
        err = ""
        try:
            written = list(engine.save_checkpoint(self.root, tag, state))
            rng_file = path / f"rng_state_{self.rank}.pt"
            torch.save(capture_rng(), rng_file)
            written.append(rng_file)
            for f in written:
                f = Path(f)
                if not f.is_file():
                    raise OSError(f"{f} was not written")
                size = f.stat().st_size
                if size == 0:
                    raise OSError(f"{f} is empty")
                _fsync_file(f)
                files[str(f.relative_to(path))] = size
        except Exception as exc:  # any failure on any rank must reach all ranks
            err = f"{type(exc).__name__}: {exc}"
        results = _gather((self.rank, err, files))
        failed = [(r, e) for r, e, _ in results if e]
        if failed:
            self._abandon(path)
            raise CheckpointError(
                f"checkpoint {tag} failed on rank(s) {', '.join(str(r) for r, _ in failed)}: "
                + " | ".join(f"rank {r}: {e}" for r, e in failed)
                + f"; the partial directory was removed and latest is still {self.latest_tag()}")

        # 3. rank 0 seals it: COMPLETE manifest, then latest (atomic), then prune
        err = ""
        if self.rank == 0:
            try:
                _fsync_dir(path)
                manifest = {"step": step, "tag": tag, "world_size": self.world_size, "time": time.time(),
                            "client": _jsonable(client_state),
                            "files": {k: v for _, _, fs in results for k, v in fs.items()}}
                write_text_atomic(path / COMPLETE, json.dumps(manifest, indent=1, sort_keys=True))
                write_text_atomic(self.root / LATEST, tag)
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
                if self.latest_tag() != tag:
                    _remove_tree(path)
            if not err:
                try:
                    self.prune()
                except OSError as exc:  # a failed prune leaves an extra old checkpoint: not fatal
                    log.warning("pruning old checkpoints failed: %s", exc)
        err = _broadcast(err)
        if err:
            raise CheckpointError(f"checkpoint {tag}: sealing failed on rank 0: {err}; latest is still "
                                  f"{self.latest_tag()}")
        log.info("checkpoint %s saved in %.1f s", path, time.time() - t0)
        return path

    def _abandon(self, path: Path) -> None:
        if self.rank == 0:
            _remove_tree(path)
        _barrier()

    def prune(self) -> list[Path]:
        """Rank 0: keep the newest ``keep_last`` checkpoints up to ``latest`` (<= 0: keep all)."""
        if self.rank != 0 or self.cfg.keep_last <= 0:
            return []
        latest = self.latest_tag()
        latest_step = step_of(latest) if latest else None
        if latest_step is None:
            return []
        older = [(s, p) for s, p in self.checkpoints() if s <= latest_step]
        keep = {p.name for _, p in older[-self.cfg.keep_last:]} | {latest}
        removed = []
        for p in self.root.iterdir():
            s = step_of(p.name)
            if s is not None and p.is_dir() and s < latest_step and p.name not in keep:
                _remove_tree(p)
                removed.append(p)
        return removed

    # -- load
    def load(self, engine: Any, path: str | Path) -> dict:
        """Load ``path`` into ``engine`` (every rank); returns the client_state, with ``"rng"``
        replaced by THIS rank's saved RNG states (None if the checkpoint had fewer ranks)."""
        path = Path(path)
        client = engine.load_checkpoint(path.parent, path.name)
        rng_file = path / f"rng_state_{self.rank}.pt"
        if rng_file.is_file():
            client["rng"] = torch.load(rng_file, map_location="cpu", weights_only=False)
        else:
            client["rng"] = None
            log.info("no RNG state for rank %d in %s (saved with %s ranks): keeping the seeded RNG",
                     self.rank, path, client.get("world_size"))
        return client


# --------------------------------------------------------------------------- preemption


class PreemptionHandler:
    """SIGUSR1/SIGTERM → a flag; :meth:`should_stop` agrees on it across ranks at step boundaries.

    Usage (every rank)::

        with PreemptionHandler() as pre:
            for step in ...:
                train_step()
                if pre.should_stop():            # collective: call it on every rank, every step
                    ckpt.save(engine, step, state)
                    exit_for_requeue(cfg.checkpoint)   # sys.exit(requeue_exit_code)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum  # nothing else: we are inside an arbitrary bytecode

    def install(self) -> PreemptionHandler:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """This rank got a signal (local; use :meth:`should_stop` to decide)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank if any rank got a signal. A collective (all-reduce of one number):
        every rank must call it at the same step."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=_flag_device())
        if _dist_on():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item() > 0)
        if stop and self.received is None:
            self.received = -1  # learned from another rank
        return stop


def exit_for_requeue(ckpt_cfg: CheckpointConfig) -> None:
    """After the preemption save: leave the process group cleanly and exit with
    ``checkpoint.requeue_exit_code`` (the job script requeues on that status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        _barrier()
        dist.destroy_process_group()
    sys.exit(ckpt_cfg.requeue_exit_code)
