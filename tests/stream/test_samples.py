"""NSP pairs and MLM masking (ptft_dist/stream/samples.py, masking.py, keys.py): exact algorithms, statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptft_dist.config import DataConfig
from ptft_dist.stream.dataset import PretrainingStream
from ptft_dist.stream.keys import (
    S_MASK_SCORE,
    S_TARGET,
    S_TARGET_LEN,
    S_TRUNC_A,
    S_TRUNC_A2,
    binomial_half,
    sample_keys,
    shard_key,
    uniform,
)
from ptft_dist.stream.masking import IGNORE_INDEX, mask_batch, random_token_ids
from ptft_dist.stream.samples import IS_NEXT, NOT_NEXT, chunk_sentences, truncate_lengths, truncate_lengths_reference
from ptft_dist.stream.spec import SampleSpec, SpecialIds
from tests.corpus_factory import make_corpus

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIALS = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)


# --------------------------------------------------------------------------- RNG


def test_hash_rng_is_pinned():
    """The hash defines every sample; changing it silently changes resumed runs' data."""
    keys = sample_keys(42, 0, np.arange(3))
    assert keys.dtype == np.uint64
    assert keys.tolist() == sample_keys(42, 0, np.array([0, 1, 2])).tolist()
    assert len(set(keys.tolist())) == 3
    assert sample_keys(42, 1, np.arange(3)).tolist() != keys.tolist()
    assert sample_keys(43, 0, np.arange(3)).tolist() != keys.tolist()
    assert [int(k) for k in keys] == [int(k) for k in PINNED_KEYS], [hex(int(k)) for k in keys]
    u = uniform(keys[:, None], S_MASK_SCORE, np.arange(1000)[None, :])
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.02


PINNED_KEYS = [0x29A124495B7F4218, 0xB4B54BDE963C774D, 0xADF74942A0898FDB]


def test_binomial_half_moments():
    keys = sample_keys(1, 2, np.arange(20000))
    for n in (0, 1, 7, 64, 65, 300):
        x = binomial_half(np.full(len(keys), n), keys, S_TRUNC_A, S_TRUNC_A2)
        assert x.min() >= 0 and x.max() <= n
        assert abs(x.mean() - n / 2) < 0.05 + 0.03 * n
        if n:
            assert abs(x.var() - n / 4) < 0.1 * n / 4 + 0.05


# --------------------------------------------------------------------------- truncation and chunking


@given(st.integers(0, 300), st.integers(0, 300), st.integers(2, 300))
@FAST
def test_truncate_lengths_matches_bert_loop(la, lb, m):
    a, b = truncate_lengths(np.array([la]), np.array([lb]), m)
    assert (int(a[0]), int(b[0])) == truncate_lengths_reference(la, lb, m)


def _reference_chunks(cs, doc_off, targets):
    """BERT's loop (create_instances_from_document) with the per-start-sentence target."""
    out = []
    for d in range(len(doc_off) - 1):
        s, e = doc_off[d], doc_off[d + 1]
        start, length = s, 0
        for i in range(s, e):
            if i == start:
                target = targets[start]
            length += cs[i + 1] - cs[i]
            if i == e - 1 or length >= target:
                out.append((start, i + 1, target))
                start, length = i + 1, 0
    return out


@given(
    st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=12), min_size=1, max_size=8),
    st.integers(2, 60),
    st.sampled_from([0.0, 0.1, 0.5]),
    st.integers(0, 5),
)
@FAST
def test_chunking_is_bert_greedy(doc_sent_lens, max_tokens, short_prob, seed):
    lens = [n for d in doc_sent_lens for n in d]
    cs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    doc_off = np.concatenate([[0], np.cumsum([len(d) for d in doc_sent_lens])]).astype(np.int64)
    key = shard_key(seed, 3, 1)
    st_, en, tg = chunk_sentences(cs, doc_off, key, max_tokens, short_prob)
    # targets as drawn for each start sentence
    s = np.arange(len(lens))
    short = uniform(key, S_TARGET, s) < short_prob
    t_all = np.where(short & (max_tokens > 2), 2 + (uniform(key, S_TARGET_LEN, s) * (max_tokens - 1)).astype(int),
                     max_tokens)
    ref = _reference_chunks(cs, doc_off, t_all)
    assert list(zip(st_.tolist(), en.tolist(), tg.tolist())) == [(a, b, int(c)) for a, b, c in ref]
    assert tg.min() >= 2 and tg.max() <= max_tokens


def test_chunking_depends_on_epoch():
    rng = np.random.default_rng(0)
    lens = rng.integers(3, 30, size=400)
    cs = np.concatenate([[0], np.cumsum(lens)])
    doc_off = np.array([0, 150, 400])
    a = chunk_sentences(cs, doc_off, shard_key(1, 0, 0), 64, 0.3)[0]
    b = chunk_sentences(cs, doc_off, shard_key(1, 1, 0), 64, 0.3)[0]
    assert a.tolist() != b.tolist()
    assert a.tolist() == chunk_sentences(cs, doc_off, shard_key(1, 0, 0), 64, 0.3)[0].tolist()


# --------------------------------------------------------------------------- masking


def _random_batch(B=2000, L=128, vocab=1000, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, L + 1, size=B)
    ids = rng.integers(5, vocab, size=(B, L))
    ids[:, 0] = SPECIALS.cls
    ids[np.arange(B), lengths - 1] = SPECIALS.sep
    mid = rng.integers(2, lengths - 2)
    ids[np.arange(B), mid] = SPECIALS.sep
    ids[np.arange(L)[None, :] >= lengths[:, None]] = SPECIALS.pad
    ids[rng.random((B, L)) < 0.01] = SPECIALS.unk  # [UNK] content is never predicted either
    ids[np.arange(L)[None, :] >= lengths[:, None]] = SPECIALS.pad
    return ids, lengths


def test_masking_statistics():
    spec = SampleSpec(max_seq_len=128)
    ids, lengths = _random_batch()
    orig = ids.copy()
    keys = sample_keys(7, 0, np.arange(len(ids)))
    rand_ids = random_token_ids(1000, SPECIALS)
    labels = mask_batch(ids, lengths, keys, spec, SPECIALS, rand_ids)
    sel = labels != IGNORE_INDEX
    special = np.isin(orig, SPECIALS.all())
    assert not (sel & special).any(), "a special token was chosen"
    assert (labels[sel] == orig[sel]).all()
    n_cand = (~special).sum(1)
    expect = np.maximum(1, np.floor(n_cand * 0.15 + 0.5))
    assert (sel.sum(1) == expect).all()  # exact count per sequence, like BERT
    rate = sel.sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.005
    masked = ids[sel] == SPECIALS.mask
    unchanged = ids[sel] == orig[sel]
    rnd = ~masked & ~unchanged
    n = sel.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    # a random replacement can hit the original token by chance (1/995)
    assert abs(rnd.sum() / n - 0.1 * (1 - 1 / 995)) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01
    assert not np.isin(ids[sel & ~(ids == SPECIALS.mask)], SPECIALS.all()).any()
    # unselected positions untouched
    assert (ids[~sel] == orig[~sel]).all()
    # positions are spread uniformly over the sequence (no bias to the front)
    pos = np.nonzero(sel)[1] / lengths[np.nonzero(sel)[0]]
    assert abs(pos.mean() - 0.5) < 0.02


def test_masking_independent_of_batch_and_padding():
    spec = SampleSpec(max_seq_len=128)
    ids, lengths = _random_batch(B=50, L=100, seed=3)
    keys = sample_keys(7, 0, np.arange(50))
    rand_ids = random_token_ids(1000, SPECIALS)
    a = ids.copy()
    la = mask_batch(a, lengths, keys, spec, SPECIALS, rand_ids)
    for i in (0, 17, 49):
        wide = np.full((1, 128), SPECIALS.pad)
        wide[0, :100] = ids[i]
        lb = mask_batch(wide, lengths[i : i + 1], keys[i : i + 1], spec, SPECIALS, rand_ids)
        assert (wide[0, :100] == a[i]).all() and (lb[0, :100] == la[i]).all()


def test_masking_probability_zero_and_cap():
    ids, lengths = _random_batch(B=20)
    keys = sample_keys(0, 0, np.arange(20))
    r = random_token_ids(1000, SPECIALS)
    lab = mask_batch(ids.copy(), lengths, keys, SampleSpec(mlm_probability=0.0), SPECIALS, r)
    assert (lab == IGNORE_INDEX).all()
    lab = mask_batch(ids.copy(), lengths, keys, SampleSpec(max_predictions_per_seq=3), SPECIALS, r)
    assert ((lab != IGNORE_INDEX).sum(1) <= 3).all()


def test_whole_word_masking_masks_all_pieces():
    rng = np.random.default_rng(5)
    vocab = 600
    is_cont = np.zeros(vocab, dtype=bool)
    is_cont[300:] = True  # ids >= 300 are "##" pieces
    B, L = 3000, 64
    ids = np.where(rng.random((B, L)) < 0.4, rng.integers(300, vocab, (B, L)), rng.integers(5, 300, (B, L)))
    lengths = rng.integers(10, L + 1, size=B)
    ids[:, 0] = SPECIALS.cls
    ids[:, 1] = rng.integers(5, 300, B)  # a word start after [CLS]
    ids[np.arange(B), lengths - 1] = SPECIALS.sep
    ids[np.arange(L)[None, :] >= lengths[:, None]] = SPECIALS.pad
    orig = ids.copy()
    spec = SampleSpec(whole_word_mask=True)
    keys = sample_keys(1, 0, np.arange(B))
    labels = mask_batch(ids, lengths, keys, spec, SPECIALS, random_token_ids(vocab, SPECIALS), is_cont)
    sel = labels != IGNORE_INDEX
    cand = (np.arange(L)[None, :] < lengths[:, None]) & ~np.isin(orig, SPECIALS.all())
    start = cand & ~is_cont[orig]
    word = np.cumsum(start, axis=1)
    for b in range(200):
        for w in np.unique(word[b][sel[b]]):
            members = cand[b] & (word[b] == w)
            assert sel[b][members].all(), "a word was only partly masked"
    rate = sel.sum() / cand.sum()
    assert 0.12 < rate < 0.16
    assert not (sel & ~cand).any()


# --------------------------------------------------------------------------- NSP on a real (synthetic) corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("nsp")
    return make_corpus(root, shard_docs=(30, 12, 25, 8), val_docs=(3,), sentences=(1, 12), n_words=(2, 9))


def _concat(sentences, a, b):
    return [t for s in sentences[a:b] for t in s]


def _stream(corpus, **kw):
    cfg = DataConfig(corpus=str(corpus.root), cache_dir=str(corpus.root / "cache"), **kw)
    return PretrainingStream(cfg=cfg, micro_batch_size=64)


def test_nsp_pairs_are_real_and_balanced(corpus):
    ds = _stream(corpus, max_seq_len=96, shuffle_window_shards=2)
    labels, checked_next, checked_not = [], 0, 0
    for epoch in (0, 1):
        n = ds.num_samples(epoch)
        pos = np.arange(n)
        batch = ds.batch_at(epoch, pos)
        infos = ds.describe(epoch, pos)
        for row, info in enumerate(infos):
            ids = batch["input_ids"][row]
            lab = batch["labels"][row]
            orig = np.where(lab != IGNORE_INDEX, lab, ids)
            length = int(batch["attention_mask"][row].sum())
            types = batch["token_type_ids"][row]
            seps = np.nonzero(orig[:length] == 3)[0]
            assert orig[0] == 2 and len(seps) == 2 and seps[1] == length - 1
            a_tok, b_tok = orig[1 : seps[0]].tolist(), orig[seps[0] + 1 : seps[1]].tolist()
            assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : length] == 1).all()
            assert length <= 96
            fa, ba, fb, bb = info["truncated"]
            sents_a = corpus.sentences("train", info["a_shard"], info["a_doc"])
            full_a = _concat(sents_a, *info["a_sentences"])
            assert a_tok == full_a[fa : len(full_a) - ba]
            sents_b = corpus.sentences("train", info["b_shard"], info["b_doc"])
            full_b = _concat(sents_b, *info["b_sentences"])
            assert b_tok == full_b[fb : len(full_b) - bb]
            assert info["a_doc_id"] == corpus.doc_ids[("train", info["a_shard"])][info["a_doc"]]
            nsp = int(batch["next_sentence_label"][row])
            labels.append(nsp)
            if nsp == IS_NEXT:
                assert info["b_doc_id"] == info["a_doc_id"]
                assert info["b_sentences"][0] == info["a_sentences"][1], "IsNext B must start where A ends"
                checked_next += 1
            else:
                assert nsp == NOT_NEXT
                assert info["b_doc_id"] != info["a_doc_id"], "NotNext B must come from another document"
                checked_not += 1
    labels = np.array(labels)
    assert checked_next > 50 and checked_not > 50
    assert abs((labels == IS_NEXT).mean() - 0.5) < 0.08


def test_mlm_only_mode(corpus):
    ds = _stream(corpus, max_seq_len=48, nsp=False)
    n = ds.num_samples(0)
    pos = np.arange(n)
    batch = ds.batch_at(0, pos)
    assert (batch["next_sentence_label"] == IGNORE_INDEX).all()
    assert (batch["token_type_ids"] == 0).all()
    for row, info in enumerate(ds.describe(0, pos)):
        length = int(batch["attention_mask"][row].sum())
        lab = batch["labels"][row]
        orig = np.where(lab != IGNORE_INDEX, lab, batch["input_ids"][row])[:length]
        assert orig[0] == 2 and orig[-1] == 3 and (orig[1:-1] != 3).all()
        assert info["b_sentences"] is None
        fa, ba = info["truncated"][:2]
        full = _concat(corpus.sentences("train", info["a_shard"], info["a_doc"]), *info["a_sentences"])
        assert orig[1:-1].tolist() == full[fa : len(full) - ba]
        assert length <= 48


def test_samples_differ_by_epoch_and_seed(corpus):
    a = _stream(corpus, max_seq_len=64)
    b = _stream(corpus, max_seq_len=64, seed=7)
    x0 = a.batch_at(0, np.arange(20))
    x1 = a.batch_at(1, np.arange(20))
    y0 = b.batch_at(0, np.arange(20))
    assert not np.array_equal(x0["input_ids"], x1["input_ids"])
    assert not np.array_equal(x0["input_ids"], y0["input_ids"])
    again = _stream(corpus, max_seq_len=64).batch_at(0, np.arange(20))
    for k in ("input_ids", "labels", "token_type_ids", "next_sentence_label", "sample_ids"):
        assert np.array_equal(x0[k], again[k])


def test_whole_word_mask_on_corpus_uses_vocab(corpus):
    ds = _stream(corpus, max_seq_len=64, whole_word_mask=True)
    assert ds.is_continuation is not None and ds.is_continuation.sum() > 10
    batch = ds.batch_at(0, np.arange(min(200, ds.num_samples(0))))
    lab = batch["labels"]
    orig = np.where(lab != IGNORE_INDEX, lab, batch["input_ids"])
    sel = lab != IGNORE_INDEX
    cont = ds.is_continuation[orig] & (batch["attention_mask"] == 1)
    # a selected continuation piece's preceding piece is selected too (unless it is [CLS]/[SEP]:
    # truncation can leave a segment starting with a ## piece, which then starts a word)
    rows, cols = np.nonzero(sel & cont)
    prev_special = np.isin(orig[rows, cols - 1], [2, 3])
    assert (~prev_special).sum() > 0
    assert sel[rows, cols - 1][~prev_special].all()
