"""Cutting built sample rows into micro-batches: the model's fields, padded per micro-batch.

The stream (dataset.py) builds the rows of several micro-steps in one vectorised pass (numpy's
per-call cost, not the data, dominates at 32 samples, so sharing the calls across steps is most of
the speed) and cuts them here. Each micro-batch is padded only to its own longest sample
(rounded up to ``pad_to_multiple_of``), so it equals the micro-batch built alone: a sample's
content, masks included, does not depend on its batch-mates or padding (docs/design.md, guarantee 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
    # packed rows only: the chunks of row i are part_lengths[part_offsets[i]:part_offsets[i + 1]]
    part_offsets: Optional[np.ndarray] = None
    part_lengths: Optional[np.ndarray] = None

    def set_chunks(self, part_rows: list[np.ndarray], part_lengths: list[np.ndarray]) -> None:
        """Packed rows: each chunk's row and length (groups of chunks in any row order; within a
        row in order), laid out by row. No chunks at all: the padding sample, one [CLS] [SEP]."""
        B = len(self.lengths)
        if part_rows:
            pr = np.concatenate(part_rows)
            self.part_lengths = np.concatenate(part_lengths)[np.argsort(pr, kind="stable")]
            per_row = np.bincount(pr, minlength=B)
        else:
            self.part_lengths, per_row = self.lengths.copy(), np.ones(B, dtype=np.int64)
        self.part_offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)


def cut_batch(rows: Rows, r0: int, r1: int, multiple: int) -> dict[str, Any]:
    """The micro-batch of rows ``r0:r1`` (the fields listed in stream/loader.py, numpy arrays)."""
    lengths = rows.lengths[r0:r1]
    B = r1 - r0
    longest = int(lengths.max()) if B else 0
    L = -(-longest // multiple) * multiple  # <= the rows' width, which is rounded the same way

    def cut(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[r0:r1, :L])

    real = np.arange(L)[None, :] < lengths[:, None]
    # cu_seqlens count the sequences attention keeps apart: the rows, or with packed rows their chunks
    seqs = lengths if rows.part_offsets is None else rows.part_lengths[rows.part_offsets[r0] : rows.part_offsets[r1]]
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(seqs, out=cu[1:])
    return {
        "input_ids": cut(rows.ids),
        "token_type_ids": cut(rows.types),
        "attention_mask": real.astype(np.int64),
        "labels": cut(rows.labels),
        "next_sentence_label": rows.nsp[r0:r1].copy(),
        "sample_ids": rows.sample_ids[r0:r1].copy(),
        "cu_seqlens": cu,
        "indices": np.flatnonzero(real),
        "max_seqlen": int(seqs.max()) if len(seqs) else 0,
    }
