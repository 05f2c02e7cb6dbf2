"""Streaming loader (ptft_dist/stream/dataset.py, loader.py): exactly-once, equal steps, worker-independence,
O(1) resume, elastic resume, validation stream, packed form, bad-input handling, inspect."""

from __future__ import annotations

import io
import itertools
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptft_dist.config import DataConfig
from ptft_dist.corpus.format import CorpusError, tokenizer_hash
from ptft_dist.inspection import print_samples
from ptft_dist.stream.dataset import PretrainingStream, to_torch
from ptft_dist.stream.loader import (
    BATCH_KEYS,
    PackedBatch,
    StreamingLoader,
    build_train_loader,
    build_validation_loader,
    pack_batch,
    unpack_batch,
)
from ptft_dist.stream.masking import IGNORE_INDEX
from tests.corpus_factory import flip_byte, make_corpus

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
_CORPORA: dict[tuple, Path] = {}


def corpus_for(shard_docs: tuple, sentences=(1, 6)) -> Path:
    """A corpus per shard layout, built once per test session (hypothesis reuses them)."""
    key = (shard_docs, sentences)
    if key not in _CORPORA:
        root = Path(tempfile.mkdtemp(prefix="ptft-stream-"))
        seed = sum(shard_docs) * 31 + len(shard_docs) + sentences[1]  # stable whatever the test order
        make_corpus(root, shard_docs=shard_docs, val_docs=(2, 1), sentences=sentences, n_words=(2, 8), seed=seed)
        _CORPORA[key] = root
    return _CORPORA[key]


def cfg_for(root: Path, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 32)
    kw.setdefault("shuffle_window_shards", 2)
    return DataConfig(corpus=str(root), cache_dir=str(root / "cache"), **kw)


def stream(root, W=1, r=0, mb=4, **kw) -> PretrainingStream:
    return PretrainingStream(cfg=cfg_for(root, **kw), micro_batch_size=mb, world_size=W, rank=r)


def rank_batches(ds: PretrainingStream, num_workers: int) -> list[dict]:
    """What a DataLoader with ``num_workers`` workers yields, without processes: each worker's
    iterator, merged round-robin exactly as torch's DataLoader does for an IterableDataset."""
    if num_workers == 0:
        return list(ds.iter_numpy())
    its = [ds.iter_numpy(w, num_workers) for w in range(num_workers)]
    out, active = [], list(range(num_workers))
    while active:
        for w in list(active):
            try:
                out.append(next(its[w]))
            except StopIteration:
                active.remove(w)
    return out


def ids_of(batches) -> list[list[int]]:
    return [np.asarray(b["sample_ids"]).tolist() for b in batches]


def rows_by_id(batches) -> dict[int, tuple]:
    """Unpadded sample content keyed by sample id."""
    out = {}
    for b in batches:
        b = {k: np.asarray(v) for k, v in b.items()}
        for i, sid in enumerate(b["sample_ids"].tolist()):
            n = int(b["attention_mask"][i].sum())
            out[sid] = (b["input_ids"][i, :n].tobytes(), b["labels"][i, :n].tobytes(),
                        b["token_type_ids"][i, :n].tobytes(), int(b["next_sentence_label"][i]))
    return out


# --------------------------------------------------------------------------- exactly-once


@given(
    shard_docs=st.lists(st.integers(1, 9), min_size=1, max_size=6).map(tuple),
    world=st.integers(1, 8),
    mb=st.integers(1, 5),
    workers=st.integers(0, 4),
    window=st.integers(1, 3),
)
@PROPS
def test_exactly_once_equal_steps(shard_docs, world, mb, workers, window):
    root = corpus_for(shard_docs)
    N = stream(root, shuffle_window_shards=window).num_samples(0)
    all_ids, steps = [], set()
    reference = None
    for r in range(world):
        ds = stream(root, world, r, mb, shuffle_window_shards=window)
        batches = rank_batches(ds, workers)
        steps.add(len(batches))
        assert len(batches) == ds.steps_in_epoch(0, 0) == -(-N // (mb * world))
        for k, b in enumerate(batches):
            sid = b["sample_ids"]
            assert 1 <= len(sid) <= mb
            if (sid < 0).any():  # padding: only a lone sample on a rank with nothing left in the last step
                assert k == len(batches) - 1 and len(sid) == 1
                assert (b["labels"] == -100).all() and (b["next_sentence_label"] == -100).all()
            all_ids.extend(sid[sid >= 0].tolist())
        if r == world - 1 and workers:
            reference = ids_of(rank_batches(ds, 0))
            assert ids_of(batches) == reference, "worker count changed the order"
    assert len(steps) == 1, f"ranks take different step counts: {steps}"
    assert sorted(all_ids) == list(range(N)), "not every sample exactly once"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_real_dataloader_workers_match_in_process():
    root = corpus_for((5, 1, 7, 2, 3))
    ref = list(StreamingLoader(stream(root, 2, 1, 3), num_workers=0))
    for nw in (2, 3):
        got = list(StreamingLoader(stream(root, 2, 1, 3), num_workers=nw))
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert set(a) == set(BATCH_KEYS) == set(b)
            for k in BATCH_KEYS:
                if isinstance(a[k], torch.Tensor):
                    assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
                else:
                    assert a[k] == b[k]


def test_same_sample_same_content_any_world_size():
    root = corpus_for((4, 6, 2))
    one = rows_by_id(rank_batches(stream(root, 1, 0, 5), 0))
    three = {}
    for r in range(3):
        three.update(rows_by_id(rank_batches(stream(root, 3, r, 2), 2)))
    three.pop(-1, None)
    assert one == three


def test_steps_built_together_equal_steps_built_alone():
    """Workers build several micro-steps in one pass; each must equal the step built alone, down to
    its own padding width and every mask (docs/design.md, guarantee 1)."""
    ds = stream(corpus_for((5, 1, 7, 2, 3)), 1, 0, 4, pad_to_multiple_of=8)
    steps = [np.array([0, 1, 2, 3]), np.array([9]), np.array([4, 8, 7, 6, 5, 10])]
    for p, got in zip(steps, ds.batches_at(0, steps), strict=True):
        want = ds.batch_at(0, p)
        assert want["input_ids"].shape[1] == -(-want["max_seqlen"] // 8) * 8
        for k, v in want.items():
            assert (np.array_equal(got[k], v) and got[k].dtype == v.dtype) if isinstance(v, np.ndarray) else got[k] == v, k


@pytest.mark.parametrize("workers,consumed", [(1, 0), (2, 6)])
def test_pass_boundaries_inside_the_epoch_change_no_step(monkeypatch, workers, consumed):
    """A worker builds up to _SAMPLES_PER_PASS samples per pass; the test corpora are smaller than
    one pass, so a tiny pass puts boundaries inside the epoch (and a resume inside a pass): every
    step still equals the step built alone."""
    from ptft_dist.stream import dataset as dataset_mod

    ds = stream(corpus_for((5, 1, 7, 2, 3)), 2, 1, 2)
    ds.set_position(0, consumed)
    n = ds.num_samples(0)
    alone = [ds.batch_at(0, ds.rank_positions(k, consumed, n)) for k in range(ds.steps_in_epoch(0, consumed))]
    monkeypatch.setattr(dataset_mod, "_SAMPLES_PER_PASS", 3 * 2)  # 3 steps of micro-batch 2 per pass
    got = rank_batches(ds, workers)
    assert len(got) == len(alone) > 3 * workers
    for g, want in zip(got, alone):
        for k, v in want.items():
            assert (np.array_equal(g[k], v) and g[k].dtype == v.dtype) if isinstance(v, np.ndarray) else g[k] == v, k


# --------------------------------------------------------------------------- batch format


def test_batch_format_and_packed_form():
    root = corpus_for((5, 1, 7, 2, 3))
    b = next(iter(StreamingLoader(stream(root, 1, 0, 6, pad_to_multiple_of=8), num_workers=0)))
    assert set(b) == set(BATCH_KEYS)
    for k in ("input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label", "sample_ids",
              "indices"):
        assert b[k].dtype == torch.int64, k
    assert b["cu_seqlens"].dtype == torch.int32
    B, L = b["input_ids"].shape
    assert B == 6 and L % 8 == 0
    lengths = b["attention_mask"].sum(1)
    assert b["max_seqlen"] == int(lengths.max()) and L - 8 < b["max_seqlen"] <= L
    assert b["cu_seqlens"].tolist() == [0] + torch.cumsum(lengths, 0).tolist()
    flat = b["input_ids"].reshape(-1)[b["indices"]]
    assert torch.equal(flat, b["input_ids"][b["attention_mask"].bool()])
    assert (b["input_ids"][~b["attention_mask"].bool()] == 0).all()  # [PAD]
    assert (b["labels"][~b["attention_mask"].bool()] == -100).all()


# --------------------------------------------------------------------------- resume and elasticity


def _run(loaders, n_steps):
    """Step all ranks together for n_steps micro-steps (crossing epochs); per step: list of rank batches."""
    out = []
    iters = [iter(ld) for ld in loaders]
    while len(out) < n_steps:
        step = []
        for i, ld in enumerate(loaders):
            try:
                step.append(next(iters[i]))
            except StopIteration:
                iters[i] = iter(ld)
                step.append(next(iters[i]))
        out.append(step)
    for it in iters:
        it.close()
    return out


def _loaders(root, W, mb, workers=0, **kw):
    return [StreamingLoader(stream(root, W, r, mb, **kw), num_workers=workers) for r in range(W)]


def _global_sequence(steps, W):
    """(epoch-local position order) sample ids of a run: rank r's j-th sample in a step sits at offset r + W*j."""
    seq = []
    for step in steps:
        n = sum(int((b["sample_ids"] >= 0).sum()) for b in step)
        slot = [None] * n
        for r, b in enumerate(step):
            for j, sid in enumerate(b["sample_ids"].tolist()):
                if sid >= 0:
                    slot[r + W * j] = sid
        assert None not in slot
        seq.append(slot)
    return seq


@given(cut=st.integers(0, 40), mb=st.integers(1, 4))
@settings(max_examples=25, deadline=None)
def test_resume_anywhere_equals_uninterrupted(cut, mb):
    root = corpus_for((5, 1, 7, 2, 3))
    W = 2
    per_epoch = stream(root, W, 0, mb).steps_in_epoch(0, 0)
    total = 2 * per_epoch + 3  # crosses two epoch ends
    cut = cut % total
    ref = _run(_loaders(root, W, mb), total)
    first = _loaders(root, W, mb)
    head = _run(first, cut)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states), "ranks disagree about the data position"
    assert set(states[0]) >= {"epoch", "consumed", "seed"}
    second = _loaders(root, W, mb)
    for ld in second:
        ld.load_state_dict(states[0])
    tail = _run(second, total - cut)
    for a_step, b_step in zip(ref, head + tail):
        for a, b in zip(a_step, b_step):
            for k in ("input_ids", "labels", "sample_ids", "next_sentence_label", "token_type_ids"):
                assert torch.equal(a[k], b[k])


def test_resume_does_not_iterate(monkeypatch):
    """O(1): loading a state far into an epoch builds only the batches that follow."""
    root = corpus_for((5, 1, 7, 2, 3))
    ld = StreamingLoader(stream(root, 1, 0, 2), num_workers=0)
    n = ld.dataset.num_samples(0)
    built = []
    orig = PretrainingStream.batches_at

    def spy(self, epoch, steps, pad_if_empty=True):
        built.extend(np.asarray(p).tolist() for p in steps)
        return orig(self, epoch, steps, pad_if_empty)

    monkeypatch.setattr(PretrainingStream, "batches_at", spy)
    ld.load_state_dict({"epoch": 0, "consumed": n - 3, "seed": 42})
    out = list(ld)
    assert built == [[n - 3, n - 2], [n - 1]]
    assert len(out) == 2
    assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["consumed"] == 0


@pytest.mark.parametrize("w_from,mb_from,w_to,mb_to", [(2, 6, 3, 4), (4, 2, 2, 4)])
def test_elastic_resume_same_global_sequence(w_from, mb_from, w_to, mb_to):
    root = corpus_for((8, 3, 9, 5, 6))
    assert w_from * mb_from == w_to * mb_to
    per_epoch = stream(root, w_from, 0, mb_from).steps_in_epoch(0, 0)
    assert per_epoch >= 4
    total = per_epoch + 4
    ref = _global_sequence(_run(_loaders(root, w_from, mb_from), total), w_from)
    ref_rows = {}
    for step in _run(_loaders(root, w_from, mb_from), per_epoch):  # ids are per epoch: epoch 0 only
        ref_rows.update(rows_by_id(step))
    cut = per_epoch // 2
    first = _loaders(root, w_from, mb_from)
    head = _run(first, cut)
    state = first[0].state_dict()
    second = _loaders(root, w_to, mb_to, workers=0)
    for ld in second:
        ld.load_state_dict(state)
    tail = _run(second, total - cut)
    got = _global_sequence(head, w_from) + _global_sequence(tail, w_to)
    assert got == ref, "elastic resume changed the global sample sequence"
    # same samples (byte-identical content) within the epoch
    got_rows = {}
    for step in tail[: per_epoch - cut]:
        got_rows.update(rows_by_id(step))
    got_rows.pop(-1, None)
    assert got_rows and all(ref_rows[k] == v for k, v in got_rows.items())


def test_state_refuses_other_corpus_or_settings():
    a = corpus_for((5, 1, 7, 2, 3))
    b = corpus_for((3, 3))
    state = StreamingLoader(stream(a, 1, 0, 2)).state_dict()
    with pytest.raises(CorpusError, match="refers to corpus"):
        StreamingLoader(stream(b, 1, 0, 2)).load_state_dict(state)
    with pytest.raises(ValueError, match="max_seq_len"):
        StreamingLoader(stream(a, 1, 0, 2, max_seq_len=48)).load_state_dict(state)
    with pytest.warns(UserWarning):
        StreamingLoader(stream(a, 1, 0, 2, max_seq_len=48)).load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- validation stream


def test_validation_stream_is_fixed():
    root = corpus_for((5, 1, 7, 2, 3))
    cfg = cfg_for(root)
    ld = build_validation_loader(cfg, micro_batch_size=2, world_size=2, rank=0)
    first = list(ld)
    second = list(ld)
    assert len(first) == len(second) == len(ld) > 0
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "sample_ids"))
    other = build_validation_loader(cfg, micro_batch_size=2, world_size=2, rank=1)
    ids = [i for b in first + list(other) for i in b["sample_ids"].tolist() if i >= 0]
    n = ld.dataset.num_samples()
    assert sorted(ids) == list(range(n))
    few = build_validation_loader(cfg, micro_batch_size=2, world_size=1, rank=0, max_samples=3)
    assert sum(int((b["sample_ids"] >= 0).sum()) for b in few) == 3
    train = build_train_loader(cfg, micro_batch_size=2)
    assert train.dataset.split == "train" and ld.dataset.split == "validation"
    # independent of the training seed and of the training position
    other_seed = list(build_validation_loader(cfg_for(root, seed=7), micro_batch_size=2, world_size=2, rank=0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other_seed))
    buf = io.StringIO()
    print_samples(str(root), cfg, 3, 5, 2, 0, True, split="validation", out=buf)
    assert [int(x) for x in buf.getvalue().split()] == [i for b in first for i in b["sample_ids"].tolist()][:3]


# --------------------------------------------------------------------------- bad input


def test_corrupt_shard_fails_on_every_rank_naming_it(tmp_path):
    make_corpus(tmp_path, shard_docs=(4, 3, 5), val_docs=(1,))
    bad = tmp_path / "train" / "shard-00000-00001.bin"
    flip_byte(bad)  # last token byte: index still parses, checksum does not
    for r in range(3):
        ld = StreamingLoader(stream(tmp_path, 3, r, 2, shuffle_window_shards=3), num_workers=0)
        with pytest.raises(CorpusError, match=r"shard-00000-00001\.bin.*checksum mismatch"):
            list(ld)


@pytest.mark.timeout(120)
def test_corrupt_shard_with_workers_raises_not_hangs(tmp_path):
    make_corpus(tmp_path, shard_docs=(4, 3, 5), val_docs=(1,))
    flip_byte(tmp_path / "train" / "shard-00000-00002.bin", 3)
    ld = StreamingLoader(stream(tmp_path, 2, 1, 2, shuffle_window_shards=3), num_workers=2)
    with pytest.raises(CorpusError, match=r"shard-00000-00002\.bin"):
        list(ld)


def test_truncated_shard_fails_early(tmp_path):
    make_corpus(tmp_path, shard_docs=(4, 3, 5), val_docs=(1,))
    p = tmp_path / "train" / "shard-00000-00000.bin"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CorpusError, match=r"shard-00000-00000\.bin.*(truncated|manifest says)"):
        stream(tmp_path).num_samples(0)


def test_tokenizer_mismatch_refused(tmp_path):
    fc = make_corpus(tmp_path, shard_docs=(2,), val_docs=(1,))
    good = fc.manifest.tokenizer_hash
    PretrainingStream(cfg=cfg_for(tmp_path), expected_tokenizer=good)
    PretrainingStream(cfg=cfg_for(tmp_path), expected_tokenizer=str(tmp_path / "tokenizer"))
    with pytest.raises(CorpusError, match=f"{good}.*expects tokenizer deadbeefdeadbeef"):
        PretrainingStream(cfg=cfg_for(tmp_path, expected_tokenizer="deadbeefdeadbeef"))
    assert tokenizer_hash(tmp_path / "tokenizer") == good


# --------------------------------------------------------------------------- inspect


def test_inspect_prints_samples_and_rank_ids():
    root = corpus_for((5, 1, 7, 2, 3))
    cfg = cfg_for(root)
    for r in range(2):
        buf = io.StringIO()
        print_samples(str(root), cfg, 6, 1, 2, r, True, out=buf)
        printed = [int(x) for x in buf.getvalue().split()]
        ds = stream(root, 2, r, 3)
        ds.set_position(1, 0)
        delivered = [i for b in ds.iter_numpy() for i in b["sample_ids"].tolist()][:6]
        assert printed == delivered
    buf = io.StringIO()
    print_samples(str(root), cfg, 4, 0, 1, 0, False, out=buf)
    text = buf.getvalue()
    assert text.count("sample id") == 4
    assert "IsNext" in text or "NotNext" in text
    assert "[CLS]" in text and "[SEP]" in text and "{" in text  # masked positions with originals
    assert "d" in text and "| " in text


def test_plan_reads_index_only_and_is_cached(monkeypatch):
    root = corpus_for((5, 1, 7, 2, 3))
    ds = stream(root)
    opened = []
    monkeypatch.setattr(ds.cache, "open", lambda info: opened.append(info) or pytest.fail("opened a whole shard"))
    n = ds.num_samples(3)
    assert n > 0 and not opened
    again = stream(root)
    monkeypatch.setattr(again, "_compute_counts", lambda epoch: pytest.fail("plan not taken from the cache"))
    assert again.num_samples(3) == n


def test_padding_sample_format():
    root = corpus_for((1,), sentences=(1, 1))
    ds = stream(root, 4, 3, 1)
    assert ds.num_samples(0) < 4, "the corpus must give fewer samples than one global batch"
    (b,) = list(ds.iter_numpy())
    assert b["sample_ids"].tolist() == [-1]
    assert b["input_ids"].tolist() == [[2, 3]] and b["attention_mask"].tolist() == [[1, 1]]
    assert (b["labels"] == IGNORE_INDEX).all() and b["next_sentence_label"].tolist() == [-100]


def test_all_combinations_smoke():
    """Cheap exhaustive sweep (no hypothesis) over world sizes 1..8 × workers 0..4 on one uneven corpus."""
    root = corpus_for((7, 1, 3, 9, 2, 5))
    N = stream(root).num_samples(0)
    for world, workers in itertools.product(range(1, 9), range(5)):
        ids, steps = [], set()
        for r in range(world):
            bs = rank_batches(stream(root, world, r, 3), workers)
            steps.add(len(bs))
            ids += [i for b in bs for i in b["sample_ids"].tolist() if i >= 0]
        assert len(steps) == 1 and sorted(ids) == list(range(N)), (world, workers)


@pytest.mark.parametrize("compact", [True, False])
def test_pack_unpack_round_trip(compact):
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, 250_000, (3, 7)),
        "token_type_ids": rng.integers(0, 2, (3, 7)),
        "attention_mask": np.ones((3, 7), dtype=np.int64),
        "labels": np.where(rng.random((3, 7)) < 0.2, rng.integers(0, 300, (3, 7)), -100),
        "next_sentence_label": np.array([0, 1, -100]),
        "sample_ids": np.array([5, 2**40, -1]),
        "cu_seqlens": np.array([0, 7, 14, 21], dtype=np.int32),
        "indices": np.arange(21, dtype=np.int64),
        "max_seqlen": 7,
    }
    packed = pack_batch(batch, compact=compact)
    # what a worker sends: pickled through the pipe; the tensor form is what pin_memory() gives
    sent = pickle.loads(pickle.dumps(packed))
    as_tensor = PackedBatch(torch.frombuffer(sent.buffer, dtype=torch.uint8), sent.layout, sent.extras)
    want = to_torch(batch)
    for got in (unpack_batch(sent), unpack_batch(as_tensor)):
        assert set(got) == set(want)
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
            else:
                assert got[k] == v
    assert pack_batch(batch, compact=True).nbytes < pack_batch(batch, compact=False).nbytes


def test_pin_memory_widens_compact_batches_into_one_pinned_buffer(monkeypatch):
    """GPU runs pin batches: the worker still sends the compact form; the pin thread widens it into
    one buffer every field is a view of (no GPU here: ``Tensor.pin_memory`` is a stand-in, named so)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())  # stand-in: no CUDA
    batch = {"input_ids": np.array([[2, 7, 3], [2, 9, 0]]), "labels": np.array([[-100, 7, -100], [-100, -100, -100]]),
             "weights": np.array([0.5, 1.5], dtype=np.float32), "flags": np.array([True, False]),
             "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    packed = pack_batch(batch, compact=True)
    assert any(wire != final for _, wire, final, _, _ in packed.layout)
    pinned = pickle.loads(pickle.dumps(packed)).pin_memory()
    assert isinstance(pinned.buffer, torch.Tensor)
    got = unpack_batch(pinned)
    for k, v in to_torch(batch).items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        assert got[k].untyped_storage().data_ptr() == pinned.buffer.untyped_storage().data_ptr(), k


def test_forever_crosses_epochs_and_empty_split_is_refused(tmp_path):
    root = corpus_for((2, 1))
    ld = StreamingLoader(stream(root, 1, 0, 4), num_workers=0)
    per_epoch = len(ld)
    it = ld.forever()
    seen = [next(it) for _ in range(per_epoch + 1)]
    assert len(seen) == per_epoch + 1 and ld.epoch == 1 and ld.consumed == 4
    make_corpus(tmp_path, shard_docs=(), val_docs=())
    with pytest.raises(CorpusError, match="no samples"):
        list(StreamingLoader(stream(tmp_path), num_workers=0))
    assert list(build_validation_loader(cfg_for(tmp_path), micro_batch_size=2)) == []
