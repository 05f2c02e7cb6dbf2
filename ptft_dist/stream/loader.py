"""A rank's data loader: DataLoader workers over a :class:`PretrainingStream`, batch transport
between processes, checkpointable position, and the train / validation builders.

Which samples a rank gets, and in which order, is decided in dataset.py; this module only moves
the micro-batches: worker ``w`` of ``n`` builds micro-steps ``w, w+n, ...`` and PyTorch's
round-robin over workers yields them in step order, so batches are identical for any worker count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ptft_dist.config import DataConfig
from ptft_dist.corpus.format import CorpusError, Manifest
from ptft_dist.stream.dataset import VALIDATION_SEED, PretrainingStream

# A micro-batch (torch tensors; B samples, L = longest sample, rounded up to pad_to_multiple_of):
#   input_ids, token_type_ids, attention_mask, labels   int64 [B, L]   labels: original id where
#                                                        predicted, -100 elsewhere (incl. padding)
#   next_sentence_label  int64 [B]    0 IsNext, 1 NotNext, -100 (MLM-only mode, padding sample)
#   sample_ids           int64 [B]    stable id within the epoch; -1 = padding sample
#   cu_seqlens           int32 [S+1]  packed form: cumulative lengths of the unpadded sequences
#                                     (S = B, or the number of chunks with data.pack_samples)
#   indices              int64 [T]    packed form: flat positions (into B*L) of the T real tokens
#   max_seqlen           int          longest of those sequences
# The model takes all of them but sample_ids (which only the data-order log reads).
MODEL_INPUTS = (
    "input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label",
    "cu_seqlens", "indices", "max_seqlen",
)
BATCH_KEYS = (*MODEL_INPUTS, "sample_ids")


# --------------------------------------------------------------------------- worker transport




_NARROW = [(np.dtype(t), int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in (np.uint8, np.int16, np.uint16, np.int32)]


def _wire_dtype(key: str, v: np.ndarray) -> np.dtype:
    """The smallest dtype that holds a field exactly (fewer bytes per batch through the pipe)."""
    if key in ("attention_mask", "token_type_ids"):
        return np.dtype(np.uint8)
    if key in ("input_ids", "labels", "indices") and v.size:
        lo, hi = int(v.min()), int(v.max())
        for dt, dt_lo, dt_hi in _NARROW:
            if dt_lo <= lo and hi <= dt_hi:
                return dt
    return v.dtype


class PackedBatch:
    """A micro-batch as one byte buffer plus a layout, the form worker processes send it in.

    The buffer is a ``bytearray``, so it is pickled through the DataLoader's pipe: one ~30-200 KB
    write per batch. A torch tensor would instead go through shared memory, which costs a new
    shared-memory segment and a file-descriptor hand-over per batch (~1 ms of CPU on each side,
    more than building the batch; measured with benchmarks/loader_throughput.py, docs/performance.md).
    ``layout``: (key, wire dtype, final dtype, shape, byte offset) per array field; ``extras``:
    the non-array fields. Workers always send the compact form; the DataLoader's pin-memory thread
    calls :meth:`pin_memory`, which widens the fields there (off the training thread) into one
    pinned tensor the unpacked fields are views of.
    """

    __slots__ = ("buffer", "layout", "extras")

    def __init__(self, buffer: bytearray | torch.Tensor, layout: list[tuple], extras: dict[str, Any]):
        self.buffer, self.layout, self.extras = buffer, layout, extras

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() if isinstance(self.buffer, torch.Tensor) else len(self.buffer)

    def pin_memory(self, device: Any = None) -> PackedBatch:
        packed = self
        if not isinstance(packed.buffer, torch.Tensor):
            if any(wire != final for _, wire, final, _, _ in packed.layout):  # widen: pinned fields stay views
                packed = pack_batch(_numpy_fields(packed), compact=False)
            raw = packed.buffer
            buf = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8)) if len(raw) else torch.empty(0, dtype=torch.uint8)
        else:
            buf = packed.buffer
        return PackedBatch(buf.pin_memory(), packed.layout, self.extras)

    def __getstate__(self) -> tuple:
        return self.buffer, self.layout, self.extras

    def __setstate__(self, state: tuple) -> None:
        self.buffer, self.layout, self.extras = state


def pack_batch(batch: dict[str, Any], compact: bool = True) -> PackedBatch:
    """A batch as one byte buffer plus a layout (:func:`unpack_batch` restores it exactly), each
    field in its smallest exact dtype when ``compact`` (widened back on the consumer)."""
    arrays = [(k, v, _wire_dtype(k, v) if compact else v.dtype) for k, v in batch.items() if isinstance(v, np.ndarray)]
    sizes = [-(-(v.size * dt.itemsize) // 8) * 8 for _, v, dt in arrays]
    raw = bytearray(sum(sizes))
    buf = np.frombuffer(raw, dtype=np.uint8)
    layout, o = [], 0
    for (k, v, dt), nb in zip(arrays, sizes):
        buf[o : o + v.size * dt.itemsize].view(dt)[:] = v.reshape(-1)
        layout.append((k, dt.str, v.dtype.str, tuple(v.shape), o))
        o += nb
    extras = {k: v for k, v in batch.items() if not isinstance(v, np.ndarray)}
    return PackedBatch(raw, layout, extras)


def _torch_dtype(numpy_dtype: str) -> torch.dtype:
    """torch's dtype for a numpy dtype string (every one numpy and torch share; no silent fallback)."""
    return torch.from_numpy(np.empty(0, dtype=np.dtype(numpy_dtype))).dtype


def _unpack_tensor(buf: torch.Tensor, layout: list[tuple]) -> dict[str, Any]:
    """Fields as views of a (pinned) byte tensor; widened fields are copies."""
    out: dict[str, Any] = {}
    for k, wire, final, shape, o in layout:
        shape = [int(x) for x in shape]
        wdt, fdt = _torch_dtype(wire), _torch_dtype(final)
        nbytes = math.prod(shape) * np.dtype(wire).itemsize
        t = buf[o : o + nbytes].view(wdt).view(*shape)
        out[k] = t if wdt == fdt else t.to(fdt)
    return out


def _numpy_fields(item: PackedBatch) -> dict[str, Any]:
    """The fields of a bytearray-backed batch as numpy arrays of their final dtypes (views where
    the wire dtype is the final one), its non-array fields included."""
    out: dict[str, Any] = {}
    raw = np.frombuffer(item.buffer, dtype=np.uint8)
    for k, wire, final, shape, o in item.layout:
        wdt = np.dtype(wire)
        a = raw[o : o + math.prod(shape) * wdt.itemsize].view(wdt).reshape(shape)
        out[k] = a if wire == final else a.astype(final)
    out.update(item.extras)
    return out


def unpack_batch(item: Any) -> Any:
    """Inverse of :func:`pack_batch` (other items pass through unchanged)."""
    if not isinstance(item, PackedBatch):
        return item
    if isinstance(item.buffer, torch.Tensor):
        out = _unpack_tensor(item.buffer, item.layout)
        out.update(item.extras)
        return out
    # numpy views of the (writable) bytearray: a few µs per field, torch shares the memory
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in _numpy_fields(item).items()}


class _WorkerBatches(IterableDataset):
    """What a DataLoader worker runs: its share of the stream's micro-steps, each sent as a
    compact :class:`PackedBatch` (the pin-memory thread widens it, :meth:`PackedBatch.pin_memory`)."""

    def __init__(self, dataset: PretrainingStream):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in self.dataset.iter_numpy(wid, nw):
            yield pack_batch(batch)


# --------------------------------------------------------------------------- loader


def _unwrap_worker_error(exc: CorpusError) -> CorpusError:
    """torch re-raises a worker's exception with its whole traceback as the message; keep the one line."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    for line in reversed(text.strip().splitlines()):
        if "CorpusError: " in line:
            return CorpusError(line.split("CorpusError: ", 1)[1])
    return exc


class StreamingLoader:
    """A rank's DataLoader over a :class:`PretrainingStream` with checkpointable position.

    ``for batch in loader`` yields the rest of the current epoch; afterwards the position is at
    the start of the next epoch. ``state_dict()`` after a batch has been yielded means "that
    batch is consumed"; ``load_state_dict()`` makes the next iteration continue right after it.
    """

    def __init__(
        self,
        dataset: PretrainingStream,
        num_workers: Optional[int] = None,
        pin_memory: bool = False,
        prefetch_factor: Optional[int] = None,
        multiprocessing_context: Optional[str] = None,
        timeout: float = 0,
    ):
        self.dataset = dataset
        self.num_workers = dataset.cfg.num_workers if num_workers is None else int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor or dataset.cfg.prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.timeout = timeout
        self.fixed = dataset.fixed_epoch is not None

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def consumed(self) -> int:
        return self.dataset.consumed

    def __len__(self) -> int:
        """Micro-steps left in the current epoch (the same on every rank)."""
        return self.dataset.steps_in_epoch(None, 0 if self.fixed else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        if self.fixed:
            ds.consumed = 0
        epoch, start = ds.effective_epoch(), ds.consumed
        n = ds.num_samples(epoch)  # plan computed here, before workers fork, so they inherit it
        if n == 0 and not self.fixed:
            raise CorpusError(f"{ds.corpus}: split '{ds.split}' yields no samples in epoch {epoch}")
        steps = ds.steps_in_epoch(epoch, start)
        it = self._batches(steps)
        k = 0
        try:
            for batch in it:
                batch = unpack_batch(batch)
                k += 1
                if not self.fixed:
                    ds.consumed = min(n, start + k * ds.global_micro_batch)
                yield batch
        except CorpusError as exc:
            raise _unwrap_worker_error(exc) from None
        finally:
            # Stop worker processes now (on error or early exit) rather than whenever the iterator
            # is garbage-collected; torch's __del__ does the same, just later.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it
        if k != steps:  # the consumer stopped early: keep the position where it stopped
            return
        if not self.fixed:
            ds.epoch, ds.consumed = epoch + 1, 0

    def _batches(self, steps: int) -> Iterator[dict[str, Any]]:
        """The stream itself, or a DataLoader whose worker processes build the micro-steps."""
        if self.num_workers <= 0 or steps <= 0:
            return iter(self.dataset)
        from torch.utils.data import DataLoader

        loader = DataLoader(  # a private generator: never draw from the global RNG a resume restores
            _WorkerBatches(self.dataset), batch_size=None,
            num_workers=min(self.num_workers, steps), pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),
            prefetch_factor=self.prefetch_factor, persistent_workers=False,
            multiprocessing_context=self.multiprocessing_context, timeout=self.timeout,
        )
        return iter(loader)

    def forever(self) -> Iterator[dict[str, Any]]:
        """Batches across epoch boundaries, without end (the position keeps advancing)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """The stream's position (:meth:`PretrainingStream.state_dict`): the same on every rank."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.dataset.load_state_dict(state, strict)


# --------------------------------------------------------------------------- builders


def build_train_loader(
    cfg: DataConfig,
    micro_batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    *,
    corpus: Optional[str] = None,
    expected_tokenizer: Optional[str] = None,
    num_workers: Optional[int] = None,
    pin_memory: bool = False,
    manifest: Optional[Manifest] = None,
) -> StreamingLoader:
    """The training stream of this rank; ``manifest``: pass the one the caller loaded (read once)."""
    ds = PretrainingStream(corpus, cfg, micro_batch_size=micro_batch_size, world_size=world_size, rank=rank,
                           split="train", expected_tokenizer=expected_tokenizer, manifest=manifest)
    return StreamingLoader(ds, num_workers=num_workers, pin_memory=pin_memory)


def build_validation_loader(
    cfg: DataConfig,
    micro_batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    *,
    corpus: Optional[str] = None,
    max_samples: Optional[int] = None,
    expected_tokenizer: Optional[str] = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    manifest: Optional[Manifest] = None,
) -> StreamingLoader:
    """The fixed validation stream: the same samples (masking included) on every pass and in every
    run on this corpus, whatever the training seed (:data:`VALIDATION_SEED`), spread over ranks like
    training (equal step counts, padding samples); ``max_samples`` keeps the first N of its order."""
    ds = PretrainingStream(
        corpus, cfg, micro_batch_size=micro_batch_size, world_size=world_size, rank=rank, split="validation",
        fixed_epoch=0, max_samples=max_samples if max_samples is not None else cfg.validation_max_samples,
        expected_tokenizer=expected_tokenizer, seed=VALIDATION_SEED, manifest=manifest,
    )
    return StreamingLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
