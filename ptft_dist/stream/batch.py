"""Cutting built sample rows into micro-batches: the model's fields, padded per micro-batch.

The stream (dataset.py) builds the rows of several micro-steps in one vectorised pass (numpy's
per-call cost, not the data, dominates at 32 samples, so sharing the calls across steps is most of
the speed) and cuts them here. Each micro-batch is padded only to its own longest sample
(rounded up to ``pad_to_multiple_of``), so it equals the micro-batch built alone: a sample's
content, masks included, does not depend on its batch-mates or padding (docs/design.md, guarantee 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Rows:
    """Built, masked samples (one per row) padded to a common width."""

    ids: np.ndarray  # int64 [B, W], masked
    types: np.ndarray  # int64 [B, W]
    labels: np.ndarray  # int64 [B, W]
    lengths: np.ndarray  # int64 [B]
    nsp: np.ndarray  # int64 [B]
    sample_ids: np.ndarray  # int64 [B]


def cut_batch(rows: Rows, r0: int, r1: int, multiple: int) -> dict[str, Any]:
    """The micro-batch of rows ``r0:r1`` (the fields listed in stream/loader.py, numpy arrays)."""
    lengths = rows.lengths[r0:r1]
    B = r1 - r0
    longest = int(lengths.max()) if B else 0
    L = -(-longest // multiple) * multiple  # <= the rows' width, which is rounded the same way

    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[r0:r1, :L])

    real = np.arange(L)[None, :] < lengths[:, None]
    cu = np.zeros(B + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return {
        "input_ids": cut(rows.ids),
        "token_type_ids": cut(rows.types),
        "attention_mask": real.astype(np.int64),
        "labels": cut(rows.labels),
        "next_sentence_label": rows.nsp[r0:r1].copy(),
        "sample_ids": rows.sample_ids[r0:r1].copy(),
        "cu_seqlens": cu,
        "indices": np.flatnonzero(real),
        "max_seqlen": longest,
    }
