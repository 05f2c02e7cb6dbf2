"""NSP pair construction and MLM masking: pure, vectorised functions of (seed, epoch, sample id).

Everything random here comes from a counter-based hash (splitmix64 finaliser) of
``(seed, epoch, sample id, purpose, position)``; there is no generator state to carry, so a
sample is the same whatever process, rank, worker or batch builds it, and a whole micro-batch is
processed with a handful of numpy operations (no per-token Python).

The recipe follows Google's ``create_pretraining_data.py`` (BERT paper), made dynamic per epoch:

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
* **Masking** (:func:`mask_batch`): ``round(p * candidates)`` positions per sequence (at least
  one), chosen uniformly among non-special tokens (or among whole words: a ``##`` piece is masked
  with its word); 80% → ``[MASK]``, 10% → a random non-special token, 10% unchanged. Labels hold
  the original id at chosen positions and -100 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

IGNORE_INDEX = -100
IS_NEXT, NOT_NEXT = 0, 1  # Hugging Face convention: 0 = B continues A, 1 = B is random

_U64 = np.uint64
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1

# One stream constant per purpose, so different decisions never share random numbers.
S_TARGET, S_TARGET_LEN, S_SPLIT, S_IS_NEXT, S_PARTNER, S_PARTNER_START = 1, 2, 3, 4, 5, 6
S_TRUNC_A, S_TRUNC_B, S_TRUNC_A2, S_TRUNC_B2 = 7, 8, 9, 10
S_MASK_SCORE, S_MASK_ACTION, S_MASK_RANDOM, S_WORD_SCORE = 11, 12, 13, 14
S_SHARD, S_SAMPLE = 15, 16


# --------------------------------------------------------------------------- counter-based RNG


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finaliser: a bijective uint64 → uint64 hash with full avalanche (elementwise)."""
    x = np.array(x, dtype=_U64)  # a copy: updated in place below
    if x.ndim == 0:  # numpy scalars warn on (intended) wrap-around; arrays do not
        with np.errstate(over="ignore"):
            x = x ^ (x >> _U64(30))
            x = x * _M1
            x = x ^ (x >> _U64(27))
            x = x * _M2
            return np.asarray(x ^ (x >> _U64(31)))
    x ^= x >> _U64(30)
    x *= _M1
    x ^= x >> _U64(27)
    x *= _M2
    x ^= x >> _U64(31)
    return x


def _u64(v: int | np.ndarray) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v.astype(np.int64, copy=False).view(_U64) if v.dtype.kind == "i" else v.astype(_U64, copy=False)
    return np.asarray(int(v) & _MASK64, dtype=_U64)


def derive_key(*parts: int | np.ndarray) -> np.ndarray:
    """Hash a tuple of integers (scalars or broadcastable arrays) into a uint64 key."""
    h = np.asarray(0x6A09E667F3BCC908, dtype=_U64)
    with np.errstate(over="ignore"):
        for p in parts:
            h = mix64(h ^ mix64(_u64(p) + _GOLDEN))
    return h


_PREFIX: dict[tuple[int, int], np.ndarray] = {}


def sample_keys(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """The random key of each sample: a function of (seed, epoch, sample id) only.

    Equal to ``derive_key(seed, epoch, S_SAMPLE, ids)``; the scalar prefix is memoised.
    """
    prefix = _PREFIX.get((seed, epoch))
    if prefix is None:
        if len(_PREFIX) > 64:
            _PREFIX.clear()
        prefix = _PREFIX[(seed, epoch)] = derive_key(seed, epoch, S_SAMPLE)
    with np.errstate(over="ignore"):
        return mix64(prefix ^ mix64(_u64(np.asarray(ids, dtype=np.int64)) + _GOLDEN))


def shard_key(seed: int, epoch: int, shard: int) -> np.ndarray:
    return derive_key(seed, epoch, S_SHARD, shard)


_SALTS: dict[int, np.uint64] = {}


def _salt(stream: int) -> np.uint64:
    s = _SALTS.get(stream)
    if s is None:
        with np.errstate(over="ignore"):
            s = _SALTS[stream] = _U64(mix64(np.asarray(stream, dtype=_U64) * _GOLDEN + _U64(0x632BE59BD9B4E019)))
    return s


def hash_streams(keys: np.ndarray, stream: int, counters: Optional[np.ndarray] = None) -> np.ndarray:
    """uint64 hashes of (key, stream) or, with ``counters`` (broadcast against ``keys``), (key, stream, counter)."""
    salt = _salt(stream)
    if counters is None:
        return mix64(keys ^ salt)
    c = _u64(np.asarray(counters))
    if c.ndim == 0:
        with np.errstate(over="ignore"):
            c = mix64(c * _GOLDEN + salt)
    else:
        c = c * _GOLDEN
        c += salt
        c = mix64(c)
    return mix64(keys ^ c)


def to_unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes → float64 uniforms in [0, 1)."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def uniform(keys: np.ndarray, stream: int, counters: Optional[np.ndarray] = None) -> np.ndarray:
    return to_unit(hash_streams(keys, stream, counters))


try:  # numpy >= 2.0
    _bitcount = np.bitwise_count

    def popcount64(x: np.ndarray) -> np.ndarray:
        return _bitcount(x).astype(np.int64)

except AttributeError:  # pragma: no cover - numpy 1.x
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

    def popcount64(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=_U64)
        return _POP8[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1)


def binomial_half(n: np.ndarray, keys: np.ndarray, stream: int, stream2: int) -> np.ndarray:
    """Binomial(n, 1/2) per element: exact (popcount of n random bits) for n <= 64, normal beyond."""
    n = np.asarray(n, dtype=np.int64)
    out = np.zeros(n.shape, dtype=np.int64)
    if not n.any():
        return out
    h = hash_streams(keys, stream)
    small = n <= 64
    shift = np.minimum(n, 63).astype(_U64)
    bits = np.where(n >= 64, _U64(_MASK64), (_U64(1) << shift) - _U64(1))
    out = np.where(small, popcount64(h & bits), 0)
    if not small.all():
        u1 = np.maximum(to_unit(h), 1e-300)
        u2 = uniform(keys, stream2)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        approx = np.clip(np.rint(n / 2.0 + 0.5 * np.sqrt(n) * z), 0, n).astype(np.int64)
        out = np.where(small, out, approx)
    return out


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    unk: int = -1

    @classmethod
    def from_manifest(cls, special_tokens: dict) -> SpecialIds:
        def get(*names: str, default: Optional[int] = None) -> int:
            for n in names:
                for key in (n, f"[{n.upper()}]", n.upper()):
                    if key in special_tokens:
                        return int(special_tokens[key])
            if default is None:
                raise KeyError(f"special token '{names[0]}' missing from manifest (has: {sorted(special_tokens)})")
            return default

        return cls(pad=get("pad"), cls=get("cls"), sep=get("sep"), mask=get("mask"), unk=get("unk", default=-1))

    def all(self) -> list[int]:
        return [i for i in (self.pad, self.cls, self.sep, self.mask, self.unk) if i >= 0]


@dataclass(frozen=True)
class SampleSpec:
    """What defines a sample (everything except the corpus and the randomness keys)."""

    max_seq_len: int = 128
    nsp: bool = True
    short_seq_prob: float = 0.1
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    max_predictions_per_seq: int = 0  # 0 = no cap

    def __post_init__(self) -> None:
        if self.max_seq_len < (5 if self.nsp else 3):
            raise ValueError(f"max_seq_len {self.max_seq_len} too small")
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability {self.mlm_probability} not in [0, 1]")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0 or (
            self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9
        ):
            raise ValueError("mask_replace_prob + random_replace_prob must be in [0, 1]")

    @property
    def max_num_tokens(self) -> int:
        """Content tokens per sample (without [CLS]/[SEP])."""
        return self.max_seq_len - (3 if self.nsp else 2)

    @classmethod
    def from_config(cls, cfg) -> SampleSpec:
        return cls(
            max_seq_len=cfg.max_seq_len,
            nsp=cfg.nsp,
            short_seq_prob=cfg.short_seq_prob,
            mlm_probability=cfg.mlm_probability,
            mask_replace_prob=cfg.mask_replace_prob,
            random_replace_prob=cfg.random_replace_prob,
            whole_word_mask=cfg.whole_word_mask,
            max_predictions_per_seq=getattr(cfg, "max_predictions_per_seq", 0),
        )

    def chunk_params(self) -> tuple:
        """The parameters that decide the chunking (hence the sample count) of an epoch."""
        return (self.max_num_tokens, round(self.short_seq_prob, 9))


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
    split = np.where(n_sent >= 2, 1 + (uniform(keys, S_SPLIT) * np.maximum(n_sent - 1, 1)).astype(np.int64), 1)
    split = np.minimum(split, np.maximum(n_sent - 1, 1))
    a_end = c_start + split
    can_next = n_sent >= 2
    can_not = n_docs >= 2
    is_next = can_next & ((uniform(keys, S_IS_NEXT) < c_p_next) | (not can_not))
    la = sent_cs[a_end] - sent_cs[c_start]
    # NotNext partner: a different document of the window, a random start sentence in it.
    c_doc = np.asarray(c_doc, dtype=np.int64)
    if can_not:
        pd = (uniform(keys, S_PARTNER) * (n_docs - 1)).astype(np.int64)
        pd = np.minimum(pd, n_docs - 2)
        pd = pd + (pd >= c_doc)
    else:
        pd = c_doc.copy()
    pd_s0 = doc_off[pd]
    pd_s1 = doc_off[pd + 1]
    pd_n = pd_s1 - pd_s0
    p_start = pd_s0 + np.minimum((uniform(keys, S_PARTNER_START) * pd_n).astype(np.int64), np.maximum(pd_n - 1, 0))
    target_b = np.maximum(np.asarray(c_target, dtype=np.int64) - la, 1)
    p_end = np.searchsorted(sent_cs, sent_cs[p_start] + target_b, side="left")
    p_end = np.minimum(np.maximum(p_end, p_start + 1), pd_s1)
    has_b = is_next | (can_not & (pd_n > 0))
    b_s0 = np.where(is_next, a_end, np.where(has_b, p_start, a_end))
    b_s1 = np.where(is_next, c_end, np.where(has_b, p_end, a_end))
    lb = sent_cs[b_s1] - sent_cs[b_s0]
    la2, lb2 = truncate_lengths(la, lb, M)
    ra, rb = la - la2, lb - lb2
    fa = binomial_half(ra, keys, S_TRUNC_A, S_TRUNC_A2)
    fb = binomial_half(rb, keys, S_TRUNC_B, S_TRUNC_B2)
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
    block = np.full((len(rows), L), specials.pad, dtype=out_ids.dtype)
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
    out_ids[rows] = block
    if nsp:
        col = np.arange(L, dtype=np.int64)[None, :]
        out_types[rows] = ((col >= 2 + la[:, None]) & (col < length[:, None])).astype(out_types.dtype)
    return length


# --------------------------------------------------------------------------- masking


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
    ``is_continuation[v]``: True for WordPiece ``##`` pieces (needed for whole-word masking).
    Randomness depends only on (key, position in the sample), never on the batch or its padding.
    """
    B, L = input_ids.shape
    labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    if B == 0 or L == 0 or spec.mlm_probability <= 0:
        return labels
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
    big = np.int64(1) << np.int64(62)
    if spec.whole_word_mask and is_continuation is not None:
        cont = is_continuation[np.clip(input_ids, 0, len(is_continuation) - 1)] & cand
        prev_cand = np.zeros_like(cand)
        prev_cand[:, 1:] = cand[:, :-1]
        start = cand & ~(cont & prev_cand)
        word = np.cumsum(start, axis=1) - 1
        score = np.where(cand, (hash_streams(keys2, S_WORD_SCORE, word) >> _U64(2)).astype(np.int64), big)
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
        score = np.where(cand, (hash_streams(keys2, S_MASK_SCORE, pos[None, :]) >> _U64(2)).astype(np.int64), big)
        order = np.argsort(score, axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(pos, (B, L)), axis=1)
        selected = (rank < k[:, None]) & cand
    rows, cols = np.nonzero(selected)
    labels[rows, cols] = input_ids[rows, cols]
    act = uniform(keys[rows], S_MASK_ACTION, cols)
    to_mask = act < spec.mask_replace_prob
    to_rand = (~to_mask) & (act < spec.mask_replace_prob + spec.random_replace_prob)
    input_ids[rows[to_mask], cols[to_mask]] = specials.mask
    if to_rand.any() and len(random_ids):
        rr, rc = rows[to_rand], cols[to_rand]
        pick = (uniform(keys[rr], S_MASK_RANDOM, rc) * len(random_ids)).astype(np.int64)
        input_ids[rr, rc] = random_ids[np.minimum(pick, len(random_ids) - 1)]
    return labels


def random_token_ids(vocab_size: int, specials: SpecialIds, extra_special: Optional[list[int]] = None) -> np.ndarray:
    """The ids a random replacement may draw: the vocabulary minus special tokens."""
    ok = np.ones(vocab_size, dtype=bool)
    for t in specials.all() + list(extra_special or []):
        if 0 <= t < vocab_size:
            ok[t] = False
    return np.nonzero(ok)[0].astype(np.int64)


def continuation_flags(vocab: list[str], vocab_size: int) -> np.ndarray:
    """``flags[id]`` = token ``id`` is a WordPiece continuation piece (``##...``)."""
    flags = np.zeros(max(vocab_size, len(vocab)), dtype=bool)
    for i, tok in enumerate(vocab):
        if tok is not None and tok.startswith("##") and len(tok) > 2:
            flags[i] = True
    return flags
