"""Small synthetic corpora for the streaming-loader tests, written directly with the shard writer.

Every sentence starts with a marker word ``d<doc>s<sentence>`` (global document number, sentence
number in the document), so decoded samples show where their text came from; tests mostly use
the exact token lists kept in :class:`FactoryCorpus` instead. Shard sizes are uneven on purpose
(the caller gives the number of documents of each shard). The tokenizer is a real WordPiece
model trained with HF ``tokenizers`` on the generated text (trained once per process and copied).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ptft_dist.corpus import format as sh

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
_SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "ber", "nal", "sto", "fe", "dru", "pha", "zen", "ol",
              "ix", "um", "gra", "tel", "sor"]
_TOKENIZERS: dict[tuple[int, int], Path] = {}


def _words(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))))
    return sorted(out)


def sentence_text(rng: random.Random, words: list[str], doc: int, sent: int, n_words: tuple[int, int]) -> str:
    return f"d{doc}s{sent} " + " ".join(rng.choice(words) for _ in range(rng.randint(*n_words))) + " ."


def train_tokenizer(vocab_size: int = 400, seed: int = 0) -> Path:
    """A WordPiece tokenizer dir (tokenizer.json, vocab.txt, tokenizer_config.json), cached per process."""
    key = (vocab_size, seed)
    if key in _TOKENIZERS and (_TOKENIZERS[key] / "tokenizer.json").is_file():
        return _TOKENIZERS[key]
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    rng = random.Random(seed)
    words = _words(seed)
    texts = [sentence_text(rng, words, d, s, (3, 12)) for d in range(60) for s in range(20)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(texts, trainer)
    out = Path(tempfile.mkdtemp(prefix="ptft-tok-"))
    tok.save(str(out / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast",
                                                           "do_lower_case": True}))
    _TOKENIZERS[key] = out
    return out


@dataclass
class FactoryCorpus:
    root: Path
    manifest: sh.Manifest
    # (split, shard index) -> list of documents, each a list of sentences (token id lists)
    docs: dict = field(default_factory=dict)
    doc_ids: dict = field(default_factory=dict)  # (split, shard index) -> list of doc ids
    vocab: list = field(default_factory=list)

    def shard_path(self, split: str, i: int) -> Path:
        return self.root / self.manifest.shards(split)[i].path

    def sentences(self, split: str, shard: int, doc: int) -> list[list[int]]:
        return self.docs[(split, shard)][doc]


def make_corpus(
    root: str | Path,
    shard_docs: Sequence[int] = (6, 1, 9, 3, 4),
    val_docs: Sequence[int] = (3, 2),
    *,
    seed: int = 0,
    sentences: tuple[int, int] = (1, 8),
    n_words: tuple[int, int] = (3, 12),
    vocab_size: int = 400,
    tokenizer_dir: Optional[Path] = None,
) -> FactoryCorpus:
    """Write a corpus with ``len(shard_docs)`` train shards of the given document counts."""
    from tokenizers import Tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_src = tokenizer_dir or train_tokenizer(vocab_size)
    tok_dst = root / sh.TOKENIZER_DIR
    if tok_dst.exists():
        shutil.rmtree(tok_dst)
    shutil.copytree(tok_src, tok_dst)
    tok = Tokenizer.from_file(str(tok_dst / "tokenizer.json"))
    vs = tok.get_vocab_size()
    rng = random.Random(seed)
    words = _words(0)
    fc = FactoryCorpus(root=root, manifest=None)  # type: ignore[arg-type]
    splits = {}
    gdoc = 0
    for split, counts in (("train", shard_docs), ("validation", val_docs)):
        w = sh.ShardWriter(root, split, "shard-00000", vs, target_bytes=1 << 40)
        for si, nd in enumerate(counts):
            docs, ids = [], []
            for _ in range(nd):
                texts = [sentence_text(rng, words, gdoc, s, n_words) for s in range(rng.randint(*sentences))]
                sents = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
                did = 10_000 + gdoc
                w.add(sents, did)
                docs.append(sents)
                ids.append(did)
                gdoc += 1
            w.flush()
            fc.docs[(split, si)] = docs
            fc.doc_ids[(split, si)] = ids
        splits[split] = [asdict(s) for s in w.close()]
    manifest = sh.Manifest(
        format_version=sh.FORMAT_VERSION,
        tokenizer_hash=sh.tokenizer_hash(tok_dst),
        vocab_size=vs,
        token_dtype=sh.token_dtype(vs).name,
        special_tokens=dict(SPECIAL_IDS),
        splits=splits,
        created_by="tests/corpus_factory.py",
    )
    sh.write_manifest(root, manifest)
    fc.manifest = manifest
    fc.vocab = (tok_dst / "vocab.txt").read_text().splitlines()
    return fc


def flip_byte(path: Path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_to_memory_fs(root: Path, url: str = "memory://corpus") -> str:
    """Copy a corpus dir into fsspec's in-process memory filesystem; returns its URL."""
    import fsspec

    fs = fsspec.filesystem("memory")
    base = url.split("://", 1)[1]
    if fs.exists(base):
        fs.rm(base, recursive=True)
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            fs.pipe(f"{base}/{p.relative_to(root).as_posix()}", p.read_bytes())
    return url
