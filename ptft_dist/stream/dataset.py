"""The streaming dataset: global sample order, rank/worker slicing, O(1) resume, validation stream.

**Sample space.** In epoch ``e`` every shard is cut into chunks (``samples.chunk_sentences``,
a function of (seed, e, shard) and the shard's sentence lengths, which come from the index part
of the shard only). One chunk is one sample; its **sample id** is its position in the
concatenation of all shards' chunks in manifest order. ``N(e)`` = number of samples.

**Global order (streaming shuffle).** The shard order is permuted by (seed, e); consecutive
groups of ``shuffle_window_shards`` shards form windows; the samples of a window are permuted by
(seed, e, window). Position ``p`` in ``[0, N)`` of the epoch ↦ window ↦ sample id. A process
therefore needs one window of shards at a time (two at a window boundary) and prefetches the
next shards in the background.

**Distribution.** With world size ``W``, rank ``r`` receives positions ``c + r, c + r + W,
c + r + 2W, ...`` (``c`` = samples already consumed in the epoch), ``micro_batch`` of them per
step: micro-step ``k`` is the ``k``-th group of ``micro_batch * W`` consecutive positions, and
rank ``r`` takes every ``W``-th of them. The sequence of positions a rank sees therefore does not
depend on the micro-batch size, the global order does not depend on ``W``, and every rank takes
``ceil((N - c) / (micro_batch * W))`` steps. In the last group of an epoch the remaining
positions are spread round-robin over the ranks (batch sizes differ by at most one); a rank left
with none gets one **padding sample**: ``sample_ids == -1``, ``[CLS] [SEP]``, all ``labels`` and
``next_sentence_label`` -100, so it adds no loss term (normalise the loss by the number of
predicted tokens, not by the batch size). Loader worker ``w`` of ``n`` builds micro-steps
``w, w+n, ...``; PyTorch's round-robin over workers yields them in step order, so batches are
identical for any worker count.

**Randomness.** Every random choice (chunk targets, NSP split and pairing, truncation, masking) is
a hash of (seed, epoch, sample id or shard, purpose, position): a sample is a pure function of
(corpus, seed, epoch, sample id), whatever the machine, world size or worker count.

**Resume.** The state is ``{epoch, consumed, seed}`` plus fingerprints; loading it positions the
next iteration at sample ``consumed`` of ``epoch`` directly (plan lookup, no replay). With the
same ``micro_batch * W`` (e.g. 2 ranks × 6 → 3 ranks × 4) the remaining global sequence and its
grouping into steps are unchanged (elastic resume); any other split still continues at the same
global position.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ptft_dist.config import DataConfig
from ptft_dist.corpus.format import (
    FORMAT_VERSION,
    TOKENIZER_DIR,
    CorpusError,
    Manifest,
    ShardData,
    load_manifest,
    tokenizer_hash,
)
from ptft_dist.stream import samples as S
from ptft_dist.stream.shard_cache import ShardCache, file_lock

try:
    import torch
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover - torch is a dependency, but keep numpy use possible
    torch = None  # type: ignore[assignment]
    IterableDataset = object  # type: ignore[assignment,misc]

STATE_VERSION = 1
VALIDATION_SEED = 20181011  # the validation stream does not depend on the training seed
_ORDER_TAG = 0x5EED0 + 1
_WINDOW_TAG = 0x5EED0 + 2
# A micro-batch (torch tensors; B samples, L = longest sample, rounded up to pad_to_multiple_of):
#   input_ids, token_type_ids, attention_mask, labels   int64 [B, L]   labels: original id where
#                                                        predicted, -100 elsewhere (incl. padding)
#   next_sentence_label  int64 [B]    0 IsNext, 1 NotNext, -100 (MLM-only mode, padding sample)
#   sample_ids           int64 [B]    stable id within the epoch; -1 = padding sample
#   cu_seqlens           int32 [B+1]  packed form: cumulative lengths of the unpadded sequences
#   indices              int64 [T]    packed form: flat positions (into B*L) of the T real tokens
#   max_seqlen           int          longest unpadded sequence
BATCH_KEYS = (
    "input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label", "sample_ids",
    "cu_seqlens", "indices", "max_seqlen",
)


# --------------------------------------------------------------------------- corpus helpers


def corpus_fingerprint(manifest: Manifest, split: str) -> str:
    """Identity of the token stream of a split: tokenizer + every shard's checksum."""
    blob = json.dumps([manifest.tokenizer_hash, split, [s.sha256 for s in manifest.shards(split)]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_vocab(corpus: str, storage_options: Optional[dict] = None) -> list[str]:
    """Token strings by id from CORPUS/tokenizer (vocab.txt, else tokenizer.json), local or remote."""
    import fsspec

    base = f"{str(corpus).rstrip('/')}/{TOKENIZER_DIR}"
    try:
        with fsspec.open(f"{base}/vocab.txt", "rt", encoding="utf-8", **(storage_options or {})) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        pass
    try:
        with fsspec.open(f"{base}/tokenizer.json", "rt", encoding="utf-8", **(storage_options or {})) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"{base}: no vocab.txt or tokenizer.json") from None
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        raise CorpusError(f"{base}/tokenizer.json: not a WordPiece vocabulary")
    out: list[str] = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        out[i] = tok
    for t in data.get("added_tokens", []):
        if t["id"] >= len(out):
            out.extend([""] * (t["id"] + 1 - len(out)))
        out[t["id"]] = t["content"]
    return out


def _load_manifest(corpus: str, storage_options: Optional[dict]) -> Manifest:
    """``shards.load_manifest``, plus fsspec storage options (credentials, endpoints) when given."""
    if not storage_options:
        return load_manifest(corpus)
    import fsspec

    url = f"{corpus}/manifest.json"
    try:
        with fsspec.open(url, "rt", **storage_options) as f:
            raw = json.load(f)
        manifest = Manifest(**raw)
    except FileNotFoundError:
        raise CorpusError(f"{corpus}: not a corpus (no manifest.json; did `ptft prepare` finish?)") from None
    except (ValueError, TypeError) as exc:
        raise CorpusError(f"{url}: malformed manifest: {exc}") from None
    except Exception as exc:  # remote errors come in many classes
        raise CorpusError(f"{url}: cannot read manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise CorpusError(f"{url}: corpus format {manifest.format_version}, this ptft reads {FORMAT_VERSION}")
    return manifest


def check_tokenizer(manifest: Manifest, expected: Optional[str], corpus: str) -> None:
    """Refuse a corpus whose tokenizer differs from the one the run expects (hash or tokenizer dir)."""
    if not expected:
        return
    want = expected
    if os.path.isdir(expected):
        want = tokenizer_hash(expected)
    if want != manifest.tokenizer_hash:
        raise CorpusError(
            f"{corpus}: corpus was tokenized with tokenizer {manifest.tokenizer_hash}, but this run expects "
            f"tokenizer {want}{f' ({expected})' if want != expected else ''}; re-run `ptft prepare` with the run's "
            "tokenizer or point the run at a matching corpus"
        )


# --------------------------------------------------------------------------- plan


@dataclass
class EpochPlan:
    epoch: int
    counts: np.ndarray  # samples per shard, manifest order
    id_base: np.ndarray  # first sample id of each shard (len n_shards + 1)
    order: np.ndarray  # shard indices in this epoch's order
    windows: list[np.ndarray]  # shard indices of each window
    window_start: np.ndarray  # first position of each window (len n_windows + 1)

    @property
    def total(self) -> int:
        return int(self.id_base[-1])

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.window_start, positions, side="right") - 1


class _Window:
    """The shards of one shuffle window, their chunks, and the in-window permutation."""

    def __init__(self, w: int, shard_idx: list[int], datas: list[ShardData], chunks: list[tuple], id_base: np.ndarray,
                 perm_seed: list[int]):
        self.w = w
        self.shards = shard_idx
        self.tokens = [d.tokens for d in datas]
        self.doc_ids = [d.doc_ids for d in datas]
        tok_n = np.array([d.num_tokens for d in datas], dtype=np.int64)
        sent_n = np.array([d.num_sentences for d in datas], dtype=np.int64)
        doc_n = np.array([d.num_docs for d in datas], dtype=np.int64)
        self.tok_base = np.concatenate([[0], np.cumsum(tok_n)])
        self.sent_base = np.concatenate([[0], np.cumsum(sent_n)])
        self.doc_base = np.concatenate([[0], np.cumsum(doc_n)])
        self.sent_cs = np.concatenate(
            [d.sentence_offsets[:-1].astype(np.int64) + self.tok_base[i] for i, d in enumerate(datas)]
            + [self.tok_base[-1:]]
        )
        self.doc_off = np.concatenate(
            [d.doc_offsets[:-1].astype(np.int64) + self.sent_base[i] for i, d in enumerate(datas)]
            + [self.sent_base[-1:]]
        )
        st, en, tg, dc, pn, ids = [], [], [], [], [], []
        for i, (d, (s0, s1, t)) in enumerate(zip(datas, chunks)):
            st.append(s0 + self.sent_base[i])
            en.append(s1 + self.sent_base[i])
            tg.append(t)
            dc.append(np.searchsorted(d.doc_offsets.astype(np.int64), s0, side="right") - 1 + self.doc_base[i])
            pn.append(np.full(len(s0), S.p_next_for_chunks(s1 - s0)))
            ids.append(id_base[shard_idx[i]] + np.arange(len(s0), dtype=np.int64))
        cat = (lambda xs, dt=np.int64: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
        self.c_start, self.c_end, self.c_target, self.c_doc = cat(st), cat(en), cat(tg), cat(dc)
        self.c_pnext, self.c_id = cat(pn, np.float64), cat(ids)
        self.n = len(self.c_id)
        self.perm = np.random.default_rng(perm_seed).permutation(self.n) if self.n else np.zeros(0, np.int64)

    def shard_of_sentence(self, s: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.sent_base, s, side="right") - 1

    def shard_of_doc(self, d: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_base, d, side="right") - 1


# --------------------------------------------------------------------------- dataset


class PretrainingStream(IterableDataset):
    """Micro-batches of NSP/MLM (or MLM-only) pretraining samples for one rank.

    Iterating yields the rank's micro-batches from the current position (``epoch``,
    ``consumed``) to the end of that epoch, as dicts of torch tensors (see :data:`BATCH_KEYS`).
    Use :class:`StreamingLoader` for loader workers and checkpointable state.
    """

    def __init__(
        self,
        corpus: Optional[str] = None,
        cfg: Optional[DataConfig] = None,
        *,
        micro_batch_size: int = 32,
        world_size: int = 1,
        rank: int = 0,
        split: str = "train",
        fixed_epoch: Optional[int] = None,
        max_samples: Optional[int] = None,
        expected_tokenizer: Optional[str] = None,
        cache: Optional[ShardCache] = None,
        seed: Optional[int] = None,
    ):
        cfg = cfg or DataConfig()
        self.cfg = cfg
        self.corpus = str(corpus or cfg.corpus).rstrip("/")
        if not self.corpus:
            raise CorpusError("no corpus given (set data.corpus)")
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad micro_batch_size/world_size/rank: {micro_batch_size}/{world_size}/{rank}")
        self.micro_batch_size = int(micro_batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.split = split
        self.fixed_epoch = fixed_epoch
        self.max_samples = max_samples if max_samples and max_samples > 0 else None
        self.seed = int(cfg.seed if seed is None else seed)
        self.spec = S.SampleSpec.from_config(cfg)
        self.window_shards = max(1, int(cfg.shuffle_window_shards))
        self.manifest = _load_manifest(self.corpus, cfg.storage_options)
        check_tokenizer(self.manifest, expected_tokenizer or cfg.expected_tokenizer, self.corpus)
        self.shards = self.manifest.shards(split)
        self.fingerprint = corpus_fingerprint(self.manifest, split)
        self.sample_fingerprint = hashlib.sha256(
            json.dumps([self.spec.__dict__, self.window_shards, split, self.max_samples], sort_keys=True).encode()
        ).hexdigest()[:16]
        self.specials = S.SpecialIds.from_manifest(self.manifest.special_tokens)
        self.random_ids = S.random_token_ids(self.manifest.vocab_size, self.specials)
        self.is_continuation: Optional[np.ndarray] = None
        if self.spec.whole_word_mask:
            vocab = load_vocab(self.corpus, cfg.storage_options)
            self.is_continuation = S.continuation_flags(vocab, self.manifest.vocab_size)
        self.cache = cache or ShardCache(
            self.corpus,
            cache_dir=cfg.cache_dir,
            limit_bytes=int(cfg.cache_limit_gb * (1 << 30)),
            retries=cfg.fetch_retries,
            backoff_s=cfg.fetch_backoff_s,
            verify=cfg.verify_checksums,
            storage_options=cfg.storage_options,
        )
        self.epoch = 0 if fixed_epoch is None else fixed_epoch
        self.consumed = 0
        self._plans: dict[int, EpochPlan] = {}
        self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ pickling (spawned workers)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_windows"] = OrderedDict()
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plan

    def plan(self, epoch: int) -> EpochPlan:
        """Sample counts, shard order and windows of an epoch (cached in memory and on disk)."""
        p = self._plans.get(epoch)
        if p is not None:
            return p
        counts = self._counts(epoch)
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch, _ORDER_TAG]).permutation(n) if n else np.zeros(0, np.int64)
        windows = [order[i : i + self.window_shards] for i in range(0, n, self.window_shards)]
        sizes = np.array([counts[w].sum() for w in windows], dtype=np.int64)
        p = EpochPlan(
            epoch=epoch,
            counts=counts,
            id_base=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            order=order,
            windows=windows,
            window_start=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        )
        if len(self._plans) > 4:
            self._plans.pop(next(iter(self._plans)))
        self._plans[epoch] = p
        return p

    def _chunk_key(self, epoch: int) -> str:
        blob = json.dumps([self.fingerprint, self.seed, epoch, list(self.spec.chunk_params())])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _chunks(self, epoch: int, i: int, data: ShardData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return S.chunk_sentences(
            data.sentence_offsets, data.doc_offsets, S.shard_key(self.seed, epoch, i),
            self.spec.max_num_tokens, self.spec.short_seq_prob,
        )

    def _counts(self, epoch: int) -> np.ndarray:
        key = self._chunk_key(epoch)
        path = Path(self.cache.cache_dir) / "plans" / f"{key}.npy"
        try:
            return np.load(path)
        except (FileNotFoundError, ValueError, OSError):
            pass
        # One process per node computes; the others wait on the lock and read its result.
        try:
            with file_lock(path.with_suffix(".lock")):
                try:
                    return np.load(path)
                except (FileNotFoundError, ValueError, OSError):
                    pass
                counts = self._compute_counts(epoch)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, counts)
                os.replace(tmp, path)
                return counts
        except PermissionError:  # read-only cache dir: plan in memory only
            return self._compute_counts(epoch)

    def _compute_counts(self, epoch: int) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> int:
            return len(self._chunks(epoch, i, self.cache.read_index(self.shards[i]))[0])

        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        with ThreadPoolExecutor(min(8, len(self.shards))) as ex:
            return np.fromiter(ex.map(one, range(len(self.shards))), dtype=np.int64, count=len(self.shards))

    def num_samples(self, epoch: Optional[int] = None) -> int:
        """Samples delivered in an epoch (across all ranks)."""
        total = self.plan(self._epoch(epoch)).total
        return min(total, self.max_samples) if self.max_samples else total

    def _epoch(self, epoch: Optional[int]) -> int:
        if self.fixed_epoch is not None:
            return self.fixed_epoch
        return self.epoch if epoch is None else epoch

    # ------------------------------------------------------------------ positions

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def steps_in_epoch(self, epoch: Optional[int] = None, consumed: Optional[int] = None) -> int:
        """Micro-steps every rank takes from ``consumed`` to the end of the epoch."""
        n = self.num_samples(epoch)
        c = self.consumed if consumed is None else consumed
        return max(0, -(-(n - c) // self.global_micro_batch))

    def rank_positions(self, step: int, consumed: int, n: int) -> np.ndarray:
        """Epoch positions of this rank's micro-step ``step`` counted from ``consumed``."""
        j = np.arange(self.micro_batch_size, dtype=np.int64)
        pos = consumed + step * self.global_micro_batch + self.rank + self.world_size * j
        return pos[pos < n]

    # ------------------------------------------------------------------ windows

    def _window(self, epoch: int, w: int) -> _Window:
        key = (epoch, w)
        with self._lock:
            win = self._windows.get(key)
            if win is not None:
                self._windows.move_to_end(key)
                return win
        plan = self.plan(epoch)
        idx = [int(i) for i in plan.windows[w]]
        datas = self.cache.open_many([self.shards[i] for i in idx])
        chunks = []
        for i, d in zip(idx, datas):
            c = self._chunks(epoch, i, d)
            if len(c[0]) != plan.counts[i]:
                raise CorpusError(f"{self.cache.url(self.shards[i])}: index changed since the epoch was planned")
            chunks.append(c)
        win = _Window(w, idx, datas, chunks, plan.id_base, [self.seed, epoch, w, _WINDOW_TAG])
        with self._lock:
            self._windows[key] = win
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        self._prefetch_after(epoch, w)
        return win

    def _prefetch_after(self, epoch: int, w: int) -> None:
        n = max(0, int(self.cfg.prefetch_shards))
        if n == 0:
            return
        plan = self.plan(epoch)
        upcoming = [int(i) for win in plan.windows[w + 1 :] for i in win][:n]
        if len(upcoming) < n and self.fixed_epoch is None:
            nxt = np.random.default_rng([self.seed, epoch + 1, _ORDER_TAG]).permutation(len(self.shards))
            upcoming += [int(i) for i in nxt[: n - len(upcoming)]]
        self.cache.prefetch([self.shards[i] for i in upcoming])

    # ------------------------------------------------------------------ samples

    def _segments(self, epoch: int, positions: np.ndarray) -> list[tuple]:
        """Group positions by window; per group: (window, rows, chunk indices, segments, sample keys)."""
        plan = self.plan(epoch)
        wins = plan.window_of(positions)
        out = []
        for w in np.unique(wins).tolist():
            rows = np.nonzero(wins == w)[0]
            win = self._window(epoch, w)
            c = win.perm[positions[rows] - plan.window_start[w]]
            keys = S.sample_keys(self.seed, epoch, win.c_id[c])
            seg = S.nsp_segments(
                keys, win.c_start[c], win.c_end[c], win.c_target[c], win.c_doc[c], win.c_pnext[c],
                win.sent_cs, win.doc_off, self.spec,
            )
            out.append((win, rows, c, seg, keys))
        return out

    def batch_at(self, epoch: int, positions: np.ndarray, pad_if_empty: bool = True) -> dict[str, Any]:
        """The micro-batch made of the samples at these epoch positions (numpy arrays).

        A pure function of (corpus, seed, epoch, positions). An empty ``positions`` gives one
        padding sample (``sample_ids == -1``) when ``pad_if_empty``.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n = self.num_samples(epoch)
        if len(positions) and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"positions outside epoch {epoch} (0..{n - 1})")
        groups = self._segments(epoch, positions) if len(positions) else []
        B = len(positions) if len(positions) or not pad_if_empty else 1
        lengths = np.full(B, 2, dtype=np.int64)
        for _, rows, _, seg, _ in groups:
            lb_part = np.where(seg.nsp_label == S.IGNORE_INDEX, 0, 1 + seg.lb) if self.spec.nsp else 0
            lengths[rows] = 2 + seg.la + lb_part
        L = int(lengths.max()) if B else 0
        m = max(1, int(self.cfg.pad_to_multiple_of))
        L = -(-L // m) * m
        ids = np.full((B, L), self.specials.pad, dtype=np.int64)
        types = np.zeros((B, L), dtype=np.int64)
        sample_ids = np.full(B, -1, dtype=np.int64)
        nsp = np.full(B, S.IGNORE_INDEX, dtype=np.int64)
        keys = np.zeros(B, dtype=np.uint64)
        if B and not groups:  # padding sample
            ids[:, 0] = self.specials.cls
            ids[:, 1] = self.specials.sep
        for win, rows, c, seg, k in groups:
            tok_src_a = win.shard_of_sentence(seg.a_sent[:, 0])
            tok_src_b = np.where(seg.lb > 0, win.shard_of_sentence(np.minimum(seg.b_sent[:, 0], len(win.sent_cs) - 2)),
                                 0)
            S.assemble(seg, win.tokens, win.tok_base, tok_src_a, tok_src_b, self.specials, self.spec.nsp, ids, types,
                       rows)
            sample_ids[rows] = win.c_id[c]
            nsp[rows] = seg.nsp_label
            keys[rows] = k
        attention = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)
        cand = attention.astype(bool) & (sample_ids >= 0)[:, None]
        for t in self.specials.all():
            cand &= ids != t
        labels = S.mask_batch(ids, lengths, keys, self.spec, self.specials, self.random_ids, self.is_continuation,
                              candidates=cand)
        cu = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        return {
            "input_ids": ids,
            "token_type_ids": types,
            "attention_mask": attention,
            "labels": labels,
            "next_sentence_label": nsp,
            "sample_ids": sample_ids,
            "cu_seqlens": cu,
            "indices": np.flatnonzero(attention).astype(np.int64),
            "max_seqlen": int(lengths.max()) if B else 0,
        }

    def describe(self, epoch: int, positions: np.ndarray) -> list[dict]:
        """Provenance of the samples at these positions.

        Per sample: position, sample_id, nsp_label, a_shard/b_shard (manifest index of the split),
        a_doc/b_doc (document index in that shard), a_doc_id/b_doc_id (the shard's stable doc id),
        a_sentences/b_sentences ([start, end) sentence numbers within the document, before
        truncation) and truncated = tokens removed (A front, A back, B front, B back).
        """
        positions = np.asarray(positions, dtype=np.int64)
        out: list[dict] = [{} for _ in positions]
        for win, rows, c, seg, _ in self._segments(epoch, positions):
            for j, row in enumerate(rows.tolist()):
                a_sh = int(win.shard_of_doc(seg.a_doc[j]))
                a_docl = int(seg.a_doc[j] - win.doc_base[a_sh])
                a_first = int(win.doc_off[seg.a_doc[j]])  # sentence indices are counted within the document
                rec = {
                    "position": int(positions[row]),
                    "sample_id": int(win.c_id[c[j]]),
                    "nsp_label": int(seg.nsp_label[j]),
                    "a_shard": win.shards[a_sh],
                    "a_doc": a_docl,
                    "a_doc_id": int(win.doc_ids[a_sh][a_docl]),
                    "a_sentences": (int(seg.a_sent[j, 0] - a_first), int(seg.a_sent[j, 1] - a_first)),
                    "b_shard": None, "b_doc": None, "b_doc_id": None, "b_sentences": None,
                    "truncated": tuple(int(x) for x in seg.trunc[j]),
                }
                if seg.b_doc[j] >= 0 and seg.b_sent[j, 1] > seg.b_sent[j, 0]:
                    b_sh = int(win.shard_of_doc(seg.b_doc[j]))
                    b_docl = int(seg.b_doc[j] - win.doc_base[b_sh])
                    b_first = int(win.doc_off[seg.b_doc[j]])
                    rec.update(
                        b_shard=win.shards[b_sh], b_doc=b_docl, b_doc_id=int(win.doc_ids[b_sh][b_docl]),
                        b_sentences=(int(seg.b_sent[j, 0] - b_first), int(seg.b_sent[j, 1] - b_first)),
                    )
                out[row] = rec
        return out

    # ------------------------------------------------------------------ iteration

    def set_position(self, epoch: int, consumed: int) -> None:
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        n = self.num_samples(epoch)
        if consumed >= n and self.fixed_epoch is None:
            epoch, consumed = epoch + 1, 0
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.epoch, self.consumed = int(epoch), int(consumed)

    def iter_numpy(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches (numpy) from the current position to the epoch end, worker slice."""
        epoch, consumed = self._epoch(None), self.consumed
        n = self.num_samples(epoch)
        steps = self.steps_in_epoch(epoch, consumed)
        for k in range(worker_id, steps, num_workers):
            yield self.batch_at(epoch, self.rank_positions(k, consumed, n))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = 0, 1
        info = torch.utils.data.get_worker_info() if torch is not None else None
        if info is not None:
            wid, nw = info.id, info.num_workers
        pack = self.pack_for_workers if info is not None else None
        for batch in self.iter_numpy(wid, nw):
            yield pack_batch(batch, compact=pack == "compact") if pack else to_torch(batch)

    # Set by StreamingLoader: worker processes send each micro-batch packed (see pack_batch);
    # "exact" keeps every field's dtype so that a pinned buffer gives pinned fields.
    pack_for_workers: Optional[str] = None


def to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


_PACKED = "__ptft_packed__"
_TORCH_DTYPES = {"|u1": "uint8", "<u2": "uint16", "<i2": "int16", "<i4": "int32", "<i8": "int64"}


def _wire_dtype(key: str, v: np.ndarray) -> np.dtype:
    """The smallest dtype that holds a field exactly (less shared memory per batch)."""
    if key in ("attention_mask", "token_type_ids"):
        return np.dtype(np.uint8)
    if key in ("input_ids", "labels", "indices") and v.size:
        lo, hi = int(v.min()), int(v.max())
        for dt in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dt)
    return v.dtype


def pack_batch(batch: dict[str, Any], compact: bool = True) -> dict[str, Any]:
    """A batch as one byte tensor plus a layout (:func:`unpack_batch` restores it exactly).

    Worker processes send batches this way: one shared-memory transfer instead of one per field,
    each field in its smallest exact dtype (~10x more batches/s through the DataLoader queue).
    """
    arrays = [(k, v, _wire_dtype(k, v) if compact else v.dtype) for k, v in batch.items() if isinstance(v, np.ndarray)]
    sizes = [-(-(v.size * dt.itemsize) // 8) * 8 for _, v, dt in arrays]
    buf = np.empty(sum(sizes), dtype=np.uint8)
    layout, o = [], 0
    for (k, v, dt), nb in zip(arrays, sizes):
        buf[o : o + v.size * dt.itemsize].view(dt)[:] = v.reshape(-1)
        layout.append((k, dt.str, v.dtype.str, tuple(v.shape), o))
        o += nb
    extras = {k: v for k, v in batch.items() if not isinstance(v, np.ndarray)}
    return {_PACKED: torch.from_numpy(buf), "layout": layout, "extras": extras}


def unpack_batch(item: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`pack_batch` (other items pass through unchanged)."""
    if not (isinstance(item, dict) and _PACKED in item):
        return item
    buf = item[_PACKED]
    out: dict[str, Any] = {}
    for k, wire, final, shape, o in item["layout"]:
        shape = [int(x) for x in shape]
        n = int(np.prod(shape)) if shape else 1
        wdt = getattr(torch, _TORCH_DTYPES.get(wire, "int64"))
        nbytes = n * torch.empty(0, dtype=wdt).element_size()
        t = buf[o : o + nbytes].view(wdt).view(*shape)
        fdt = getattr(torch, _TORCH_DTYPES.get(final, "int64"))
        out[k] = t if wdt == fdt else t.to(fdt)
    out.update(item["extras"])
    return out


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
        epoch, start = ds._epoch(None), ds.consumed
        n = ds.num_samples(epoch)  # plan computed here, before workers fork, so they inherit it
        if n == 0 and not self.fixed:
            raise CorpusError(f"{ds.corpus}: split '{ds.split}' yields no samples in epoch {epoch}")
        steps = ds.steps_in_epoch(epoch, start)
        if self.num_workers > 0 and steps > 0:
            from torch.utils.data import DataLoader

            loader = DataLoader(  # a private generator: never draw from the global RNG a resume restores
                ds, batch_size=None, num_workers=min(self.num_workers, steps), pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(0),
                prefetch_factor=self.prefetch_factor, persistent_workers=False,
                multiprocessing_context=self.multiprocessing_context, timeout=self.timeout,
            )
            ds.pack_for_workers = "exact" if self.pin_memory else "compact"
            try:
                it: Iterator[dict[str, Any]] = iter(loader)
            finally:
                ds.pack_for_workers = None
        else:
            it = iter(ds)
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

    def forever(self) -> Iterator[dict[str, Any]]:
        """Batches across epoch boundaries, without end (the position keeps advancing)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """``{version, epoch, consumed, seed, corpus_fingerprint, sample_fingerprint}``: the same on every rank."""
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "epoch": int(ds.epoch),
            "consumed": int(ds.consumed),
            "seed": int(ds.seed),
            "corpus_fingerprint": ds.fingerprint,
            "sample_fingerprint": ds.sample_fingerprint,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        ds = self.dataset
        if int(state.get("version", 1)) > STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is newer than this ptft ({STATE_VERSION})")
        fp = state.get("corpus_fingerprint")
        if fp and fp != ds.fingerprint:
            msg = (f"{ds.corpus}: the checkpoint's data position refers to corpus {fp}, this run reads corpus "
                   f"{ds.fingerprint} ({ds.split}); resuming would not continue the same sample sequence")
            if strict:
                raise CorpusError(msg)
            warnings.warn(msg, stacklevel=2)
        sfp = state.get("sample_fingerprint")
        if sfp and sfp != ds.sample_fingerprint:
            msg = ("data settings that define the samples (max_seq_len, nsp, short_seq_prob, masking, "
                   "shuffle_window_shards) changed since the checkpoint; the sample sequence will differ")
            if strict:
                raise ValueError(msg + " (pass strict=False to accept)")
            warnings.warn(msg, stacklevel=2)
        if "seed" in state and int(state["seed"]) != ds.seed:
            ds.seed = int(state["seed"])
            ds._plans.clear()
            ds._windows.clear()
        ds.set_position(int(state["epoch"]), int(state["consumed"]))


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
) -> StreamingLoader:
    ds = PretrainingStream(corpus, cfg, micro_batch_size=micro_batch_size, world_size=world_size, rank=rank,
                           split="train", expected_tokenizer=expected_tokenizer)
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
) -> StreamingLoader:
    """The fixed validation stream: the same samples (masking included) on every pass and in every
    run on this corpus, whatever the training seed (:data:`VALIDATION_SEED`), spread over ranks like
    training (equal step counts, padding samples); ``max_samples`` keeps the first N of its order."""
    ds = PretrainingStream(
        corpus, cfg, micro_batch_size=micro_batch_size, world_size=world_size, rank=rank, split="validation",
        fixed_epoch=0, max_samples=max_samples if max_samples is not None else cfg.validation_max_samples,
        expected_tokenizer=expected_tokenizer, seed=VALIDATION_SEED,
    )
    return StreamingLoader(ds, num_workers=num_workers, pin_memory=pin_memory)
