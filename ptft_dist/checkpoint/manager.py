"""Checkpoints that are whole or invisible (docs/design.md, guarantee 5), auto-resume, keep-last-K.

On-disk layout (``run_dir`` must be on a filesystem every rank sees)::

    run_dir/checkpoints/
      latest                  text: the tag of the newest COMPLETE checkpoint ("step_1200")
      step_1200/              one checkpoint (tag = step_{N}, N = optimizer steps done)
        COMPLETE              JSON manifest (step, world size, every rank's files and sizes);
                              written after all ranks' files are written, fsync'd and checked
        ptft_meta.json        backend, ZeRO stage, world size, precision (checkpoint/universal.py)
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

Where the latest checkpoint is has ONE answer, :func:`find_checkpoint` (used by resume and by
``ptft convert``). Preemption (signal → save → exit → resume) lives in ``checkpoint/preemption.py``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ptft_dist.config import CheckpointConfig
from ptft_dist.dist.collectives import barrier, broadcast_object, gather_object
from ptft_dist.errors import UserError
from ptft_dist.fsutil import fsync_dir, fsync_file, remove_tree, write_text_atomic
from ptft_dist.log import get_logger

log: logging.Logger = get_logger("checkpoint")

CHECKPOINTS_DIR = "checkpoints"  # run_dir/checkpoints
LATEST = "latest"  # checkpoints/latest: the tag of the newest complete checkpoint
COMPLETE = "COMPLETE"  # step_N/COMPLETE: the manifest, written last
_TAG_RE = re.compile(r"^step_(\d+)$")
_MODEL_FILES = ("*model_states.pt", "model.safetensors", "*.safetensors", "pytorch_model.bin")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written / found / trusted (the message says which and why)."""


def step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_state_{rank}.pt"


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


# --------------------------------------------------------------------------- finding and trusting one


def read_manifest(step_dir: str | Path) -> dict:
    """The ``COMPLETE`` manifest of a checkpoint ({} for one without)."""
    p = Path(step_dir) / COMPLETE
    return json.loads(p.read_text()) if p.is_file() else {}


def verify(path: str | Path) -> dict:
    """A checkpoint dir is usable: its COMPLETE manifest's files exist with their sizes
    (or, for a checkpoint from elsewhere without one, it holds non-empty model files).
    Returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest:
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
    if _written_here(path):
        raise CheckpointError(_incomplete(path))
    if not _model_files(path):
        raise CheckpointError(f"{path}: not a checkpoint (no {COMPLETE} manifest and no model-state files)")
    log.warning("%s has no %s manifest (not written by this tool?): trusting its model files", path, COMPLETE)
    return {}


def _written_here(path: Path) -> bool:
    """A step dir this manager began (its RNG files, or a ``step_N`` beside ``latest``): without
    ``COMPLETE`` its save was interrupted, however whole its files look (guarantee 5)."""
    beside_latest = path.parent.name == CHECKPOINTS_DIR and (path.parent / LATEST).is_file()
    return any(path.glob("rng_state_*.pt")) or (step_of(path.name) is not None and beside_latest)


def _incomplete(path: Path) -> str:
    latest = path.parent / LATEST
    tag = latest.read_text().strip() if latest.is_file() else ""
    hint = (f"the last complete checkpoint of this run is {path.parent / tag}" if tag and tag != path.name
            else "give a complete checkpoint (a step dir with COMPLETE) or the run directory")
    return (f"{path}: incomplete checkpoint (no {COMPLETE}: its save was interrupted, so its files may be partial); "
            f"{hint}")


def _model_files(path: Path) -> list[Path]:
    return [p for pat in _MODEL_FILES for p in path.glob(pat) if p.stat().st_size > 0]


def _follow_latest(path: Path) -> Optional[Path]:
    """The step dir named by ``latest`` in ``path/checkpoints`` or ``path``; None when neither has one
    (or ``path`` is itself a sealed step dir)."""
    if (path / COMPLETE).is_file():
        return None
    for root in (path / CHECKPOINTS_DIR, path):
        pointer = root / LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            if not tag or not (root / tag).is_dir():
                raise CheckpointError(f"{pointer} names {tag or 'nothing'}, which does not exist: "
                                      f"the run dir was altered")
            return root / tag
    return None


def find_checkpoint(path: str | Path) -> Path:
    """A run dir, its ``checkpoints/`` dir, or a step dir → the verified step dir (for the first
    two, the one ``latest`` names). Raises :class:`CheckpointError` saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    step_dir = _follow_latest(p)
    if step_dir is None:
        if not (p / COMPLETE).is_file() and not _model_files(p):
            if _written_here(p):
                raise CheckpointError(_incomplete(p))
            raise CheckpointError(f"{p}: not a checkpoint: no '{LATEST}' file and no checkpoint files here "
                                  "(give a run directory, its checkpoints/ folder, or a step_N folder)")
        step_dir = p
    verify(step_dir)
    return step_dir


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save / find / prune checkpoints of one run. Construct it on every rank."""

    verify = staticmethod(verify)  # CheckpointManager.verify(path), as before the module function existed

    def __init__(self, run_dir: str | Path, ckpt_cfg: CheckpointConfig, rank: int, world_size: int):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR
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
        err, result = broadcast_object((err, None if result is None else str(result)))
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
            self._refuse_unnamed_checkpoints(mode)
            self.cleanup_stale()
            return None
        if mode == "auto":
            self._refuse_unnamed_checkpoints(mode)
            self.cleanup_stale()
            if self.latest_tag() is None:
                return None
            try:
                return find_checkpoint(self.root)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; set checkpoint.resume to an existing checkpoint path") from None
        try:
            return find_checkpoint(mode)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint.resume: {exc}") from None

    def _refuse_unnamed_checkpoints(self, mode: str) -> None:
        """Complete checkpoints but no ``latest`` (deleted by hand, or copied without it): which one
        to trust is the user's call, and nothing of theirs may be deleted to make room for a fresh
        start (docs/design.md, guarantee 9)."""
        if self.latest_tag() is not None:
            return
        complete = self.checkpoints()
        if complete:
            names = ", ".join(p.name for _, p in complete[-3:])
            raise CheckpointError(
                f"checkpoint.resume={mode}: {self.root} holds complete checkpoints ({names}) but no "
                f"'{LATEST}' file naming one; set checkpoint.resume={complete[-1][1]} to continue from it, "
                "or use a new train.run_dir")

    def cleanup_stale(self) -> list[Path]:
        """Rank 0: delete step dirs an interrupted save left behind (newer than ``latest``, or
        incomplete), and temp/trash leftovers. Never touches the checkpoint ``latest`` names, nor a
        complete one when there is no ``latest`` to compare with."""
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
            newer = latest_step is not None and s > latest_step
            if newer or not (p / COMPLETE).is_file():
                log.warning("removing stale checkpoint dir %s (interrupted save; latest is %s)", p, latest)
                remove_tree(p)
                removed.append(p)
        return removed

    # -- save
    def save(self, engine: Any, step: int, client_state: dict,
             extra_files: Optional[Callable[[Path], list[Path]]] = None) -> Path:
        """Write checkpoint ``step_{step}`` on every rank; move ``latest`` only when every rank's
        files are written and checked; prune. Raises :class:`CheckpointError` on every rank if any
        rank failed (the partial directory is removed, ``latest`` is unchanged).

        ``extra_files(step_dir)``: called on every rank after the engine's files; writes more files
        into the checkpoint (e.g. the probe logits ``ptft convert`` checks) and returns the paths it
        wrote here, which are checked and listed in ``COMPLETE`` like the engine's."""
        tag = self.tag_for(step)
        path = self.root / tag
        t0 = time.time()
        if self._prepare_dir(tag, path):
            log.info("checkpoint %s already saved", tag)
            return path
        files = self._write_and_check(engine, step, tag, path, client_state, extra_files)
        self._seal(step, tag, path, client_state, files)
        log.info("checkpoint %s saved in %.1f s", path, time.time() - t0)
        return path

    def _prepare_dir(self, tag: str, path: Path) -> bool:
        """Step 1, rank 0: an empty ``path`` (a stale one of the same name goes first). Returns True
        on every rank when this checkpoint is already saved and named by ``latest``."""
        err, already = "", False
        if self.rank == 0:
            try:
                if self.latest_tag() == tag and (path / COMPLETE).is_file():
                    already = True
                else:
                    self.root.mkdir(parents=True, exist_ok=True)
                    if path.exists():
                        log.warning("removing stale %s before saving over it", path)
                        remove_tree(path)
                    path.mkdir()
            except OSError as exc:
                err = f"{type(exc).__name__}: {exc}"
        err, already = broadcast_object((err, already))
        if err:
            raise CheckpointError(f"checkpoint {tag}: cannot create {path}: {err}; latest is still "
                                  f"{self.latest_tag()}")
        return already

    def _write_and_check(self, engine: Any, step: int, tag: str, path: Path, client_state: dict,
                         extra_files: Optional[Callable[[Path], list[Path]]] = None) -> dict[str, int]:
        """Step 2, every rank: write this rank's files, fsync and check them; then all ranks learn
        whether any failed. Returns every rank's files (relative path → size)."""
        state = dict(client_state)
        state.setdefault("step", step)
        state["world_size"] = self.world_size
        state["rng"] = capture_rng()
        files: dict[str, int] = {}
        err = ""
        try:
            written = list(engine.save_checkpoint(self.root, tag, state))
            rng_file = _rng_file(path, self.rank)
            torch.save(capture_rng(), rng_file)
            written.append(rng_file)
            if extra_files is not None:
                written += list(extra_files(path))
            files = _check_written(written, path)
        except Exception as exc:  # any failure on any rank must reach all ranks
            err = f"{type(exc).__name__}: {exc}"
        results = gather_object((self.rank, err, files))
        failed = [(r, e) for r, e, _ in results if e]
        if failed:
            self._abandon(path)
            raise CheckpointError(
                f"checkpoint {tag} failed on rank(s) {', '.join(str(r) for r, _ in failed)}: "
                + " | ".join(f"rank {r}: {e}" for r, e in failed)
                + f"; the partial directory was removed and latest is still {self.latest_tag()}")
        return {k: v for _, _, fs in results for k, v in fs.items()}

    def _seal(self, step: int, tag: str, path: Path, client_state: dict, files: dict[str, int]) -> None:
        """Step 3, rank 0: COMPLETE manifest, then ``latest`` (atomic), then prune."""
        err = ""
        if self.rank == 0:
            try:
                fsync_dir(path)
                manifest = {"step": step, "tag": tag, "world_size": self.world_size, "time": time.time(),
                            "client": _jsonable(client_state), "files": files}
                write_text_atomic(path / COMPLETE, json.dumps(manifest, indent=1, sort_keys=True))
                write_text_atomic(self.root / LATEST, tag)
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
                if self.latest_tag() != tag:
                    remove_tree(path)
            if not err:
                try:
                    self.prune()
                except OSError as exc:  # a failed prune leaves an extra old checkpoint: not fatal
                    log.warning("pruning old checkpoints failed: %s", exc)
        err = broadcast_object(err)
        if err:
            raise CheckpointError(f"checkpoint {tag}: sealing failed on rank 0: {err}; latest is still "
                                  f"{self.latest_tag()}")

    def _abandon(self, path: Path) -> None:
        if self.rank == 0:
            remove_tree(path)
        barrier()

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
                remove_tree(p)
                removed.append(p)
        return removed

    # -- load
    def load(self, engine: Any, path: str | Path) -> dict:
        """Load ``path`` into ``engine`` (every rank); returns the client_state, with ``"rng"``
        replaced by THIS rank's saved RNG states (None if the checkpoint had fewer ranks)."""
        path = Path(path)
        client = engine.load_checkpoint(path.parent, path.name)
        rng_file = _rng_file(path, self.rank)
        if rng_file.is_file():
            client["rng"] = torch.load(rng_file, map_location="cpu", weights_only=False)
        else:
            client["rng"] = None
            log.info("no RNG state for rank %d in %s (saved with %s ranks): keeping the seeded RNG",
                     self.rank, path, client.get("world_size"))
        return client


def _check_written(written: list, step_dir: Path) -> dict[str, int]:
    """Every file this rank wrote exists, is non-empty and is on disk (fsync'd): relative path → size."""
    files: dict[str, int] = {}
    for f in map(Path, written):
        if not f.is_file():
            raise OSError(f"{f} was not written")
        size = f.stat().st_size
        if size == 0:
            raise OSError(f"{f} is empty")
        fsync_file(f)
        files[str(f.relative_to(step_dir))] = size
    return files
