"""From labelled texts to the tensors a rank feeds its model: tokenised encoding, dynamic padding,
and which examples each rank takes, for training and for evaluation.

Training order is ``DistributedSampler``'s (a permutation per epoch, padded by repetition, strided
over ranks), decided on the *global* order, so a 1-rank and a W-rank run with the same global
batch see the same examples in every optimizer step and every rank takes the same number of
steps (docs/design.md, guarantee 2). Evaluation shards are padded the same way because a ZeRO-3
forward is a collective: a rank with one batch fewer would leave the others waiting forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

MEGABATCH = 50  # global batches sorted together when grouping by length (HF's LengthGroupedSampler)


# --------------------------------------------------------------------------- encoding and batches


@dataclass
class Encoded:
    """Token ids per example (a *feature*: one window of a long QA context), unpadded: each batch is
    padded only to its own longest example. ``targets`` are per-feature training targets the batch
    carries: ``labels`` per piece (token classification, padded with -100), ``start_positions`` /
    ``end_positions`` (extractive QA)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    targets: dict[str, list] = field(default_factory=dict)
    word_ids: Optional[list] = None  # token classification: the word of each piece (None: a special token)
    offsets: Optional[list] = None  # extractive QA: context (start, end) chars of each piece, None outside it
    example_of: Optional[np.ndarray] = None  # extractive QA: the example each feature is a window of

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def encode(tokenizer: Any, texts: Sequence[str], pairs: Optional[Sequence[str]], max_seq_len: int) -> Encoded:
    """[CLS] A [SEP] (B [SEP]), truncated longest-first to ``max_seq_len``."""
    if not len(texts):
        return Encoded([], [])
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_seq_len,
                    padding=False, return_attention_mask=False, return_token_type_ids=True)
    return Encoded(enc["input_ids"], enc["token_type_ids"])


def collate(enc: Encoded, idx: Sequence[int], pad_id: int, labels: Optional[np.ndarray] = None,
            pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Examples ``idx`` padded to the batch's longest, rounded up to ``pad_multiple`` (tensor cores
    want multiples of 8; a CPU wants no extra padding)."""
    longest = max(len(enc.input_ids[i]) for i in idx)
    width = -(-longest // pad_multiple) * pad_multiple
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(idx), width), dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n] = torch.as_tensor(enc.input_ids[i])
        types[row, :n] = torch.as_tensor(enc.token_type_ids[i])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels[np.asarray(idx)])
    for key, values in enc.targets.items():
        batch[key] = _target_tensor([values[i] for i in idx], width)
    return batch


def _target_tensor(values: list, width: int) -> torch.Tensor:
    """Per-feature targets: ints as they are, per-piece lists padded with -100 (ignored by the loss)."""
    if values and isinstance(values[0], list):
        out = torch.full((len(values), width), -100, dtype=torch.long)
        for row, v in enumerate(values):
            out[row, :len(v)] = torch.as_tensor(v, dtype=torch.long)
        return out
    return torch.as_tensor(values, dtype=torch.long)


def batches(enc: Encoded, idx: np.ndarray, batch_size: int, pad_id: int, labels: Optional[np.ndarray] = None,
            pad_multiple: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive batches of ``idx``, in order (the last one may be short)."""
    for start in range(0, len(idx), batch_size):
        yield collate(enc, idx[start:start + batch_size], pad_id, labels, pad_multiple)


# --------------------------------------------------------------------------- per-rank shards


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
        order = _group_by_length(order, lengths, global_batch, g)
    return order[rank:total:world]


def _group_by_length(order: np.ndarray, lengths: np.ndarray, global_batch: int, g: torch.Generator) -> np.ndarray:
    total = len(order)
    mega = MEGABATCH * global_batch
    order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                            for c in (order[i:i + mega] for i in range(0, total, mega))])
    full = total // global_batch
    whole = order[:full * global_batch].reshape(full, global_batch)
    return np.concatenate([whole[torch.randperm(full, generator=g).numpy()].reshape(-1), order[full * global_batch:]])


def eval_shard(n: int, rank: int, world: int, lengths: Optional[np.ndarray] = None) -> np.ndarray:
    """This rank's example indices: strided, padded by repetition so every rank has the same count
    (ZeRO-3 forwards are collectives: uneven batch counts would hang), longest first (less padding)."""
    per = math.ceil(n / world) if n else 0
    idx = np.arange(per * world) % max(n, 1)
    mine = idx[rank::world][:per]
    if lengths is not None and len(mine):
        mine = mine[np.argsort(-lengths[mine], kind="stable")]
    return mine
