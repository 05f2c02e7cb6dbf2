"""Shard format: round trip, dtype choice, index-only reads, corruption detection."""

import numpy as np
import pytest

from ptft_dist.corpus import format as sh


def _docs(rng, n_docs, vocab):
    return [[rng.integers(5, vocab, size=rng.integers(1, 30)).tolist() for _ in range(rng.integers(1, 6))]
            for _ in range(n_docs)]


@pytest.mark.parametrize("vocab", [1000, 65536, 70000])
def test_round_trip_exact(vocab):
    rng = np.random.default_rng(0)
    docs = _docs(rng, 40, vocab)
    blob = sh.encode_shard(docs, list(range(100, 140)), vocab)
    data = sh.decode_shard(blob)
    assert data.tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    assert data.num_docs == 40
    for d, doc in enumerate(docs):
        assert [s.tolist() for s in data.document(d)] == doc
    assert data.doc_ids.tolist() == list(range(100, 140))


def test_index_only_prefix_is_enough_to_plan():
    rng = np.random.default_rng(1)
    docs = _docs(rng, 10, 500)
    blob = sh.encode_shard(docs, list(range(10)), 500)
    header = sh.parse_header(blob)
    span = sh.index_span(header)
    assert span < len(blob)
    idx = sh.decode_shard(blob[:span], with_tokens=False)
    full = sh.decode_shard(blob)
    np.testing.assert_array_equal(idx.sentence_offsets, full.sentence_offsets)
    np.testing.assert_array_equal(idx.doc_offsets, full.doc_offsets)


def test_writer_rolls_over_and_manifest_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    w = sh.ShardWriter(tmp_path, "train", "shard-00000", 1000, target_bytes=400)
    for i, doc in enumerate(_docs(rng, 50, 1000)):
        w.add(doc, i)
    infos = w.close()
    assert len(infos) > 3
    assert sum(i.documents for i in infos) == 50
    for info in infos:
        assert sh.sha256_file(tmp_path / info.path) == info.sha256
        assert (tmp_path / info.path).stat().st_size == info.bytes
    assert not list(tmp_path.glob("train/.*tmp*"))


def test_corruption_is_named(tmp_path):
    blob = bytearray(sh.encode_shard([[[5, 6, 7]], [[8]]], [1, 2], 100))
    with pytest.raises(sh.CorpusError, match="bad magic"):
        sh.decode_shard(b"XXXXXXXX" + bytes(blob[8:]), "s.bin")
    with pytest.raises(sh.CorpusError, match="s.bin: truncated"):
        sh.decode_shard(bytes(blob[:-1]), "s.bin")
    with pytest.raises(sh.CorpusError, match="truncated"):
        sh.decode_shard(bytes(blob[:10]), "s.bin")


def test_load_manifest_errors(tmp_path):
    with pytest.raises(sh.CorpusError, match="not a corpus"):
        sh.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(sh.CorpusError, match="malformed manifest"):
        sh.load_manifest(tmp_path)
