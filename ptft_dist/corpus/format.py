"""The corpus on disk: shard files, the manifest, checksums. The only module that knows bytes.

A corpus directory::

    manifest.json            written last, atomically: the corpus exists iff this file does
    tokenizer/               HF tokenizer files (tokenizer.json, vocab.txt, ...)
    train/shard-00000-00000.bin ...
    validation/shard-...bin
    prepare_report.json, resolved_config.yaml

A shard file is self-contained and position-independent, laid out so that a reader can fetch
only the small index part (header + offsets) with one range request::

    b"PTFTSHRD" | u32 format version | u32 header length | header JSON | pad to 64
    doc_offsets      uint32[n_docs + 1]       document d = sentences [doc_offsets[d], doc_offsets[d+1])
    sentence_offsets uint32[n_sentences + 1]  sentence s = tokens [sentence_offsets[s], ...[s+1])
    doc_ids          uint64[n_docs]           stable id of each document (hash of its text)
    tokens           uint16|uint32[n_tokens]  token ids, no special tokens

All integers little-endian. Sections start on 64-byte boundaries.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ptft_dist.corpus.storage import is_remote, missing_backend_hint
from ptft_dist.errors import UserError
from ptft_dist.fsutil import sha256_file, write_bytes_atomic, write_text_atomic

MAGIC = b"PTFTSHRD"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
_ALIGN = 64
_PREAMBLE = struct.Struct("<8sII")
_SECTIONS = ("doc_offsets", "sentence_offsets", "doc_ids", "tokens")


class CorpusError(UserError, RuntimeError):
    """A corpus that is missing, malformed or fails its checksums; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# --------------------------------------------------------------------------- shard bytes


@dataclass
class ShardData:
    """The arrays of one shard (in memory or memory-mapped)."""

    doc_offsets: np.ndarray
    sentence_offsets: np.ndarray
    doc_ids: np.ndarray
    tokens: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sentence(self, s: int) -> np.ndarray:
        return self.tokens[self.sentence_offsets[s] : self.sentence_offsets[s + 1]]

    def document(self, d: int) -> list[np.ndarray]:
        return [self.sentence(s) for s in range(self.doc_offsets[d], self.doc_offsets[d + 1])]

    def sentence_lengths(self) -> np.ndarray:
        return np.diff(self.sentence_offsets.astype(np.int64))


def encode_shard(
    documents: Sequence[Sequence[Sequence[int]]] | None = None,
    doc_ids: Sequence[int] | None = None,
    vocab_size: int = 30522,
    *,
    arrays: Optional[ShardData] = None,
) -> bytes:
    """Serialise documents (lists of sentences of token ids) or ready arrays into shard bytes."""
    if arrays is None:
        assert documents is not None and doc_ids is not None
        arrays = build_arrays(documents, doc_ids, vocab_size)
    dtype = token_dtype(vocab_size)
    parts = {
        "doc_offsets": np.ascontiguousarray(arrays.doc_offsets, dtype="<u4"),
        "sentence_offsets": np.ascontiguousarray(arrays.sentence_offsets, dtype="<u4"),
        "doc_ids": np.ascontiguousarray(arrays.doc_ids, dtype="<u8"),
        "tokens": np.ascontiguousarray(arrays.tokens, dtype=dtype.newbyteorder("<")),
    }
    # Header first with placeholder offsets to learn its length, then fill in real offsets.
    header = {
        "token_dtype": dtype.name,
        "num_docs": int(len(parts["doc_offsets"]) - 1),
        "num_sentences": int(len(parts["sentence_offsets"]) - 1),
        "num_tokens": int(len(parts["tokens"])),
        "sections": {k: [0, 0] for k in _SECTIONS},
    }
    for _ in range(2):  # offsets change header length at most once
        blob = json.dumps(header, sort_keys=True).encode()
        pos = _align(_PREAMBLE.size + len(blob))
        for name in _SECTIONS:
            nbytes = parts[name].nbytes
            header["sections"][name] = [pos, nbytes]
            pos = _align(pos + nbytes)
    blob = json.dumps(header, sort_keys=True).encode()
    out = bytearray(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(blob)) + blob)
    for name in _SECTIONS:
        start, _ = header["sections"][name]
        out.extend(b"\0" * (start - len(out)))
        out.extend(parts[name].tobytes())
    return bytes(out)


def build_arrays(
    documents: Sequence[Sequence[Sequence[int]]], doc_ids: Sequence[int], vocab_size: int
) -> ShardData:
    sent_lens = [len(s) for doc in documents for s in doc]
    doc_offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(doc) for doc in documents], out=doc_offsets[1:])
    sentence_offsets = np.zeros(len(sent_lens) + 1, dtype=np.int64)
    np.cumsum(sent_lens, out=sentence_offsets[1:])
    if sentence_offsets[-1] >= 2**32:
        raise ValueError("shard too large: more than 2^32 tokens")
    flat = [t for doc in documents for s in doc for t in s]
    tokens = np.asarray(flat, dtype=np.int64)
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token id out of range for vocab size {vocab_size}")
    return ShardData(doc_offsets, sentence_offsets, np.asarray(doc_ids, dtype=np.uint64), tokens)


def parse_header(blob: bytes, name: str = "<shard>") -> dict:
    """Parse the preamble + header JSON from the first bytes of a shard."""
    if len(blob) < _PREAMBLE.size:
        raise CorpusError(f"{name}: truncated shard (no header)")
    magic, version, hlen = _PREAMBLE.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorpusError(f"{name}: not a ptft shard (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorpusError(f"{name}: shard format version {version}, this ptft reads {FORMAT_VERSION}")
    if len(blob) < _PREAMBLE.size + hlen:
        raise CorpusError(f"{name}: truncated shard (header cut short)")
    try:
        header = json.loads(blob[_PREAMBLE.size : _PREAMBLE.size + hlen])
    except ValueError:
        raise CorpusError(f"{name}: corrupt shard header") from None
    return header


def index_span(header: dict) -> int:
    """Bytes from the file start to the end of the offsets + doc_ids sections (no tokens)."""
    start, nbytes = header["sections"]["doc_ids"]
    return start + nbytes


def decode_shard(buf: bytes | memoryview | np.ndarray, name: str = "<shard>", with_tokens: bool = True) -> ShardData:
    """View shard bytes as arrays (zero-copy). ``with_tokens=False`` accepts an index-only prefix."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf.view(np.uint8))
    header = parse_header(bytes(mv[: min(len(mv), 1 << 16)]), name)
    need = sum(header["sections"]["tokens"]) if with_tokens else index_span(header)
    if len(mv) < need:
        raise CorpusError(f"{name}: truncated shard ({len(mv)} bytes, expected at least {need})")
    dtypes = {"doc_offsets": "<u4", "sentence_offsets": "<u4", "doc_ids": "<u8",
              "tokens": np.dtype(header["token_dtype"]).newbyteorder("<")}
    arrays = {}
    for sec in _SECTIONS:
        if sec == "tokens" and not with_tokens:
            arrays[sec] = np.zeros(0, dtype=dtypes[sec])
            continue
        start, nbytes = header["sections"][sec]
        arrays[sec] = np.frombuffer(mv[start : start + nbytes], dtype=dtypes[sec])
    data = ShardData(**arrays)
    _check_structure(data, header, name, with_tokens)
    return data


def _check_structure(data: ShardData, header: dict, name: str, with_tokens: bool) -> None:
    if data.num_docs != header["num_docs"] or data.num_sentences != header["num_sentences"]:
        raise CorpusError(f"{name}: section sizes disagree with header")
    if data.doc_offsets[0] != 0 or data.doc_offsets[-1] != data.num_sentences:
        raise CorpusError(f"{name}: document offsets do not cover the sentences")
    if data.sentence_offsets[0] != 0 or data.sentence_offsets[-1] != header["num_tokens"]:
        raise CorpusError(f"{name}: sentence offsets do not cover the tokens")
    if with_tokens and data.num_tokens != header["num_tokens"]:
        raise CorpusError(f"{name}: token section size disagrees with header")
    if np.any(np.diff(data.doc_offsets.astype(np.int64)) < 0) or np.any(
        np.diff(data.sentence_offsets.astype(np.int64)) < 0
    ):
        raise CorpusError(f"{name}: offsets are not monotonic")


def read_shard(path: str | Path, mmap: bool = True) -> ShardData:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: shard file missing")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if mmap and path.stat().st_size else path.read_bytes()
    return decode_shard(buf, str(path))


# --------------------------------------------------------------------------- writer


@dataclass
class ShardInfo:
    path: str  # relative to the corpus directory
    bytes: int
    sha256: str
    documents: int
    sentences: int
    tokens: int


class ShardWriter:
    """Accumulates documents and rolls over to a new shard file at a target size.

    Files are written under a temporary name and renamed when complete, so a crash leaves
    no file that looks finished.
    """

    def __init__(self, corpus_dir: str | Path, split: str, prefix: str, vocab_size: int, target_bytes: int):
        self.root = Path(corpus_dir)
        self.split = split
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.target_tokens = max(1, target_bytes // token_dtype(vocab_size).itemsize)
        self.shards: list[ShardInfo] = []
        self._docs: list[list[list[int]]] = []
        self._ids: list[int] = []
        self._ntok = 0
        (self.root / split).mkdir(parents=True, exist_ok=True)

    def add(self, sentences: list[list[int]], doc_id: int) -> None:
        if not sentences:
            return
        self._docs.append(sentences)
        self._ids.append(doc_id)
        self._ntok += sum(len(s) for s in sentences)
        if self._ntok >= self.target_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        rel = f"{self.split}/{self.prefix}-{len(self.shards):05d}.bin"
        path = self.root / rel
        blob = encode_shard(self._docs, self._ids, self.vocab_size)
        write_bytes_atomic(path, blob)
        self.shards.append(
            ShardInfo(
                path=rel,
                bytes=len(blob),
                sha256=hashlib.sha256(blob).hexdigest(),
                documents=len(self._docs),
                sentences=sum(len(d) for d in self._docs),
                tokens=self._ntok,
            )
        )
        self._docs, self._ids, self._ntok = [], [], 0

    def close(self) -> list[ShardInfo]:
        self.flush()
        return self.shards


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    format_version: int
    tokenizer_hash: str
    vocab_size: int
    token_dtype: str
    special_tokens: dict  # name -> id: pad, unk, cls, sep, mask
    splits: dict  # split -> list[ShardInfo as dict]
    config_hash: str = ""
    created_by: str = "ptft prepare"
    extra: dict = field(default_factory=dict)

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise CorpusError(f"manifest has no split '{split}' (has: {', '.join(self.splits)})")
        return [ShardInfo(**s) for s in self.splits[split]]

    def totals(self, split: str) -> dict:
        shards = self.shards(split)
        return {k: sum(getattr(s, k) for s in shards) for k in ("documents", "sentences", "tokens", "bytes")}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def write_manifest(corpus_dir: str | Path, manifest: Manifest) -> Path:
    path = Path(corpus_dir) / MANIFEST_NAME
    write_text_atomic(path, manifest.to_json())
    return path


def load_manifest(corpus_dir: str | Path, storage_options: Optional[dict] = None) -> Manifest:
    """Load a local or remote (fsspec URL) manifest with a clear error for each way it can fail.

    ``storage_options``: fsspec options for a remote corpus (credentials, endpoints: ``data.storage_options``).
    """
    import fsspec

    url = f"{str(corpus_dir).rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fsspec.open(url, "rt", **(storage_options or {})) as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorpusError(f"{corpus_dir}: not a corpus (no {MANIFEST_NAME}; did `ptft prepare` finish?)") from None
    except ImportError as exc:  # s3:// without s3fs, gs:// without gcsfs
        raise CorpusError(missing_backend_hint(url, exc)) from None
    except Exception as exc:  # remote errors come in many classes
        raise CorpusError(f"{url}: cannot read manifest: {exc}") from None
    try:
        data = json.loads(raw)
        manifest = Manifest(**data)
    except (ValueError, TypeError) as exc:
        raise CorpusError(f"{url}: malformed manifest: {exc}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise CorpusError(f"{url}: corpus format {manifest.format_version}, this ptft reads {FORMAT_VERSION}")
    return manifest


def verify_corpus(corpus_dir: str | Path, progress: bool = False) -> list[str]:
    """Re-check every shard's size, checksum and structure. Returns a list of problems (empty = ok)."""
    if is_remote(str(corpus_dir)):
        raise CorpusError(f"{corpus_dir}: `ptft verify` checks a local corpus; a remote one is checked shard by shard "
                          "as the stream downloads it (size and sha256 against the manifest)")
    root = Path(corpus_dir)
    manifest = load_manifest(root)
    problems: list[str] = []
    tok_dir = root / TOKENIZER_DIR
    if not (tok_dir / "tokenizer.json").is_file():
        problems.append(f"{tok_dir}: tokenizer missing")
    elif tokenizer_hash(tok_dir) != manifest.tokenizer_hash:
        problems.append(f"{tok_dir}: tokenizer hash differs from manifest")
    items: list[ShardInfo] = [s for split in manifest.splits for s in manifest.shards(split)]
    iterator: Iterable[ShardInfo] = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="verify", unit="shard")
    for info in iterator:
        path = root / info.path
        if not path.is_file():
            problems.append(f"{info.path}: missing")
            continue
        size = path.stat().st_size
        if size != info.bytes:
            problems.append(f"{info.path}: size {size} bytes, manifest says {info.bytes} (truncated?)")
            continue
        if sha256_file(path) != info.sha256:
            problems.append(f"{info.path}: checksum mismatch (corrupted)")
            continue
        try:
            data = read_shard(path)
        except CorpusError as exc:
            problems.append(str(exc))
            continue
        counts = (data.num_docs, data.num_sentences, data.num_tokens)
        if counts != (info.documents, info.sentences, info.tokens):
            problems.append(f"{info.path}: counts {counts} disagree with manifest")
        elif data.num_tokens and int(data.tokens.max()) >= manifest.vocab_size:
            problems.append(f"{info.path}: token id beyond vocab size {manifest.vocab_size}")
        elif data.num_tokens and "pad" in manifest.special_tokens and (data.tokens == manifest.special_tokens["pad"]).any():
            # ptft before 2026-11-30 kept a tokenizer.json's own padding (MiniLM's: Fixed 128)
            problems.append(f"{info.path}: the text holds [PAD] tokens (prepared with a tokenizer that pads "
                            "every sentence?): prepare the corpus again")
    return problems


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """Hash of what decides token ids: the tokenizer.json model, normalizer and pre-tokenizer."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    keep = {k: data.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
