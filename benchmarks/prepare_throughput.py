"""Corpus preparation throughput vs Hugging Face ``datasets`` on the same input, in the same run.

Measures (wall clock, MB of raw text per second, and per core):
  * ``pipeline``: the whole ``ptft prepare`` (clean, PII, exact + MinHash dedup, sentences,
    WordPiece training, tokenize, shards) with N worker processes;
  * ``tokenize``: sentence split + tokenize + write shards (ptft's encode stage) with N processes,
    against ``load_dataset("json").map(tokenizer, batched=True, num_proc=N)`` with the same fast
    tokenizer (the peer: what ``run_mlm.py`` does), both from the same JSONL file.

Prints one JSON object; ``ratio`` > 1 means ptft is faster.

    python benchmarks/prepare_throughput.py [--input news.jsonl] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _default_input(work: Path) -> Path:
    from ptft_dist.demo.data import fetch_demo_data

    fetch_demo_data(work / "demo")
    return work / "demo" / "news" / "news_articles.jsonl"


def bench_pipeline(src: Path, out: Path, workers: int, vocab: int) -> float:
    from ptft_dist.config import load_config
    from ptft_dist.corpus.prepare import prepare

    cfg = load_config(None, [f"prepare.workers={workers}", f"prepare.tokenizer.vocab_size={vocab}"])
    t0 = time.perf_counter()
    prepare([str(src)], out, cfg, overwrite=True)
    return time.perf_counter() - t0


def bench_ptft_tokenize(src: Path, corpus: Path, out: Path, workers: int) -> float:
    from datatrove.pipeline.readers import JsonlReader

    from ptft_dist.config import PrepareConfig
    from ptft_dist.corpus.steps import EncodeShards, QuietLocalExecutor, SplitSentences

    out.mkdir(parents=True)
    shutil.copytree(corpus / "tokenizer", out / "tokenizer")
    cfg = PrepareConfig(workers=workers)
    t0 = time.perf_counter()
    # datatrove hands whole files to tasks: one input file would keep all but one worker idle. Cut it
    # into `workers` parts first (as `ptft prepare` does; counted in the time, like HF's load_dataset).
    parts = split_jsonl(src, out / "parts", workers)
    reader = JsonlReader(str(parts), glob_pattern="part-*.jsonl")
    pipeline = [reader, SplitSentences(cfg), EncodeShards(cfg, str(out), str(out / "lists"))]
    ex = QuietLocalExecutor(pipeline, tasks=workers, workers=workers, logging_dir=str(out / "logs"))
    ex.run()
    return time.perf_counter() - t0


def split_jsonl(src: Path, out: Path, n: int) -> Path:
    """``src`` cut at line boundaries into ``n`` files of about equal size: ``out/part-K.jsonl``."""
    out.mkdir(parents=True)
    data = src.read_bytes()
    cuts, start = [], 0
    for k in range(1, n):
        end = data.find(b"\n", max(start, len(data) * k // n))
        end = len(data) if end < 0 else end + 1
        cuts.append((start, end))
        start = end
    cuts.append((start, len(data)))
    for k, (a, b) in enumerate(cuts):
        (out / f"part-{k:05d}.jsonl").write_bytes(data[a:b])
    return out


def bench_hf_tokenize(src: Path, corpus: Path, cache: Path, workers: int) -> float:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(cache))
    ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=workers,
           remove_columns=ds.column_names)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, help="a JSONL file with a 'text' field (default: the demo news corpus)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab-size", type=int, default=8000)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = args.input or _default_input(work)
        mb = src.stat().st_size / 2**20
        t_pipeline = bench_pipeline(src, work / "corpus", args.workers, args.vocab_size)
        t_ptft = bench_ptft_tokenize(src, work / "corpus", work / "tok", args.workers)
        t_hf = bench_hf_tokenize(src, work / "corpus", work / "hf_cache", args.workers)
    result = {
        "benchmark": "prepare_throughput",
        "input_mb": round(mb, 2),
        "workers": args.workers,
        "pipeline": {"seconds": round(t_pipeline, 2), "mb_per_s": round(mb / t_pipeline, 3),
                     "mb_per_s_per_core": round(mb / t_pipeline / args.workers, 3)},
        "tokenize": {
            "ptft": {"seconds": round(t_ptft, 2), "mb_per_s": round(mb / t_ptft, 3)},
            "hf_datasets_map": {"seconds": round(t_hf, 2), "mb_per_s": round(mb / t_hf, 3)},
            "ratio": round(t_hf / t_ptft, 3),
        },
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
