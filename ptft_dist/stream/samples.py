"""From a shard's sentences to ``[CLS] A [SEP] B [SEP]`` rows: chunking, NSP pairing, assembly.

Pure, vectorised functions of (seed, epoch, sample id): every random choice is a hash from
keys.py, so a sample is the same whatever process, rank, worker or batch builds it
(docs/design.md, guarantee 1). The recipe follows Google's ``create_pretraining_data.py`` (BERT
paper), made dynamic per epoch:

* **Chunking** (:func:`chunk_sentences`): each document is cut into chunks of consecutive
  sentences; a chunk grows until it holds at least ``target`` tokens or the document ends.
  ``target = max_num_tokens``, or with probability ``short_seq_prob`` a uniform integer in
  ``[2, max_num_tokens]``. One chunk = one training sample. The cut points depend on
  (seed, epoch, shard), so every epoch sees different chunk boundaries (like BERT's dupe_factor).
* **NSP** (:func:`nsp_segments`): segment A = the first ``k`` sentences of the chunk (``k``
  uniform in ``[1, n-1]``); IsNext: B = the rest of the chunk (the actual next sentences);
  NotNext: B = sentences of a different document, starting at a random sentence and filled up to
  the remaining target length. Single-sentence chunks can only be NotNext (as in BERT), so
  multi-sentence chunks are IsNext with probability ``0.5 / (share of multi-sentence chunks)``
  (capped at 1), which keeps the overall IsNext rate at 50%. The pair is truncated to
  ``max_seq_len - 3`` tokens exactly as ``truncate_seq_pair`` does (longer side first, each
  removed token from the front or the back with probability 1/2), computed in closed form.
* **MLM-only** (``nsp=False``, RoBERTa-style): the whole chunk is one segment, ``[CLS] x [SEP]``.
* **Packed rows** (``pack_samples``, MLM-only; :func:`pack_chunks`): one sample is a row of
  consecutive chunks of a shard, each framed ``[CLS] x [SEP]``, filled up to ``max_seq_len``. The
  grouping is fixed per (seed, epoch, shard) like the chunks, so a row is a sample like any other
  (ids, order, exactly-once, resume unchanged); the batch's ``cu_seqlens`` then count chunks, and
  the packed attention keeps each chunk to itself (docs/design.md, guarantee 1).
* **Masking** happens afterwards, on the assembled batch (masking.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptft_dist.stream.keys import (
    S_IS_NEXT,
    S_PARTNER,
    S_PARTNER_START,
    S_SPLIT,
    S_TARGET,
    S_TARGET_LEN,
    S_TRUNC_A,
    S_TRUNC_A2,
    S_TRUNC_B,
    S_TRUNC_B2,
    binomial_half,
    hash_many,
    to_unit,
    uniform,
)
from ptft_dist.stream.masking import IGNORE_INDEX
from ptft_dist.stream.spec import SampleSpec, SpecialIds

IS_NEXT, NOT_NEXT = 0, 1  # Hugging Face convention: 0 = B continues A, 1 = B is random
_NSP_STREAMS = (S_SPLIT, S_IS_NEXT, S_PARTNER, S_PARTNER_START, S_TRUNC_A, S_TRUNC_B)


# --------------------------------------------------------------------------- chunking


def chunk_sentences(
    sentence_offsets: np.ndarray,
    doc_offsets: np.ndarray,
    key: np.ndarray,
    max_num_tokens: int,
    short_seq_prob: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one shard's documents into chunks. Returns (start sentence, end sentence, target) per chunk.

    For every sentence ``s`` the chunk that would start there is computed at once (target drawn
    from the hash of (key, s); end = first sentence boundary reaching the target, capped at the
    document end); a short walk over chunk starts then links the chunks from the first sentence.
    """
    cs = np.asarray(sentence_offsets, dtype=np.int64)
    n_sent = len(cs) - 1
    if n_sent <= 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    doc_off = np.asarray(doc_offsets, dtype=np.int64)
    s = np.arange(n_sent, dtype=np.int64)
    target = np.full(n_sent, max(1, max_num_tokens), dtype=np.int64)
    if short_seq_prob > 0 and max_num_tokens > 2:
        short = uniform(key, S_TARGET, s) < short_seq_prob
        rand_len = 2 + (uniform(key, S_TARGET_LEN, s) * (max_num_tokens - 1)).astype(np.int64)
        target = np.where(short, np.minimum(rand_len, max_num_tokens), target)
    doc_end = np.repeat(doc_off[1:], np.diff(doc_off))
    end = np.searchsorted(cs, cs[:-1] + target, side="left")
    end = np.minimum(np.maximum(end, s + 1), doc_end)
    nxt = end.tolist()
    starts = []
    append = starts.append
    i = 0
    while i < n_sent:
        append(i)
        i = nxt[i]
    st = np.asarray(starts, dtype=np.int64)
    return st, end[st], target[st]


def chunk_costs(sentence_offsets: np.ndarray, c_start: np.ndarray, c_end: np.ndarray, max_num_tokens: int) -> np.ndarray:
    """Tokens each MLM-only chunk takes in a row: its kept content plus ``[CLS]`` and ``[SEP]``."""
    cs = np.asarray(sentence_offsets, dtype=np.int64)
    return 2 + np.minimum(cs[c_end] - cs[c_start], max_num_tokens)


def pack_chunks(costs: np.ndarray, capacity: int) -> np.ndarray:
    """Row offsets into the chunks (length rows + 1): consecutive chunks share a row while their
    costs fit in ``capacity``; a row closes at the first chunk that does not fit (no reordering,
    so a row is a range and a shard's rows are a pure function of its chunks)."""
    off = [0]
    used = 0
    for i, c in enumerate(np.asarray(costs, dtype=np.int64).tolist()):
        if used and used + c > capacity:
            off.append(i)
            used = 0
        used += c
    if len(costs):
        off.append(len(costs))
    return np.asarray(off, dtype=np.int64)


# --------------------------------------------------------------------------- NSP segments


def truncate_lengths(la: np.ndarray, lb: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Final lengths after BERT's ``truncate_seq_pair`` (remove from the longer; ties from B)."""
    la = np.asarray(la, dtype=np.int64)
    lb = np.asarray(lb, dtype=np.int64)
    excess = np.maximum(la + lb - max_tokens, 0)
    d = np.abs(la - lb)
    one_side = excess <= d
    a_longer = la > lb
    la1 = np.where(a_longer, la - excess, la)
    lb1 = np.where(a_longer, lb, lb - excess)
    m = np.minimum(la, lb)
    r = excess - d
    la2 = m - r // 2
    lb2 = m - (r - r // 2)
    return np.where(one_side, la1, la2), np.where(one_side, lb1, lb2)


def truncate_lengths_reference(la: int, lb: int, max_tokens: int) -> tuple[int, int]:
    """The loop from BERT's create_pretraining_data.py (lengths only), for tests."""
    while la + lb > max_tokens:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


@dataclass
class Segments:
    """Token ranges of each sample of a batch (window-global token / sentence / document indices)."""

    a_tok: np.ndarray  # first kept token of A
    la: np.ndarray  # kept length of A
    b_tok: np.ndarray
    lb: np.ndarray
    nsp_label: np.ndarray  # 0 IsNext, 1 NotNext, -100 none
    # provenance (for inspection and tests)
    a_doc: np.ndarray
    a_sent: np.ndarray  # [start, end) sentences of A, shape (n, 2)
    b_doc: np.ndarray  # -1 when there is no B
    b_sent: np.ndarray
    trunc: np.ndarray  # tokens removed: (a_front, a_back, b_front, b_back), shape (n, 4)


def nsp_segments(
    keys: np.ndarray,
    c_start: np.ndarray,
    c_end: np.ndarray,
    c_target: np.ndarray,
    c_doc: np.ndarray,
    c_p_next: np.ndarray,
    sent_cs: np.ndarray,
    doc_off: np.ndarray,
    spec: SampleSpec,
) -> Segments:
    """Segments A/B of each chunk (vectorised over the batch).

    ``sent_cs``: token offset of every sentence (len n_sentences + 1); ``doc_off``: sentence
    offset of every document (len n_docs + 1); both in one coordinate system (a shuffle window).
    """
    n = len(keys)
    c_start = np.asarray(c_start, dtype=np.int64)
    c_end = np.asarray(c_end, dtype=np.int64)
    n_sent = c_end - c_start
    M = spec.max_num_tokens
    if not spec.nsp:
        la = sent_cs[c_end] - sent_cs[c_start]
        keep = np.minimum(la, M)
        cut = la - keep
        front = binomial_half(cut, keys, S_TRUNC_A, S_TRUNC_A2)
        z = np.zeros(n, dtype=np.int64)
        trunc = np.stack([front, cut - front, z, z], axis=1)
        return Segments(
            a_tok=sent_cs[c_start] + front, la=keep, b_tok=z, lb=z.copy(),
            nsp_label=np.full(n, IGNORE_INDEX, dtype=np.int64), a_doc=np.asarray(c_doc, dtype=np.int64),
            a_sent=np.stack([c_start, c_end], axis=1), b_doc=np.full(n, -1, dtype=np.int64),
            b_sent=np.zeros((n, 2), dtype=np.int64), trunc=trunc,
        )
    n_docs = len(doc_off) - 1
    # Every per-sample number in one hashing pass (the same values as one uniform() per stream).
    h = hash_many(keys, _NSP_STREAMS)
    u_split, u_next, u_partner, u_pstart = to_unit(h[:, :4]).T
    split = np.where(n_sent >= 2, 1 + (u_split * np.maximum(n_sent - 1, 1)).astype(np.int64), 1)
    split = np.minimum(split, np.maximum(n_sent - 1, 1))
    a_end = c_start + split
    can_next = n_sent >= 2
    can_not = n_docs >= 2
    is_next = can_next & ((u_next < c_p_next) | (not can_not))
    la = sent_cs[a_end] - sent_cs[c_start]
    # NotNext partner: a different document of the window, a random start sentence in it.
    c_doc = np.asarray(c_doc, dtype=np.int64)
    if can_not:
        pd = (u_partner * (n_docs - 1)).astype(np.int64)
        pd = np.minimum(pd, n_docs - 2)
        pd = pd + (pd >= c_doc)
    else:
        pd = c_doc.copy()
    pd_s0 = doc_off[pd]
    pd_s1 = doc_off[pd + 1]
    pd_n = pd_s1 - pd_s0
    p_start = pd_s0 + np.minimum((u_pstart * pd_n).astype(np.int64), np.maximum(pd_n - 1, 0))
    target_b = np.maximum(np.asarray(c_target, dtype=np.int64) - la, 1)
    p_end = np.searchsorted(sent_cs, sent_cs[p_start] + target_b, side="left")
    p_end = np.minimum(np.maximum(p_end, p_start + 1), pd_s1)
    has_b = is_next | (can_not & (pd_n > 0))
    b_s0 = np.where(is_next, a_end, np.where(has_b, p_start, a_end))
    b_s1 = np.where(is_next, c_end, np.where(has_b, p_end, a_end))
    lb = sent_cs[b_s1] - sent_cs[b_s0]
    la2, lb2 = truncate_lengths(la, lb, M)
    ra, rb = la - la2, lb - lb2
    fa = binomial_half(ra, keys, S_TRUNC_A, S_TRUNC_A2, h=h[:, 4])
    fb = binomial_half(rb, keys, S_TRUNC_B, S_TRUNC_B2, h=h[:, 5])
    label = np.where(is_next, IS_NEXT, np.where(has_b, NOT_NEXT, IGNORE_INDEX)).astype(np.int64)
    return Segments(
        a_tok=sent_cs[c_start] + fa, la=la2, b_tok=sent_cs[b_s0] + fb, lb=lb2, nsp_label=label,
        a_doc=c_doc, a_sent=np.stack([c_start, a_end], axis=1),
        b_doc=np.where(is_next, c_doc, np.where(has_b, pd, -1)), b_sent=np.stack([b_s0, b_s1], axis=1),
        trunc=np.stack([fa, ra - fa, fb, rb - fb], axis=1),
    )


def p_next_for_chunks(n_sentences_per_chunk: np.ndarray) -> float:
    """IsNext probability for multi-sentence chunks that makes the overall IsNext rate 1/2."""
    n = len(n_sentences_per_chunk)
    multi = int(np.count_nonzero(np.asarray(n_sentences_per_chunk) >= 2))
    return 1.0 if multi == 0 else min(1.0, 0.5 * n / multi)


# --------------------------------------------------------------------------- assembly


def assemble(
    seg: Segments,
    tokens_of: list[np.ndarray],
    tok_base: np.ndarray,
    a_src: np.ndarray,
    b_src: np.ndarray,
    specials: SpecialIds,
    nsp: bool,
    out_ids: np.ndarray,
    out_types: np.ndarray,
    rows: np.ndarray,
) -> np.ndarray:
    """Write ``[CLS] A [SEP] (B [SEP])`` rows into ``out_ids``/``out_types`` at ``rows``.

    ``tokens_of[k]``: token array of source shard ``k``; ``tok_base[k]``: its first window-global
    token index; ``a_src``/``b_src``: source shard of each sample's A/B. Returns the row lengths.
    """
    L = out_ids.shape[1]
    la, lb = seg.la, seg.lb
    length = (3 + la + lb) if nsp else (2 + la)
    if nsp:
        length = np.where(seg.nsp_label == IGNORE_INDEX, 2 + la, length)
    # All rows in order (the usual case): write in place; ``out_ids`` arrives filled with [PAD].
    whole = len(rows) == len(out_ids) and bool((rows == np.arange(len(rows))).all())
    block = out_ids if whole else np.full((len(rows), L), specials.pad, dtype=out_ids.dtype)
    # Token copies: two contiguous slices per sample (faster than fancy indexing, any length).
    a0 = (seg.a_tok - tok_base[a_src]).tolist()
    b0 = (seg.b_tok - tok_base[b_src]).tolist()
    for i, (sa, sb, s_a, s_b, n_a, n_b) in enumerate(
        zip(a_src.tolist(), b_src.tolist(), a0, b0, la.tolist(), lb.tolist())
    ):
        if n_a:
            block[i, 1 : 1 + n_a] = tokens_of[sa][s_a : s_a + n_a]
        if n_b:
            block[i, 2 + n_a : 2 + n_a + n_b] = tokens_of[sb][s_b : s_b + n_b]
    block[:, 0] = specials.cls
    r = np.arange(len(rows))
    block[r, 1 + la] = specials.sep
    has_b = length > 2 + la
    block[r[has_b], (2 + la + lb)[has_b]] = specials.sep
    if not whole:
        out_ids[rows] = block
    if nsp:
        col = np.arange(L, dtype=np.int64)[None, :]
        types = (col >= 2 + la[:, None]) & (col < length[:, None])
        if whole:
            out_types[...] = types
        else:
            out_types[rows] = types
    return length


def assemble_packed(
    seg: Segments,
    tokens_of: list[np.ndarray],
    tok_base: np.ndarray,
    src: np.ndarray,
    specials: SpecialIds,
    out_ids: np.ndarray,
    part_row: np.ndarray,
    part_col: np.ndarray,
) -> None:
    """Write ``[CLS] x [SEP]`` of each chunk of packed rows at column ``part_col`` of row ``part_row``
    (MLM-only segments; ``out_ids`` arrives filled with [PAD]; token types stay 0)."""
    la = seg.la
    a0 = (seg.a_tok - tok_base[src]).tolist()
    for r, c, sa, s_a, n_a in zip(part_row.tolist(), part_col.tolist(), src.tolist(), a0, la.tolist()):
        if n_a:
            out_ids[r, c + 1 : c + 1 + n_a] = tokens_of[sa][s_a : s_a + n_a]
    out_ids[part_row, part_col] = specials.cls
    out_ids[part_row, part_col + 1 + la] = specials.sep
