"""``ptft prepare`` with a model's own tokenizer (``prepare.tokenizer.path``): WordPiece (BERT),
byte-level BPE (RoBERTa, ModernBERT), Unigram/SentencePiece (XLM-R), built locally with
``tokenizers``. Special tokens come from the tokenizer; masking respects its word boundaries,
never masks a special token and never draws one as a random replacement; vocabularies above
65,535 tokens are stored as uint32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ptft_dist.cli import main
from ptft_dist.corpus import format as sh
from ptft_dist.corpus.tokenizer import word_boundary_rule
from ptft_dist.stream.dataset import PretrainingStream
from tests.arch_factory import build_tokenizer, save_tokenizer, texts
from tests.stream.test_dataset import cfg_for

FAST = ["prepare.workers=1", "prepare.validation_fraction=0.1"]


def _inputs(tmp: Path, docs: list[str]) -> Path:
    path = tmp / "in.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _prepare(tmp: Path, tok_dir: Path, docs: list[str]) -> Path:
    out = tmp / "corpus"
    assert main(["prepare", "-i", str(_inputs(tmp, docs)), "-o", str(out), *FAST,
                 f"prepare.tokenizer.path={tok_dir}"]) == 0
    return out


@pytest.fixture(scope="module", params=["wordpiece", "bpe", "unigram"])
def prepared(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"tok_{kind}")
    tok, specials = build_tokenizer(kind, vocab_size=300)  # small: words split into pieces
    tok_dir = save_tokenizer(tok, specials, tmp / "tok")
    docs = [d.replace("\n\n", "\n") for d in texts(120, seed=5)]
    return kind, tok, specials, _prepare(tmp, tok_dir, docs), docs


def test_manifest_takes_the_specials_from_the_tokenizer(prepared):
    kind, tok, specials, corpus, docs = prepared
    m = sh.load_manifest(corpus)
    roles = {"pad": "pad_token", "unk": "unk_token", "cls": "cls_token", "sep": "sep_token", "mask": "mask_token"}
    for role, key in roles.items():
        assert m.special_tokens[role] == tok.token_to_id(specials[key]), role
    if kind != "wordpiece":
        assert (m.special_tokens["cls"], m.special_tokens["sep"], m.special_tokens["pad"]) == (0, 2, 1)  # <s> </s> <pad>
    assert m.token_dtype == "uint16"
    # the shards hold the tokenizer's own ids for the text, no special token among them
    first = sh.read_shard(corpus / m.shards("train")[0].path)
    ids = np.concatenate([first.document(d)[0] for d in range(first.num_docs)])
    assert not set(ids.tolist()) & set(m.special_tokens.values())
    decoded = tok.decode(first.document(0)[0].tolist())
    assert any(decoded.strip().lower() in " ".join(d.split()).lower() for d in docs), decoded


def _originals(batch) -> np.ndarray:
    labels, ids = batch["labels"], batch["input_ids"]
    return np.where(labels != -100, labels, ids)


def test_masking_respects_the_tokenizer(prepared):
    kind, tok, specials, corpus, _ = prepared
    marker, marks_start = word_boundary_rule(str(corpus))
    assert (marker, marks_start) == {"wordpiece": ("##", False), "bpe": ("Ġ", True), "unigram": ("▁", True)}[kind]
    m = sh.load_manifest(corpus)
    special = set(m.special_tokens.values())
    vocab = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    ds = PretrainingStream(cfg=cfg_for(corpus, nsp=False, whole_word_mask=True, max_seq_len=48, mlm_probability=0.2),
                           micro_batch_size=8)
    masked = random = joined = 0
    for batch in ds.iter_numpy():
        orig, labels, ids = _originals(batch), batch["labels"], batch["input_ids"]
        lengths = batch["attention_mask"].sum(1)
        for row in range(len(orig)):
            n = int(lengths[row])
            if n == 0:
                continue
            assert orig[row, 0] == m.special_tokens["cls"] and orig[row, n - 1] == m.special_tokens["sep"]
            chosen = np.nonzero(labels[row] != -100)[0]
            assert not set(orig[row, chosen].tolist()) & special  # never a special token
            replaced = chosen[(ids[row, chosen] != m.special_tokens["mask"]) & (ids[row, chosen] != labels[row, chosen])]
            assert not set(ids[row, replaced].tolist()) & special  # random picks are real tokens
            masked, random = masked + len(chosen), random + len(replaced)
            for i in range(1, n - 1):  # a word is masked whole: a continuation piece shares its word's fate
                piece = vocab[int(orig[row, i])]
                cont = (not piece.startswith(marker)) if marks_start else piece.startswith(marker)
                if cont and orig[row, i - 1] not in special and int(orig[row, i]) not in special:
                    assert (labels[row, i] != -100) == (labels[row, i - 1] != -100), (row, i, piece)
                    joined += 1
    assert masked > 200 and random > 5 and joined > 50, (masked, random, joined)


def test_a_vocabulary_above_65535_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    docs = texts(60, seed=7)
    real = sorted({w for d in docs for w in d.lower().replace(".", " . ").replace(",", " , ").replace("!", " ! ")
                   .replace("?", " ? ").replace("'", " ' ").split()})
    filler = [f"zz{i}" for i in range(70_000 - len(real))]  # the text's words get ids above 65,535
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *filler, *real])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok_dir = save_tokenizer(tok, dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                                       mask_token="[MASK]"), tmp_path / "tok")
    corpus = _prepare(tmp_path, tok_dir, docs)
    m = sh.load_manifest(corpus)
    assert m.vocab_size == 70_005 and m.special_tokens["cls"] == 2 and m.token_dtype == "uint32"
    data = sh.read_shard(corpus / m.shards("train")[0].path)
    assert data.tokens.dtype == np.dtype("<u4") and int(data.tokens.max()) > 65_535
    batch = next(PretrainingStream(cfg=cfg_for(corpus, nsp=False), micro_batch_size=4).iter_numpy())
    assert int(_originals(batch).max()) > 65_535  # ids above 65,535 reach the model intact


def test_a_tokenizer_that_pads_and_truncates_is_stored_whole_and_unpadded(tmp_path):
    """sentence-transformers ship MiniLM's tokenizer.json with Fixed(128) padding and truncation at 128:
    prepare used to store every sentence padded with [PAD] to 128 tokens (and cut longer ones)."""
    tok, specials = build_tokenizer("wordpiece", vocab_size=300)
    plain_dir = save_tokenizer(tok, specials, tmp_path / "plain")
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=48)
    tok.enable_truncation(max_length=6)
    padded_dir = save_tokenizer(tok, specials, tmp_path / "padded")
    assert json.loads((padded_dir / "tokenizer.json").read_text())["padding"]["strategy"] == {"Fixed": 48}
    docs = [d.replace("\n\n", "\n") for d in texts(40, seed=9)]
    shards = []
    for name, tok_dir in (("plain", plain_dir), ("padded", padded_dir)):
        (tmp_path / name / "in").mkdir(parents=True)
        corpus = _prepare(tmp_path / name / "in", tok_dir, docs)
        m = sh.load_manifest(corpus)
        shards.append([sh.read_shard(corpus / s.path).tokens for s in m.shards("train")])
    plain, padded = (np.concatenate(t) for t in shards)
    assert np.array_equal(padded, plain)  # no [PAD] in the text, nothing cut at 6 tokens
    assert int(np.diff(sh.read_shard(corpus / m.shards("train")[0].path).sentence_offsets).max()) > 6


def test_verify_names_a_corpus_whose_text_holds_pad_tokens(tmp_path):
    """A corpus prepared before the fix above (its sentences padded with [PAD]) fails ``ptft verify``."""
    from tests.corpus_factory import make_corpus

    tok, specials = build_tokenizer("wordpiece", vocab_size=300)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=48)
    padded_dir = save_tokenizer(tok, specials, tmp_path / "padded")
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (padded_dir / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab))
    make_corpus(tmp_path / "old", shard_docs=(2,), val_docs=(1,), tokenizer_dir=padded_dir)
    problems = sh.verify_corpus(tmp_path / "old")
    assert problems and all("holds [PAD] tokens" in p for p in problems), problems
    make_corpus(tmp_path / "new", shard_docs=(2,), val_docs=(1,))
    assert sh.verify_corpus(tmp_path / "new") == []
