"""``ptft inspect``: let a user read what the model will read.

Without ``--samples``: decoded documents sentence by sentence, and corpus statistics.
With ``--samples N`` / ``--ids``: training samples exactly as the model sees them (the stream's
view: stream/dataset.py), masked positions marked, with where each segment came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, TextIO

import numpy as np

from ptft_dist.config import DataConfig, load_config
from ptft_dist.corpus.format import Manifest, load_manifest
from ptft_dist.corpus.tokenizer import load_tokenizer, load_vocab
from ptft_dist.stream.dataset import VALIDATION_SEED, PretrainingStream
from ptft_dist.stream.masking import IGNORE_INDEX
from ptft_dist.stream.samples import IS_NEXT, NOT_NEXT
from ptft_dist.stream.shard_cache import ShardCache

_NSP_NAMES = {IS_NEXT: "IsNext", NOT_NEXT: "NotNext", IGNORE_INDEX: "-"}


def inspect_corpus(args: argparse.Namespace) -> None:
    """``ptft inspect``: samples (``--samples``/``--ids``), else documents and statistics."""
    cfg = load_config(args.config, args.overrides, command="inspect")  # data.storage_options for every read
    if args.samples or args.ids:
        if args.seed is not None:
            cfg.data.seed = args.seed
        print_samples(args.corpus, cfg.data, args.samples or 0, args.epoch, args.world_size, args.rank,
                      ids_only=args.ids, split=args.split)
        return
    print_documents(args.corpus, args.docs, args.split, cfg.data)
    print_statistics(corpus_statistics(args.corpus, args.split, cfg.data))


# --------------------------------------------------------------------------- documents and statistics


def token_count_histogram(lengths: np.ndarray, bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) rows of a document-length histogram, for reports and ``ptft inspect``."""
    if len(lengths) == 0:
        return []
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, bins + 1)).astype(np.int64))
    if len(edges) < 2:
        return [(int(edges[0]), int(edges[0]), int(len(lengths)))]
    counts, edges = np.histogram(lengths, bins=edges)
    return [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]


def _shards(corpus: str | Path, data_cfg: Optional[DataConfig]) -> tuple[Manifest, ShardCache]:
    """The manifest and shard access of a local or remote corpus (``data.storage_options``, ``data.cache_dir``)."""
    data_cfg = data_cfg or DataConfig()
    manifest = load_manifest(corpus, data_cfg.storage_options)
    cache = ShardCache(str(corpus), cache_dir=data_cfg.cache_dir, storage_options=data_cfg.storage_options,
                       limit_bytes=int(data_cfg.cache_limit_gb * (1 << 30)), verify=data_cfg.verify_checksums)
    return manifest, cache


def corpus_statistics(corpus_dir: str | Path, split: str = "train", data_cfg: Optional[DataConfig] = None) -> dict:
    """Documents, sentences, tokens and a document-length histogram (tokens per document), from
    the shard indexes only (a range read each for a remote corpus)."""
    manifest, cache = _shards(corpus_dir, data_cfg)
    doc_tokens = []
    sent_tokens = []
    for info in manifest.shards(split):
        data = cache.read_index(info)
        sent_lens = data.sentence_lengths()
        sent_tokens.append(sent_lens)
        per_doc = np.add.reduceat(sent_lens, data.doc_offsets[:-1].astype(np.int64)) if data.num_docs else []
        doc_tokens.append(np.asarray(per_doc, dtype=np.int64))
    docs = np.concatenate(doc_tokens) if doc_tokens else np.zeros(0, np.int64)
    sents = np.concatenate(sent_tokens) if sent_tokens else np.zeros(0, np.int64)
    return {
        "split": split,
        "documents": int(len(docs)),
        "sentences": int(len(sents)),
        "tokens": int(docs.sum()),
        "tokens_per_document": {"mean": float(docs.mean()) if len(docs) else 0.0,
                                "median": float(np.median(docs)) if len(docs) else 0.0,
                                "max": int(docs.max()) if len(docs) else 0},
        "tokens_per_sentence_mean": float(sents.mean()) if len(sents) else 0.0,
        "histogram": token_count_histogram(docs),
    }


def print_documents(corpus_dir: str | Path, n_docs: int, split: str = "train",
                    data_cfg: Optional[DataConfig] = None) -> None:
    manifest, cache = _shards(corpus_dir, data_cfg)
    tok = load_tokenizer(str(corpus_dir), (data_cfg or DataConfig()).storage_options)
    shown = 0
    for info in manifest.shards(split):
        if shown >= n_docs:
            return
        data = cache.open(info)
        for d in range(data.num_docs):
            if shown >= n_docs:
                return
            sentences = data.document(d)
            print(f"── document {shown} ({info.path} #{d}, id {int(data.doc_ids[d]):016x}, "
                  f"{len(sentences)} sentences, {sum(len(s) for s in sentences)} tokens)")
            for i, s in enumerate(sentences):
                print(f"  [{i:>3}] {tok.decode(s.tolist())}")
            shown += 1


def print_statistics(stats: dict) -> None:
    print(f"── {stats['split']}: {stats['documents']:,} documents, {stats['sentences']:,} sentences, "
          f"{stats['tokens']:,} tokens")
    t = stats["tokens_per_document"]
    print(f"   tokens/document: mean {t['mean']:.1f}, median {t['median']:.0f}, max {t['max']:,}; "
          f"tokens/sentence: mean {stats['tokens_per_sentence_mean']:.1f}")
    rows = stats["histogram"]
    peak = max((c for _, _, c in rows), default=1) or 1
    for lo, hi, count in rows:
        print(f"   {lo:>7,}–{hi:<7,} {'█' * max(1, round(30 * count / peak)) if count else '':<30} {count:,}")


# --------------------------------------------------------------------------- samples


def _token(vocab: list[str], i: int) -> str:
    return vocab[i] if 0 <= i < len(vocab) and vocab[i] else f"<{i}>"


def _render(vocab: list[str], ids: np.ndarray, orig: np.ndarray, labels: np.ndarray) -> str:
    """WordPiece pieces joined into words; a predicted position shows ``input{original}``."""
    words: list[str] = []
    for t, o, lab in zip(ids.tolist(), orig.tolist(), labels.tolist()):
        piece = _token(vocab, t)
        if lab != IGNORE_INDEX:
            ref = _token(vocab, o)
            piece = f"{piece}{{{ref[2:] if ref.startswith('##') else ref}}}"
        if piece.startswith("##") and words and not (words[-1].startswith("[") and words[-1].endswith("]")):
            words[-1] += piece[2:]
        else:
            words.append(piece)
    return " ".join(words)


def rank_positions(ds: PretrainingStream, epoch: int, n: int) -> np.ndarray:
    """The first ``n`` epoch positions the stream's rank receives, in order (independent of batch size)."""
    total = ds.num_samples(epoch)
    pos = ds.rank + ds.world_size * np.arange(n, dtype=np.int64)
    return pos[pos < total]


def print_samples(
    corpus: str,
    data_cfg: DataConfig,
    n: int,
    epoch: int,
    world_size: int,
    rank: int,
    ids_only: bool,
    split: str = "train",
    out: Optional[TextIO] = None,
) -> None:
    """Print the first ``n`` samples rank ``rank`` of ``world_size`` receives in ``epoch``.

    ``ids_only``: one global sample id per line (the stable id that exactly-once is about).
    Otherwise: position, id, IsNext/NotNext, provenance, segment A | segment B decoded with the
    masked positions marked ``model input{original token}``. ``split="validation"`` shows the fixed
    validation stream (epoch and seed are those of ``stream.loader.build_validation_loader``).
    """
    out = out or sys.stdout
    ds = PretrainingStream(
        corpus, data_cfg, micro_batch_size=max(1, min(n, 64)), world_size=world_size, rank=rank, split=split,
        fixed_epoch=0 if split != "train" else None, seed=VALIDATION_SEED if split != "train" else None,
    )
    if split != "train":
        epoch = 0
    positions = rank_positions(ds, epoch, n)
    if ids_only:
        for s in range(0, len(positions), 256):
            for info in ds.describe(epoch, positions[s : s + 256]):
                print(info["sample_id"], file=out)
        return
    vocab = load_vocab(ds.corpus, data_cfg.storage_options)
    _print_header(ds, split, epoch, out)
    for s in range(0, len(positions), 64):
        pos = positions[s : s + 64]
        batch = ds.batch_at(epoch, pos)
        for row, info in enumerate(ds.describe(epoch, pos)):
            _print_sample(ds, vocab, s + row, info, {k: batch[k][row] for k in _ROW_KEYS}, out)


_ROW_KEYS = ("input_ids", "labels", "attention_mask", "token_type_ids")


def _print_header(ds: PretrainingStream, split: str, epoch: int, out: TextIO) -> None:
    rank, world_size = ds.rank, ds.world_size
    print(
        f"# {ds.corpus} [{split}] epoch {epoch} seed {ds.seed}: {ds.num_samples(epoch)} samples; "
        f"rank {rank}/{world_size} receives positions {rank}, {rank + world_size}, ...; "
        f"max_seq_len {ds.spec.max_seq_len}, {'NSP+MLM' if ds.spec.nsp else 'MLM only'}"
        f"{', packed rows' if ds.spec.pack_samples else ''}, "
        f"mask p={ds.spec.mlm_probability}{', whole words' if ds.spec.whole_word_mask else ''}",
        file=out,
    )
    print("# predicted positions are shown as model-input{original}", file=out)


def _print_chunks(shard_paths: list[str], vocab: list[str], parts: list[dict], ids: np.ndarray, orig: np.ndarray,
                  labels: np.ndarray, sep: int, out: TextIO) -> None:
    """A packed row: per chunk, where it came from and its ``[CLS] x [SEP]`` (a chunk ends at its [SEP])."""
    ends = (np.flatnonzero(ids == sep) + 1).tolist()
    for k, (part, start, end) in enumerate(zip(parts, [0, *ends[:-1]], ends)):
        s0, s1 = part["a_sentences"]
        cut = part["truncated"][:2]
        print(f"  chunk {k}: {shard_paths[part['a_shard']]} doc {part['a_doc']} (id {part['a_doc_id']:#x}) "
              f"sentences {s0}..{s1 - 1}" + (f", cut {cut[0]} front / {cut[1]} back" if any(cut) else ""), file=out)
        print(f"    {_render(vocab, ids[start:end], orig[start:end], labels[start:end])}", file=out)


def _print_sample(ds: PretrainingStream, vocab: list[str], index: int, info: dict, row: dict, out: TextIO) -> None:
    """One sample: a title line, where A and B came from, then A | B as the model reads them."""
    length = int(row["attention_mask"].sum())
    ids, labels, types = row["input_ids"][:length], row["labels"][:length], row["token_type_ids"][:length]
    orig = np.where(labels != IGNORE_INDEX, labels, ids)
    n_pred = int((labels != IGNORE_INDEX).sum())
    print(
        f"\n[{index}] position {info['position']}  sample id {info['sample_id']}  "
        f"{_NSP_NAMES.get(info['nsp_label'], info['nsp_label'])}  {length} tokens  {n_pred} predicted",
        file=out,
    )
    shard_paths = [s.path for s in ds.shards]
    if "parts" in info:  # packed rows: each chunk on its own lines
        _print_chunks(shard_paths, vocab, info["parts"], ids, orig, labels, ds.specials.sep, out)
        return
    tr = info["truncated"]
    for seg, cut in (("a", tr[:2]), ("b", tr[2:])):
        if info[f"{seg}_sentences"] is None:
            continue
        s0, s1 = info[f"{seg}_sentences"]
        print(
            f"  {seg.upper()}: {shard_paths[info[f'{seg}_shard']]} doc {info[f'{seg}_doc']} "
            f"(id {info[f'{seg}_doc_id']:#x}) sentences {s0}..{s1 - 1}"
            + (f", cut {cut[0]} front / {cut[1]} back" if cut[0] or cut[1] else ""),
            file=out,
        )
    is_sep = ids == ds.specials.sep
    first_sep = int(np.argmax(is_sep)) if is_sep.any() else length
    a_part = slice(0, first_sep + 1)
    print(f"  {_render(vocab, ids[a_part], orig[a_part], labels[a_part])}", file=out)
    seg_b = types == 1
    if not seg_b.any() and length > first_sep + 1:  # MLM-only: whatever follows the first [SEP]
        seg_b = np.arange(length) > first_sep
    if seg_b.any():
        print(f"  | {_render(vocab, ids[seg_b], orig[seg_b], labels[seg_b])}", file=out)
