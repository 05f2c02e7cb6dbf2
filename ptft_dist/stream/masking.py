"""Dynamic MLM masking of a padded batch, the BERT recipe made a pure function of the sample keys.

``round(p * candidates)`` positions per sequence (at least one), chosen uniformly among
non-special tokens (or among whole words: a ``##`` piece, or a BPE / SentencePiece piece without
its ``Ġ`` / ``▁`` word-start marker, is masked with its word); 80% become ``[MASK]`` (the
tokenizer's mask token), 10% a random non-special token, 10% stay unchanged. Labels hold the original id at the
chosen positions and :data:`IGNORE_INDEX` elsewhere. Every choice is a hash of (sample key,
position in the sample), never of the batch or its padding (docs/design.md, guarantee 1).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ptft_dist.stream.keys import (
    S_MASK_ACTION,
    S_MASK_RANDOM,
    S_MASK_SCORE,
    S_WORD_SCORE,
    counter_hashes,
    hash_many,
    hash_streams,
    mix64,
    to_unit,
)
from ptft_dist.stream.spec import SampleSpec, SpecialIds

IGNORE_INDEX = -100  # the label of a position (or an NSP pair) that adds no loss term
_ACTION_STREAMS = (S_MASK_ACTION, S_MASK_RANDOM)


def mask_batch(
    input_ids: np.ndarray,
    lengths: np.ndarray,
    keys: np.ndarray,
    spec: SampleSpec,
    specials: SpecialIds,
    random_ids: np.ndarray,
    is_continuation: Optional[np.ndarray] = None,
    candidates: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Dynamic MLM masking of a padded batch in place; returns labels (-100 where not predicted).

    ``random_ids``: the ids a "random token" replacement draws from (the non-special vocabulary).
    ``is_continuation[v]``: True for pieces that continue a word (:func:`continuation_flags`;
    needed for whole-word masking).
    Randomness depends only on (key, position in the sample), never on the batch or its padding.
    """
    B, L = input_ids.shape
    if B == 0 or L == 0 or spec.mlm_probability <= 0:
        return np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    pos = np.arange(L, dtype=np.int64)
    if candidates is None:
        cand = pos[None, :] < np.asarray(lengths)[:, None]
        for t in specials.all():
            cand &= input_ids != t
    else:
        cand = candidates
    n_cand = cand.sum(axis=1)
    k = np.floor(n_cand * spec.mlm_probability + 0.5).astype(np.int64)
    k = np.where(n_cand > 0, np.maximum(k, 1), 0)
    if spec.max_predictions_per_seq > 0:
        k = np.minimum(k, spec.max_predictions_per_seq)
    keys2 = keys[:, None]
    if spec.whole_word_mask and is_continuation is not None:
        cont = is_continuation[np.clip(input_ids, 0, len(is_continuation) - 1)] & cand
        prev_cand = np.zeros_like(cand)
        prev_cand[:, 1:] = cand[:, :-1]
        start = cand & ~(cont & prev_cand)
        word = np.cumsum(start, axis=1) - 1
        big = np.int64(1) << np.int64(62)
        score = np.where(cand, (hash_streams(keys2, S_WORD_SCORE, word) >> np.uint64(2)).astype(np.int64), big)
        order = np.argsort(score, axis=1, kind="stable")
        s_sorted = np.take_along_axis(score, order, axis=1)
        c_sorted = np.take_along_axis(cand, order, axis=1)
        cnt = np.cumsum(c_sorted, axis=1)
        boundary = np.ones((B, L), dtype=bool)
        boundary[:, :-1] = s_sorted[:, 1:] != s_sorted[:, :-1]
        end_cnt = np.where(boundary, cnt, np.iinfo(np.int64).max)
        end_cnt = np.minimum.accumulate(end_cnt[:, ::-1], axis=1)[:, ::-1]
        sel_sorted = c_sorted & ((end_cnt <= k[:, None]) | (end_cnt == end_cnt[:, :1]))
        sel_sorted &= k[:, None] > 0
        selected = np.zeros((B, L), dtype=bool)
        np.put_along_axis(selected, order, sel_sorted, axis=1)
    else:
        selected = _choose_positions(keys2, cand, k, L)
    labels = np.where(selected, input_ids, IGNORE_INDEX).astype(np.int64, copy=False)
    rows, cols = np.nonzero(selected)
    # Action (80/10/10) and replacement token of every chosen position: one hashing pass.
    h = hash_many(keys[rows], _ACTION_STREAMS, cols)
    act = to_unit(h[:, 0])
    to_mask = act < spec.mask_replace_prob
    to_rand = (~to_mask) & (act < spec.mask_replace_prob + spec.random_replace_prob)
    input_ids[rows[to_mask], cols[to_mask]] = specials.mask
    if len(random_ids) and to_rand.any():
        pick = (to_unit(h[to_rand, 1]) * len(random_ids)).astype(np.int64)
        input_ids[rows[to_rand], cols[to_rand]] = random_ids[np.minimum(pick, len(random_ids) - 1)]
    return labels


_POS_BITS = 20  # the low bits of a position's score hold the position: scores never tie


def _choose_positions(keys2: np.ndarray, cand: np.ndarray, k: np.ndarray, L: int) -> np.ndarray:
    """The ``k[i]`` candidates of row ``i`` with the smallest score ``hash(key, S_MASK_SCORE,
    position)``: uniform without replacement, and a function of (key, position) alone, so padding
    or batch-mates never change the choice (docs/design.md, guarantee 1). The score's low bits
    are the position, so scores are distinct and exactly ``k`` are chosen: a per-row threshold
    from one sort (no argsort / scatter)."""
    if L > 1 << _POS_BITS:
        raise ValueError(f"sequence length {L} > {1 << _POS_BITS} is not supported by the masking")
    h = mix64(keys2 ^ counter_hashes(S_MASK_SCORE, L)[None, :])
    h >>= np.uint64(64 - 62 + _POS_BITS)
    h <<= np.uint64(_POS_BITS)
    h |= np.arange(L, dtype=np.uint64)
    score = h.view(np.int64)  # < 2**62: below every non-candidate's score
    score[~cand] = np.int64(1) << np.int64(62)
    kth = np.sort(score, axis=1)[np.arange(len(k)), np.maximum(k - 1, 0)]
    return (score <= kth[:, None]) & (k > 0)[:, None]


def random_token_ids(vocab_size: int, specials: SpecialIds, extra_special: Optional[list[int]] = None) -> np.ndarray:
    """The ids a random replacement may draw: the vocabulary minus special tokens."""
    ok = np.ones(vocab_size, dtype=bool)
    for t in specials.all() + list(extra_special or []):
        if 0 <= t < vocab_size:
            ok[t] = False
    return np.nonzero(ok)[0].astype(np.int64)


def continuation_flags(vocab: list[str], vocab_size: int, marker: str = "##", marks_start: bool = False) -> np.ndarray:
    """``flags[id]`` = token ``id`` continues the word before it.

    WordPiece (``marker="##"``, ``marks_start=False``): the ``##...`` pieces. Byte-level BPE
    (``"Ġ"``) and Metaspace/SentencePiece (``"▁"``) mark word *starts* (``marks_start=True``): every
    piece without the marker continues a word (punctuation glued to a word included, as in HF's
    offset-based grouping). A sequence's first piece after [CLS]/<s> starts a word either way:
    special tokens are never candidates (see :func:`mask_batch`)."""
    flags = np.zeros(max(vocab_size, len(vocab)), dtype=bool)
    for i, tok in enumerate(vocab):
        if not tok:
            continue
        if marks_start:
            flags[i] = not tok.startswith(marker)
        elif tok.startswith(marker) and len(tok) > len(marker):
            flags[i] = True
    return flags
