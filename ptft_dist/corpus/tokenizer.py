"""The corpus tokenizer: trained WordPiece (HF ``tokenizers``) or an adopted HF tokenizer directory.

Whatever its origin, the tokenizer is saved as a plain Hugging Face tokenizer directory inside
the corpus, so it travels unchanged into checkpoints and exported models. Readers of a corpus
(the stream, ``ptft inspect``) get its vocabulary back with :func:`load_vocab` and refuse a corpus
tokenized differently from what the run expects with :func:`check_tokenizer`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from ptft_dist.config import TokenizerConfig
from ptft_dist.corpus.format import TOKENIZER_DIR, CorpusError, Manifest, tokenizer_hash
from ptft_dist.corpus.inputs import InputError
from ptft_dist.corpus.storage import StorageError, copy_folder, join
from ptft_dist.fsutil import remove_tree

_HASH = re.compile(r"[0-9a-f]{16}")
# What `save_pretrained` writes for the tokenizers a corpus holds: copied by name from stores that
# cannot list a folder (plain HTTP)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, cfg: TokenizerConfig) -> None:
    """BERT-style WordPiece: BERT normaliser and pre-tokenizer, [CLS] A [SEP] B [SEP] template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from ptft_dist.corpus.pii import PLACEHOLDERS  # one token each, so scrubbed text stays readable to the model

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=cfg.lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
        continuing_subword_prefix="##", show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() <= len(specials):
        raise InputError("tokenizer training saw no text (is the cleaned corpus empty?)")
    tok.add_tokens([AddedToken(p, normalized=False, single_word=False) for p in PLACEHOLDERS.values()])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    save_hf_tokenizer(tok, out_dir, lowercase=cfg.lowercase)


def save_hf_tokenizer(tok, out_dir: str | Path, lowercase: bool = True) -> None:
    """Wrap a ``tokenizers.Tokenizer`` as a BERT fast tokenizer and ``save_pretrained`` it."""
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    kwargs = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    try:
        hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, **kwargs)
    except (TypeError, ValueError):  # older/newer transformers differ in what they accept
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    vocab = out / "vocab.txt"
    if not vocab.exists():  # keep a vocab.txt: slow-tokenizer users and whole-word masking read it
        inv = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        vocab.write_text("".join(t + "\n" for t, _ in inv))


def adopt_tokenizer(path: str | Path, out_dir: str | Path) -> None:
    """Copy an existing HF (fast) tokenizer directory into the corpus (a model's own: WordPiece,
    byte-level BPE, Unigram), checking it names the special tokens a sample is framed and masked
    with (BERT's ``[CLS]``/``[SEP]``/``[MASK]``, RoBERTa's ``<s>``/``</s>``/``<mask>``, ...)."""
    from transformers import AutoTokenizer

    src = Path(path)
    if not src.is_dir():
        raise InputError(f"prepare.tokenizer.path: {src} is not a directory")
    try:
        hf = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    except Exception as exc:
        raise InputError(f"prepare.tokenizer.path: {src}: cannot load tokenizer ({exc})") from None
    if not getattr(hf, "is_fast", False):
        raise InputError(f"prepare.tokenizer.path: {src}: needs a fast tokenizer (tokenizer.json)")
    _special_roles(hf, f"prepare.tokenizer.path: {src}")
    hf.save_pretrained(str(out_dir))
    if not (Path(out_dir) / "tokenizer.json").exists():
        hf.backend_tokenizer.save(str(Path(out_dir) / "tokenizer.json"))


def _special_roles(hf, where: str) -> dict[str, int]:
    """pad/unk/cls/sep/mask ids as the tokenizer names them (cls/sep fall back to bos/eos); unk may
    be absent (byte-level BPE needs none)."""
    roles = {"pad": hf.pad_token_id, "unk": hf.unk_token_id,
             "cls": hf.cls_token_id if hf.cls_token_id is not None else hf.bos_token_id,
             "sep": hf.sep_token_id if hf.sep_token_id is not None else hf.eos_token_id,
             "mask": hf.mask_token_id}
    vocab = hf.get_vocab()
    for name, i in roles.items():  # a bare tokenizer.json: BERT's names, if it has them
        if i is None and SPECIAL_TOKENS[name] in vocab:
            roles[name] = vocab[SPECIAL_TOKENS[name]]
    missing = [f"{name} ({SPECIAL_TOKENS[name]})" for name, i in roles.items() if i is None and name != "unk"]
    if missing:
        raise InputError(f"{where}: the tokenizer defines no {', '.join(missing)} token; a sample is framed as "
                         "CLS text SEP and masked with MASK, padded with PAD (set them in its tokenizer_config.json)")
    return {k: int(v) for k, v in roles.items() if v is not None}


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """The corpus manifest's ``special_tokens``: the roles (pad, unk, cls, sep, mask) and then every
    other special token by name, none of which is ever masked or drawn as a random replacement."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=True)
    ids = _special_roles(hf, str(tokenizer_dir))
    for token, i in zip(hf.all_special_tokens, hf.all_special_ids):
        if i is not None and i not in ids.values():
            ids[token] = int(i)
    return ids


def vocab_size(tokenizer_dir: str | Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


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
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    if not isinstance(vocab, dict) or not vocab:
        raise CorpusError(f"{base}/tokenizer.json: no vocabulary in it")
    out: list[str] = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        out[i] = tok
    for t in data.get("added_tokens", []):
        if t["id"] >= len(out):
            out.extend([""] * (t["id"] + 1 - len(out)))
        out[t["id"]] = t["content"]
    return out


def word_boundary_rule(corpus: str, storage_options: Optional[dict] = None) -> Optional[tuple[str, bool]]:
    """How the corpus tokenizer marks words, for whole-word masking: ``(marker, marks_start)``.

    WordPiece marks continuation pieces (``##``: ``marks_start`` False); byte-level BPE (RoBERTa,
    ModernBERT) and SentencePiece-style Metaspace tokenizers (XLM-R) mark the piece that starts a word
    (``Ġ``, ``▁``: True). None when the tokenizer marks neither (whole words cannot be found)."""
    import fsspec

    url = join(corpus, TOKENIZER_DIR, "tokenizer.json")
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"{url}: missing") from None
    model = data.get("model") or {}
    if model.get("type") == "WordPiece":
        return model.get("continuing_subword_prefix") or "##", False
    for pre in _pre_tokenizers(data.get("pre_tokenizer")):
        if pre.get("type") == "ByteLevel":
            return "\u0120", True  # Ġ: the byte-level image of a space
        if pre.get("type") == "Metaspace":
            return pre.get("replacement") or "\u2581", True
    if model.get("continuing_subword_prefix"):
        return model["continuing_subword_prefix"], False
    return None


def _pre_tokenizers(pre: Optional[dict]) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for child in pre.get("pretokenizers", []) for p in _pre_tokenizers(child)]
    return [pre]


def expected_tokenizer_hash(expected: str) -> str:
    """``data.expected_tokenizer`` as a hash: a hash as written in manifest.json (16 hex digits), or
    the hash of a tokenizer directory (one holding tokenizer.json, or a corpus / run directory
    holding tokenizer/tokenizer.json)."""
    path = Path(expected).expanduser()
    for tok_dir in (path, path / TOKENIZER_DIR):
        if (tok_dir / "tokenizer.json").is_file():
            return tokenizer_hash(tok_dir)
    if path.is_dir():
        raise CorpusError(f"data.expected_tokenizer: {expected} holds no tokenizer.json (nor tokenizer/tokenizer.json)")
    if not _HASH.fullmatch(expected):
        raise CorpusError(f"data.expected_tokenizer: {expected!r} is neither a tokenizer directory nor a tokenizer "
                          "hash (16 hex digits, the tokenizer_hash of a corpus manifest.json)")
    return expected


def check_tokenizer(manifest: Manifest, expected: Optional[str], corpus: str) -> None:
    """Refuse a corpus whose tokenizer differs from the one the run is pinned to
    (``data.expected_tokenizer``: a hash or a tokenizer directory), naming both hashes."""
    if not expected:
        return
    want = expected_tokenizer_hash(expected)
    if want != manifest.tokenizer_hash:
        raise CorpusError(
            f"{corpus}: corpus was tokenized with tokenizer {manifest.tokenizer_hash}, but this run expects "
            f"tokenizer {want} (data.expected_tokenizer{f'={expected}' if want != expected else ''}); re-run "
            "`ptft prepare` with that tokenizer (prepare.tokenizer.path) or point the run at a matching corpus"
        )


def copy_tokenizer(corpus: str, dest: str | Path, storage_options: Optional[dict] = None,
                   expected_hash: Optional[str] = None) -> Path:
    """CORPUS/tokenizer (local or remote, read with ``storage_options``) copied into ``dest``, which
    appears whole or not at all; with ``expected_hash``, a copy that does not hash to the manifest's
    tokenizer is refused (the export would otherwise ship the wrong vocabulary)."""
    src = join(corpus, TOKENIZER_DIR)
    try:
        copy_folder(src, dest, storage_options, known=TOKENIZER_FILES, required="tokenizer.json")
    except StorageError as exc:
        raise CorpusError(f"cannot copy the corpus tokenizer: {exc}") from None
    got = tokenizer_hash(dest)
    if expected_hash and got != expected_hash:
        remove_tree(dest)
        raise CorpusError(f"{src}: tokenizer hashes to {got}, the corpus manifest says {expected_hash} "
                          "(tokenizer/ replaced after `ptft prepare`?)")
    return Path(dest)


def load_tokenizer(corpus: str, storage_options: Optional[dict] = None):
    """The corpus tokenizer (``tokenizers.Tokenizer``) from CORPUS/tokenizer/tokenizer.json, local or remote."""
    import fsspec
    from tokenizers import Tokenizer

    url = join(corpus, TOKENIZER_DIR, "tokenizer.json")
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
            return Tokenizer.from_str(f.read())
    except FileNotFoundError:
        raise CorpusError(f"{url}: missing") from None
