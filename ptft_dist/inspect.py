"""``ptft inspect``: let a user read what the model will read.

Without ``--samples``: decoded documents sentence by sentence, and corpus statistics.
With ``--samples N`` / ``--ids``: training samples as the model sees them (stream.py's view).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ptft_dist.corpus.format import TOKENIZER_DIR, load_manifest, read_shard


def token_count_histogram(lengths: np.ndarray, bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) rows of a document-length histogram, for reports and ``ptft inspect``."""
    if len(lengths) == 0:
        return []
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, bins + 1)).astype(np.int64))
    if len(edges) < 2:
        return [(int(edges[0]), int(edges[0]), int(len(lengths)))]
    counts, edges = np.histogram(lengths, bins=edges)
    return [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]


def corpus_statistics(corpus_dir: str | Path, split: str = "train") -> dict:
    """Documents, sentences, tokens and a document-length histogram (tokens per document)."""
    root = Path(corpus_dir)
    manifest = load_manifest(root)
    doc_tokens = []
    sent_tokens = []
    for info in manifest.shards(split):
        data = read_shard(root / info.path)
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


def print_documents(corpus_dir: str | Path, n_docs: int, split: str = "train") -> None:
    from tokenizers import Tokenizer

    root = Path(corpus_dir)
    manifest = load_manifest(root)
    tok = Tokenizer.from_file(str(root / TOKENIZER_DIR / "tokenizer.json"))
    shown = 0
    for info in manifest.shards(split):
        data = read_shard(root / info.path)
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


def inspect_corpus(args: argparse.Namespace) -> None:
    if args.samples or args.ids:
        from ptft_dist.config import load_config
        from ptft_dist.inspect_samples import print_samples

        cfg = load_config(args.config, args.overrides)
        if args.seed is not None:
            cfg.data.seed = args.seed
        print_samples(args.corpus, cfg.data, args.samples or 0, args.epoch, args.world_size, args.rank,
                      ids_only=args.ids, split=args.split)
        return
    print_documents(args.corpus, args.docs, args.split)
    print_statistics(corpus_statistics(args.corpus, args.split))
