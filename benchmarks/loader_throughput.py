"""Loader throughput: samples/s per loader worker, ptft stream vs HF DataCollatorForLanguageModeling.

Both sides measured in the same run on the same pre-tokenized data:

* **ptft**: ``PretrainingStream`` over a synthetic corpus written in the real shard format
  (BERT-like sentence and document lengths, 30522-token vocabulary). Per micro-batch it does
  everything a training step needs: plan lookup, NSP pair construction (IsNext/NotNext, pair
  truncation), [CLS]/[SEP]/token types, padding, dynamic 80/10/10 masking, packed form
  (cu_seqlens/indices), packing into the one tensor a worker sends. Measured in-process (= one
  loader worker's work) and through a real ``DataLoader`` with one worker process (adds the
  inter-process transfer; on a machine with few cores the worker and the consumer compete).
* **HF**: ``DataCollatorForLanguageModeling`` (mlm_probability 0.15) collating the *same* token
  sequences, already paired and pre-tokenized (so it only pads and masks: strictly less work).

Prints one JSON object (and writes it with ``--out``); ``ratio`` = ptft / HF samples/s.
Target: one worker ≥ 20,000 samples/s at sequence length 128.

    python benchmarks/loader_throughput.py [--seconds 3] [--batch 32] [--out loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_synthetic_corpus

from ptft_dist.config import DataConfig
from ptft_dist.corpus import format as sh
from ptft_dist.stream.dataset import PretrainingStream
from ptft_dist.stream.loader import StreamingLoader, pack_batch

VOCAB = 30522


def hf_tokenizer(root: Path):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(root / sh.TOKENIZER_DIR / "vocab.txt"), do_lower_case=False)


def time_loop(fn, seconds: float) -> float:
    """Samples/s of repeated ``fn()`` calls (each returns the number of samples) over ~``seconds``."""
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def bench_seq_len(root: Path, seq_len: int, batch: int, seconds: float, cache: Path) -> dict:
    cfg = DataConfig(corpus=str(root), max_seq_len=seq_len, cache_dir=str(cache), num_workers=1)
    ds = PretrainingStream(cfg=cfg, micro_batch_size=batch)
    n_total = ds.num_samples(0)
    state = {"pos": 0}

    def ours() -> int:
        p = state["pos"]
        if p + batch > n_total:
            p = 0
        state["pos"] = p + batch
        b = ds.batch_at(0, np.arange(p, p + batch))
        pack_batch(b)  # what a loader worker hands to the DataLoader queue
        return int(b["input_ids"].shape[0])

    ours_sps = time_loop(ours, seconds)

    # The same sequences, unmasked, pre-tokenized: HF only pads and masks them.
    import torch
    from transformers import DataCollatorForLanguageModeling

    tok = hf_tokenizer(root)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, return_tensors="pt")
    examples = []
    for p in range(0, min(n_total, 64 * batch), batch):
        b = ds.batch_at(0, np.arange(p, min(p + batch, n_total)))
        orig = np.where(b["labels"] != -100, b["labels"], b["input_ids"])
        for i in range(len(orig)):
            n = int(b["attention_mask"][i].sum())
            examples.append({"input_ids": orig[i, :n].tolist(), "token_type_ids": b["token_type_ids"][i, :n].tolist(),
                             "next_sentence_label": int(b["next_sentence_label"][i])})
    hstate = {"i": 0}

    def hf() -> int:
        i = hstate["i"]
        if i + batch > len(examples):
            i = 0
        hstate["i"] = i + batch
        out = collator(examples[i : i + batch])
        assert isinstance(out["input_ids"], torch.Tensor)
        return batch

    hf_sps = time_loop(hf, seconds)

    # A real DataLoader with one worker process (the rate the training loop sees from one worker).
    loader = StreamingLoader(ds, num_workers=1, prefetch_factor=8)
    ds.set_position(0, 0)
    n, t0 = 0, None
    for b in loader:
        if t0 is None:  # steady state: from the first batch on (worker start-up excluded)
            t0 = time.perf_counter()
            continue
        n += int(b["input_ids"].shape[0])
        if time.perf_counter() - t0 > seconds:
            break
    dl_sps = n / (time.perf_counter() - t0)
    lengths = np.asarray(ds.batch_at(0, np.arange(min(n_total, 512)))["attention_mask"]).sum(1)
    return {
        "ptft_samples_per_s_per_worker": round(ours_sps, 1),
        "ptft_dataloader_1_worker_samples_per_s": round(dl_sps, 1),
        "hf_collator_samples_per_s": round(hf_sps, 1),
        "ratio_ptft_over_hf": round(ours_sps / hf_sps, 2),
        "mean_tokens_per_sample": round(float(lengths.mean()), 1),
        "samples_in_epoch": n_total,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per side and length")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch size")
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--tokens-per-shard", type=int, default=3_000_000)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ptft-loader-bench-") as tmp:
        root = write_synthetic_corpus(Path(tmp) / "corpus", tokens_per_shard=args.tokens_per_shard, vocab_size=VOCAB)
        results = {}
        for L in (int(x) for x in args.seq_lens.split(",")):
            results[str(L)] = bench_seq_len(root, L, args.batch, args.seconds, Path(tmp) / "cache")
    report = {
        "benchmark": "loader_throughput",
        "micro_batch": args.batch,
        "nsp": True,
        "mlm_probability": 0.15,
        "results": results,
        "target": "ptft >= 20000 samples/s per worker at seq_len 128",
        "target_met": results.get("128", {}).get("ptft_samples_per_s_per_worker", 0) >= 20000,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "numpy": np.__version__,
                    "torch": torch.__version__},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
