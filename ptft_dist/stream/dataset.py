"""The streaming dataset: global sample order, rank/worker slicing, O(1) resume, validation stream.

Samples are cut and assembled in samples.py and masked in masking.py; one shuffle window is held
in window.py; shards come through shard_cache.py; loader.py runs this stream in DataLoader workers.

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
predicted tokens, not by the batch size). Every sample is delivered exactly once per epoch and
every rank takes the same number of steps (docs/design.md, guarantee 2). :meth:`PretrainingStream.iter_numpy`
slices a rank's micro-steps further over loader workers.

**Randomness.** Every random choice (chunk targets, NSP split and pairing, truncation, masking) is
a hash of (seed, epoch, sample id or shard, purpose, position): a sample is a pure function of
(corpus, seed, epoch, sample id), whatever the machine, world size or worker count
(docs/design.md, guarantee 1; the hashes are in keys.py).

**Resume.** The state is ``{epoch, consumed, seed}`` plus fingerprints; loading it positions the
next iteration at sample ``consumed`` of ``epoch`` directly (plan lookup, no replay:
docs/design.md, guarantee 3). With the same ``micro_batch * W`` (e.g. 2 ranks × 6 → 3 ranks × 4)
the remaining global sequence and its grouping into steps are unchanged (elastic resume,
guarantee 4); any other split still continues at the same global position.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ptft_dist.config import DataConfig
from ptft_dist.corpus.format import CorpusError, Manifest, ShardData, load_manifest
from ptft_dist.corpus.tokenizer import check_tokenizer, load_vocab, word_boundary_rule
from ptft_dist.fsutil import write_bytes_atomic
from ptft_dist.stream.batch import Rows, cut_batch
from ptft_dist.stream.keys import S_PART, hash_streams, sample_keys, shard_key
from ptft_dist.stream.masking import IGNORE_INDEX, continuation_flags, mask_batch, random_token_ids
from ptft_dist.stream.samples import chunk_costs, chunk_sentences, nsp_segments, pack_chunks
from ptft_dist.stream.shard_cache import ShardCache, file_lock
from ptft_dist.stream.spec import SampleSpec, SpecialIds
from ptft_dist.stream.window import ShuffleWindow

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
# A worker builds its next micro-steps together, about this many samples / tokens at once
# (stream/batch.py; measured best at seq 128 and 512 with benchmarks/loader_throughput.py).
_SAMPLES_PER_PASS, _TOKENS_PER_PASS = 256, 65536


def corpus_fingerprint(manifest: Manifest, split: str) -> str:
    """Identity of the token stream of a split: tokenizer + every shard's checksum."""
    blob = json.dumps([manifest.tokenizer_hash, split, [s.sha256 for s in manifest.shards(split)]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


# --------------------------------------------------------------------------- dataset


class PretrainingStream(IterableDataset):
    """Micro-batches of NSP/MLM (or MLM-only) pretraining samples for one rank.

    Iterating yields the rank's micro-batches from the current position (``epoch``,
    ``consumed``) to the end of that epoch, as dicts of torch tensors (see
    ``stream.loader.BATCH_KEYS``). Use ``stream.loader.StreamingLoader`` for loader workers.
    ``manifest``: the corpus manifest when the caller has already loaded it (read once per run).
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
        manifest: Optional[Manifest] = None,
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
        self.spec = SampleSpec.from_config(cfg)
        self.window_shards = max(1, int(cfg.shuffle_window_shards))
        self.manifest = manifest if manifest is not None else load_manifest(self.corpus, cfg.storage_options)
        check_tokenizer(self.manifest, expected_tokenizer or cfg.expected_tokenizer, self.corpus)
        self.shards = self.manifest.shards(split)
        self.fingerprint = corpus_fingerprint(self.manifest, split)
        spec_fields = {k: v for k, v in self.spec.__dict__.items() if k != "pack_samples" or v}  # older runs' fingerprints
        self.sample_fingerprint = hashlib.sha256(
            json.dumps([spec_fields, self.window_shards, split, self.max_samples], sort_keys=True).encode()
        ).hexdigest()[:16]
        self.specials = SpecialIds.from_manifest(self.manifest.special_tokens)
        self.random_ids = random_token_ids(self.manifest.vocab_size, self.specials)
        # is_special[id]; one extra False entry that every id beyond the table maps to (take, clip)
        self.is_special = np.zeros(max([self.manifest.vocab_size, *self.specials.all()]) + 2, dtype=bool)
        self.is_special[self.specials.all()] = True
        self.is_continuation: Optional[np.ndarray] = None
        if self.spec.whole_word_mask:
            rule = word_boundary_rule(self.corpus, cfg.storage_options)
            if rule is None:
                raise CorpusError(f"data.whole_word_mask=true: the tokenizer of {self.corpus} marks neither word "
                                  "starts (Ġ, ▁) nor continuations (##); whole words cannot be found: set "
                                  "data.whole_word_mask=false")
            vocab = load_vocab(self.corpus, cfg.storage_options)
            self.is_continuation = continuation_flags(vocab, self.manifest.vocab_size, *rule)
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
        self._windows: OrderedDict[tuple[int, int], ShuffleWindow] = OrderedDict()
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

    # ------------------------------------------------------------------ resume state

    def state_dict(self) -> dict:
        """``{version, epoch, consumed, seed, corpus_fingerprint, sample_fingerprint}``: the same on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": int(self.epoch),
            "consumed": int(self.consumed),
            "seed": int(self.seed),
            "corpus_fingerprint": self.fingerprint,
            "sample_fingerprint": self.sample_fingerprint,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue right after the sample ``state`` was taken at (plan lookup, no replay:
        docs/design.md, guarantee 3); refuse (or, not ``strict``, warn about) a different corpus
        or different sample settings, which would not continue the same sequence."""
        if int(state.get("version", 1)) > STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is newer than this ptft ({STATE_VERSION})")
        fp = state.get("corpus_fingerprint")
        if fp and fp != self.fingerprint:
            msg = (f"{self.corpus}: the checkpoint's data position refers to corpus {fp}, this run reads corpus "
                   f"{self.fingerprint} ({self.split}); resuming would not continue the same sample sequence")
            if strict:
                raise CorpusError(msg)
            warnings.warn(msg, stacklevel=3)
        sfp = state.get("sample_fingerprint")
        if sfp and sfp != self.sample_fingerprint:
            msg = ("data settings that define the samples (max_seq_len, nsp, short_seq_prob, masking, "
                   "shuffle_window_shards) changed since the checkpoint; the sample sequence will differ")
            if strict:
                raise ValueError(msg + " (pass strict=False to accept)")
            warnings.warn(msg, stacklevel=3)
        if "seed" in state and int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._plans.clear()
            self._windows.clear()
        self.set_position(int(state["epoch"]), int(state["consumed"]))

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

    def _chunks(self, epoch: int, i: int, data: ShardData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A shard's chunks (start sentence, end sentence, target) and its samples as row offsets
        into them: one chunk per sample, or with ``pack_samples`` consecutive chunks per row."""
        start, end, target = chunk_sentences(
            data.sentence_offsets, data.doc_offsets, shard_key(self.seed, epoch, i),
            self.spec.max_num_tokens, self.spec.short_seq_prob,
        )
        if not self.spec.pack_samples:
            return start, end, target, np.arange(len(start) + 1, dtype=np.int64)
        costs = chunk_costs(data.sentence_offsets, start, end, self.spec.max_num_tokens)
        return start, end, target, pack_chunks(costs, self.spec.max_seq_len)

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
                buf = io.BytesIO()
                np.save(buf, counts)
                write_bytes_atomic(path, buf.getvalue())
                return counts
        except PermissionError:  # read-only cache dir: plan in memory only
            return self._compute_counts(epoch)

    def _compute_counts(self, epoch: int) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        def one(i: int) -> int:
            return len(self._chunks(epoch, i, self.cache.read_index(self.shards[i]))[3]) - 1

        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        with ThreadPoolExecutor(min(8, len(self.shards))) as ex:
            return np.fromiter(ex.map(one, range(len(self.shards))), dtype=np.int64, count=len(self.shards))

    def num_samples(self, epoch: Optional[int] = None) -> int:
        """Samples delivered in an epoch (across all ranks)."""
        total = self.plan(self.effective_epoch(epoch)).total
        return min(total, self.max_samples) if self.max_samples else total

    def effective_epoch(self, epoch: Optional[int] = None) -> int:
        """The epoch a call means: the fixed one (validation), else ``epoch``, else the current one."""
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

    def _window(self, epoch: int, w: int) -> ShuffleWindow:
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
            if len(c[3]) - 1 != plan.counts[i]:
                raise CorpusError(f"{self.cache.url(self.shards[i])}: index changed since the epoch was planned")
            chunks.append(c)
        win = ShuffleWindow(w, idx, datas, chunks, plan.id_base, [self.seed, epoch, w, _WINDOW_TAG])
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
        """Group positions by window; per group: (window, rows, sample indices, segments, sample keys,
        part_of). With packed rows the segments are the rows' chunks in row order and ``part_of[j]``
        is the group row segment ``j`` belongs to (its key: the row's, hashed with j's place in
        the row); otherwise ``part_of`` is None and segment j is row j."""
        plan = self.plan(epoch)
        wins = plan.window_of(positions)
        out = []
        single = wins.min() == wins.max()  # the usual case: one window
        for w in [int(wins[0])] if single else np.unique(wins).tolist():
            rows = np.arange(len(wins)) if single else np.nonzero(wins == w)[0]
            win = self._window(epoch, w)
            c = win.perm[positions[rows] - plan.window_start[w]]
            keys = sample_keys(self.seed, epoch, win.c_id[c])
            part_of, seg_keys, chunks = None, keys, c
            if self.spec.pack_samples:
                part_of, place, chunks = win.chunks_of_rows(c)
                seg_keys = hash_streams(keys[part_of], S_PART, place)
            seg = nsp_segments(
                seg_keys, win.c_start[chunks], win.c_end[chunks], win.c_target[chunks], win.c_doc[chunks],
                win.c_pnext[chunks], win.sent_cs, win.doc_off, self.spec,
            )
            out.append((win, rows, c, seg, keys, part_of))
        return out

    def batch_at(self, epoch: int, positions: np.ndarray, pad_if_empty: bool = True) -> dict[str, Any]:
        """The micro-batch made of the samples at these epoch positions (numpy arrays).

        A pure function of (corpus, seed, epoch, positions). An empty ``positions`` gives one
        padding sample (``sample_ids == -1``) when ``pad_if_empty``.
        """
        return self.batches_at(epoch, [positions], pad_if_empty)[0]

    def batches_at(self, epoch: int, steps: list[np.ndarray], pad_if_empty: bool = True) -> list[dict[str, Any]]:
        """``[batch_at(epoch, p) for p in steps]``, built in one vectorised pass (stream/batch.py)."""
        steps = [np.asarray(p, dtype=np.int64) for p in steps]
        if len(steps) > 1 and any(len(p) == 0 for p in steps):  # a padding sample: only at an epoch's end
            return [self.batches_at(epoch, [p], pad_if_empty)[0] for p in steps]
        m = max(1, int(self.cfg.pad_to_multiple_of))
        rows = self._rows(epoch, np.concatenate(steps) if len(steps) > 1 else steps[0], pad_if_empty, m)
        if len(steps) == 1:
            return [cut_batch(rows, 0, len(rows.lengths), m)]
        ends = np.cumsum([len(p) for p in steps]).tolist()
        return [cut_batch(rows, r0, r1, m) for r0, r1 in zip([0, *ends[:-1]], ends)]

    def _rows(self, epoch: int, positions: np.ndarray, pad_if_empty: bool, multiple: int) -> Rows:
        """The samples at these positions, built and masked, padded to the longest of them
        (rounded up to ``multiple``)."""
        n = self.num_samples(epoch)
        if len(positions) and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"positions outside epoch {epoch} (0..{n - 1})")
        groups = self._segments(epoch, positions) if len(positions) else []
        B = len(positions) if len(positions) or not pad_if_empty else 1
        lengths = np.full(B, 2, dtype=np.int64)
        for _, rows, _, seg, _, part_of in groups:
            lb_part = np.where(seg.nsp_label == IGNORE_INDEX, 0, 1 + seg.lb) if self.spec.nsp else 0
            if part_of is None:
                lengths[rows] = 2 + seg.la + lb_part
            else:  # packed rows: a row is its chunks' [CLS] x [SEP] laid end to end
                lengths[rows] = np.bincount(part_of, weights=2 + seg.la, minlength=len(rows)).astype(np.int64)
        L = -(-int(lengths.max()) // multiple) * multiple if B else 0
        ids = np.full((B, L), self.specials.pad, dtype=np.int64)
        types = np.zeros((B, L), dtype=np.int64)
        sample_ids = np.full(B, -1, dtype=np.int64)
        nsp = np.full(B, IGNORE_INDEX, dtype=np.int64)
        keys = np.zeros(B, dtype=np.uint64)
        if B and not groups:  # padding sample
            ids[:, 0] = self.specials.cls
            ids[:, 1] = self.specials.sep
        for win, rows, c, seg, k, part_of in groups:
            if part_of is None:
                win.assemble(seg, self.specials, self.spec.nsp, ids, types, rows)
                nsp[rows] = seg.nsp_label
            else:  # packed rows are MLM-only: no NSP label
                win.assemble_packed(seg, self.specials, ids, rows, part_of)
            sample_ids[rows] = win.c_id[c]
            keys[rows] = k
        # Maskable: real tokens that are not special (one table lookup), never in a padding sample.
        cand = (np.arange(L)[None, :] < lengths[:, None]) & ~self.is_special.take(ids, mode="clip")
        if not groups:
            cand[:] = False
        labels = mask_batch(ids, lengths, keys, self.spec, self.specials, self.random_ids, self.is_continuation,
                            candidates=cand)
        rows = Rows(ids=ids, types=types, labels=labels, lengths=lengths, nsp=nsp, sample_ids=sample_ids)
        if self.spec.pack_samples:
            rows.set_chunks([r[part_of] for _, r, _, _, _, part_of in groups], [2 + seg.la for _, _, _, seg, _, _ in groups])
        return rows

    def describe(self, epoch: int, positions: np.ndarray) -> list[dict]:
        """Provenance of the samples at these positions.

        Per sample: position, sample_id, nsp_label, a_shard/b_shard (manifest index of the split),
        a_doc/b_doc (document index in that shard), a_doc_id/b_doc_id (the shard's stable doc id),
        a_sentences/b_sentences ([start, end) sentence numbers within the document, before
        truncation) and truncated = tokens removed (A front, A back, B front, B back).
        With packed rows (``data.pack_samples``) the fields are those of the row's first chunk and
        ``parts`` lists every chunk's.
        """
        positions = np.asarray(positions, dtype=np.int64)
        out: list[dict] = [{} for _ in positions]
        for win, rows, c, seg, _, part_of in self._segments(epoch, positions):
            win.describe(seg, c, rows, part_of, positions, out)
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
        epoch, consumed = self.effective_epoch(None), self.consumed
        n = self.num_samples(epoch)
        steps = self.steps_in_epoch(epoch, consumed)
        mine = range(worker_id, steps, num_workers)
        per_pass = max(1, min(_SAMPLES_PER_PASS, _TOKENS_PER_PASS // self.spec.max_seq_len) // self.micro_batch_size)
        for i in range(0, len(mine), per_pass):
            yield from self.batches_at(epoch, [self.rank_positions(k, consumed, n) for k in mine[i : i + per_pass]])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Torch tensors; inside a DataLoader worker, only that worker's micro-steps."""
        info = torch.utils.data.get_worker_info() if torch is not None else None
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in self.iter_numpy(wid, nw):
            yield to_torch(batch)


def to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
