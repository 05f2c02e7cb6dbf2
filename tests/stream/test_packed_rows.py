"""Packed rows (``data.pack_samples``, stream/samples.py::pack_chunks): a row holds consecutive chunks,
each ``[CLS] x [SEP]``, up to ``max_seq_len``. Every chunk of the unpacked stream arrives once, whole,
inside one row; ``cu_seqlens`` mark each chunk; rows are samples for exactly-once and resume."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ptft_dist.config import DataConfig
from ptft_dist.stream.dataset import PretrainingStream
from ptft_dist.stream.masking import IGNORE_INDEX
from ptft_dist.stream.samples import pack_chunks
from tests.corpus_factory import make_corpus
from tests.stream.test_dataset import _loaders, _run, cfg_for, rank_batches

CLS, SEP = 2, 3  # the test tokenizer's (tests/corpus_factory.py)


def short_doc_corpus() -> Path:
    """Documents of 1-2 short sentences: far shorter than a row, so chunks are whole documents
    (never truncated) and packing has room to work."""
    root = Path(tempfile.mkdtemp(prefix="ptft-packed-"))
    make_corpus(root, shard_docs=(9, 4, 7, 12), val_docs=(3, 2), sentences=(1, 2), n_words=(2, 6), seed=5)
    return root


ROOT = short_doc_corpus()


def packed_stream(root=ROOT, W=1, r=0, mb=3, pack=True, **kw) -> PretrainingStream:
    kw.setdefault("max_seq_len", 64)
    cfg = cfg_for(root, nsp=False, pack_samples=pack, **kw)
    return PretrainingStream(cfg=cfg, micro_batch_size=mb, world_size=W, rank=r)


def chunks_of(batches) -> list[tuple[int, ...]]:
    """Every sequence attention keeps apart (cu_seqlens), as original tokens (masks undone)."""
    out = []
    for b in batches:
        b = {k: np.asarray(v) for k, v in b.items()}
        if (b["sample_ids"] < 0).all():  # a padding sample ([CLS] [SEP]) at the epoch's end
            continue
        orig = np.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"]).reshape(-1)[b["indices"]]
        cu = b["cu_seqlens"].tolist()
        out += [tuple(orig[a:e].tolist()) for a, e in zip(cu[:-1], cu[1:])]
    return out


def test_pack_chunks_is_greedy_in_order():
    assert pack_chunks(np.array([10, 20, 30, 64, 5, 60, 4]), 64).tolist() == [0, 3, 4, 5, 7]  # 60 + 4 fills a row exactly
    assert pack_chunks(np.array([], dtype=np.int64), 64).tolist() == [0]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_every_chunk_once_whole_and_framed_in_rows_that_fit(world, workers):
    unpacked = packed_stream(pack=False)
    reference = Counter(chunks_of(rank_batches(unpacked, 0)))
    N = packed_stream().num_samples(0)
    n_rows, n_chunks = N, unpacked.num_samples(0)
    assert 2 * n_rows < n_chunks, "short documents should share rows"
    got, ids, multi = Counter(), [], 0
    for r in range(world):
        batches = rank_batches(packed_stream(W=world, r=r), workers)
        got.update(chunks_of(batches))
        for b in batches:
            ids += b["sample_ids"][b["sample_ids"] >= 0].tolist()
            lengths = b["attention_mask"].sum(1)
            assert (lengths <= 64).all() and b["input_ids"].shape[1] <= 64
            assert b["cu_seqlens"][-1] == lengths.sum() and (b["next_sentence_label"] == IGNORE_INDEX).all()
            assert b["max_seqlen"] == np.diff(b["cu_seqlens"]).max()
            flat = b["input_ids"].reshape(-1)[b["indices"]]
            cu = b["cu_seqlens"]
            assert (flat[cu[:-1]] == CLS).all() and (flat[cu[1:] - 1] == SEP).all()
            multi += len(cu) - 1 - len(lengths)  # chunks beyond one per row
    assert multi > 0 and sorted(ids) == list(range(N)), "not every row exactly once"
    assert got == reference, "packing dropped, duplicated or changed a chunk"


def test_masks_stay_inside_chunks_and_specials_are_never_predicted():
    batches = rank_batches(packed_stream(mb=4), 0)
    predicted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) - 2 * (len(b["cu_seqlens"]) - 1) for b in batches)
    assert 0.1 < predicted / real < 0.2  # mlm_probability 0.15 of the non-special tokens
    for b in batches:
        flat_labels = b["labels"].reshape(-1)[b["indices"]]
        cu = b["cu_seqlens"]
        assert (flat_labels[cu[:-1]] == IGNORE_INDEX).all() and (flat_labels[cu[1:] - 1] == IGNORE_INDEX).all()


@pytest.mark.parametrize("whole_words", [False, True])
def test_whole_word_masking_in_rows_never_crosses_a_chunk(whole_words):
    batches = rank_batches(packed_stream(mb=4, whole_word_mask=whole_words), 0)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) > 0
    for b in batches:
        flat_labels = b["labels"].reshape(-1)[b["indices"]]
        cu = b["cu_seqlens"]
        assert (flat_labels[cu[:-1]] == IGNORE_INDEX).all() and (flat_labels[cu[1:] - 1] == IGNORE_INDEX).all()


@pytest.mark.parametrize("cut", [0, 3, 7, 11])
def test_resume_anywhere_equals_uninterrupted(cut):
    W, mb = 2, 2
    kw = dict(max_seq_len=64, nsp=False, pack_samples=True)
    per_epoch = packed_stream(W=W, mb=mb).steps_in_epoch(0, 0)
    total = per_epoch + 3  # crosses an epoch end
    ref = _run(_loaders(ROOT, W, mb, **kw), total)
    first = _loaders(ROOT, W, mb, **kw)
    head = _run(first, cut)
    state = first[0].state_dict()
    second = _loaders(ROOT, W, mb, **kw)
    for ld in second:
        ld.load_state_dict(state)
    tail = _run(second, total - cut)
    for a_step, b_step in zip(ref, head + tail):
        for a, b in zip(a_step, b_step):
            for k in ("input_ids", "labels", "sample_ids", "cu_seqlens"):
                assert torch.equal(a[k], b[k])


def test_a_state_of_unpacked_samples_is_refused():
    state = packed_stream(pack=False).state_dict()
    with pytest.raises(ValueError, match="data settings that define the samples"):
        packed_stream().load_state_dict(state)


def test_describe_lists_each_chunk_of_a_row():
    ds = packed_stream()
    info = ds.describe(0, np.arange(4))
    b = ds.batch_at(0, np.arange(4))
    for i, rec in enumerate(info):
        assert rec["sample_id"] == b["sample_ids"][i] and len(rec["parts"]) >= 1
        assert all(p["sample_id"] == rec["sample_id"] and p["truncated"] == (0, 0, 0, 0) for p in rec["parts"])
    assert sum(len(r["parts"]) for r in info) == len(b["cu_seqlens"]) - 1


def test_inspect_shows_each_chunk_of_a_row():
    import io

    from ptft_dist.inspection import print_samples

    buf = io.StringIO()
    cfg = cfg_for(ROOT, max_seq_len=64, nsp=False, pack_samples=True)
    print_samples(str(ROOT), cfg, 3, 0, 1, 0, False, out=buf)
    text = buf.getvalue()
    parts = sum(len(r["parts"]) for r in packed_stream(mb=3).describe(0, np.arange(3)))
    assert "packed rows" in text.splitlines()[0]
    assert text.count("  chunk ") == parts > 3 and text.count("[CLS]") == parts


def test_unpacked_sample_fingerprints_are_those_of_runs_before_packing_existed():
    """Checkpoints written before ``pack_samples`` existed must still resume: the digests below were
    computed by the code before the change (e484f4d)."""
    kw = dict(max_seq_len=128, shuffle_window_shards=4)
    assert packed_stream(pack=False, **kw).sample_fingerprint != packed_stream(**kw).sample_fingerprint
    cfg = DataConfig(corpus=str(ROOT), cache_dir=str(ROOT / "cache"))
    assert PretrainingStream(cfg=cfg, micro_batch_size=2).sample_fingerprint == "c2aead6d592c98a4"
    cfg = DataConfig(corpus=str(ROOT), cache_dir=str(ROOT / "cache"), nsp=False, max_seq_len=64, whole_word_mask=True)
    assert PretrainingStream(cfg=cfg, micro_batch_size=2).sample_fingerprint == "e285b4484d5120ad"


def test_truncated_chunks_keep_their_length_in_rows():
    """Chunks longer than a row's content room are cut (BERT's front/back draw) inside packed rows
    exactly as much as unpacked: the same multiset of chunk lengths, the same total."""
    root = Path(tempfile.mkdtemp(prefix="ptft-packed-long-"))
    make_corpus(root, shard_docs=(6, 5), val_docs=(2,), sentences=(2, 6), n_words=(3, 9), seed=8)
    lengths = {}
    for pack in (False, True):
        ds = PretrainingStream(cfg=cfg_for(root, max_seq_len=24, nsp=False, pack_samples=pack), micro_batch_size=5)
        lengths[pack] = Counter(len(c) for c in chunks_of(rank_batches(ds, 0)))
        cut = sum(p["truncated"][0] + p["truncated"][1] for r in ds.describe(0, np.arange(ds.num_samples(0)))
                  for p in r.get("parts", [r]))
        assert cut > 0
    assert lengths[True] == lengths[False] and max(lengths[True]) == 24


def test_rows_from_two_windows_in_any_order_equal_rows_built_alone():
    """A micro-batch whose rows come from two shuffle windows, interleaved: every row (and the chunk
    boundaries in cu_seqlens) equals the row built alone."""
    ds = packed_stream(shuffle_window_shards=2)
    start = int(ds.plan(0).window_start[1])
    positions = np.array([start, 0, start + 1, 1, start + 2])
    batch = ds.batch_at(0, positions)
    cu = batch["cu_seqlens"].tolist()
    parts_per_row = [len(ds.describe(0, [p])[0]["parts"]) for p in positions]
    bounds = np.cumsum([0, *parts_per_row])
    for i, p in enumerate(positions):
        alone = ds.batch_at(0, np.array([p]))
        n = int(alone["attention_mask"].sum())
        assert np.array_equal(batch["input_ids"][i, :n], alone["input_ids"][0, :n])
        assert np.array_equal(batch["labels"][i, :n], alone["labels"][0, :n])
        row_cu = np.array(cu[bounds[i] : bounds[i + 1] + 1]) - cu[bounds[i]]
        assert row_cu.tolist() == alone["cu_seqlens"].tolist()
