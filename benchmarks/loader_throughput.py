"""Loader throughput through the real ``DataLoader`` path: ptft's stream vs HF DataCollatorForLanguageModeling.

Both sides run as training runs them: a ``torch.utils.data.DataLoader`` with worker processes
(1 and 2 workers, the same prefetch factor), the training process consuming the batches. Same
pre-tokenized data, same micro-batch:

* **ptft**: :class:`~ptft_dist.stream.loader.StreamingLoader` over a ``PretrainingStream`` (what
  ``ptft pretrain`` uses with ``data.num_workers`` ≥ 1) on a synthetic corpus in the real shard
  format (BERT-like sentence and document lengths, 30522-token vocabulary). Per micro-batch its
  workers do everything a training step needs: plan lookup, NSP pair construction
  (IsNext/NotNext, pair truncation), [CLS]/[SEP]/token types, padding, dynamic 80/10/10
  masking, the packed form (cu_seqlens/indices), and the transport to the trainer (one byte
  buffer per micro-batch, smallest exact dtypes, through the DataLoader's pipe), which unpacks it.
* **HF**: a map-style dataset of the *same* token sequences, already paired and pre-tokenized
  (``TextDatasetForNextSentencePrediction``-style features), through a ``DataLoader`` whose
  ``collate_fn`` is ``DataCollatorForLanguageModeling`` (mlm_probability 0.15): what HF
  ``Trainer`` runs. It only pads and masks: strictly less work than ptft's workers do.

Rate: samples delivered to the consuming process over ``--seconds`` of steady state (the first
``workers × prefetch + 1`` batches, i.e. worker start-up and the prefetch queue filling, are not
timed). ``per_worker`` = total ÷ workers. Target: ptft ≥ 20,000 samples/s per worker at
sequence length 128 (1 worker). On a machine with few cores the workers and the consumer compete
for them (and with everything else running): read the wall-clock figures with the load average
printed beside them. ``samples_per_worker_cpu_s`` divides the same samples by the CPU time the
worker processes actually got: what one worker delivers per core-second, a second opinion that a
busy machine does not distort (it is not the headline).

    python benchmarks/loader_throughput.py [--seconds 3] [--batch 32] [--workers 1,2] [--out loader.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_average, machine_info, write_synthetic_corpus

from ptft_dist.config import DataConfig
from ptft_dist.corpus import format as sh
from ptft_dist.stream.dataset import PretrainingStream
from ptft_dist.stream.loader import StreamingLoader

VOCAB = 30522
PREFETCH = 4


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) used so far by this process and by its child processes (the
    DataLoader workers)."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    kids = 0.0
    for c in me.children(recursive=True):
        try:
            ct = c.cpu_times()
            kids += ct.user + ct.system
        except psutil.Error:
            continue
    return t.user + t.system, kids


def steady_rate(batches: Iterable[dict], workers: int, seconds: float, size: Callable[[dict], int],
                max_samples: Optional[int] = None) -> dict[str, Any]:
    """Samples/s the consumer receives once the workers are up and the prefetch queue is full, and
    the CPU time the workers and the consumer used meanwhile (a shared machine gives them less than
    a core each: samples per worker CPU-second is what a worker delivers per core it gets).
    ``max_samples``: stop before the stream ends (its workers exit then, taking their CPU times)."""
    skip = workers * PREFETCH + 1
    it = iter(batches)
    for _ in range(skip):
        next(it)
    n = k = 0
    main0, kids0 = _cpu_seconds()
    t0 = time.perf_counter()
    for b in it:
        n += size(b)
        k += 1
        if time.perf_counter() - t0 >= seconds or (max_samples is not None and n >= max_samples):
            break
    dt = time.perf_counter() - t0
    main1, kids1 = _cpu_seconds()
    worker_cpu = max(kids1 - kids0, 1e-9)
    return {"samples_per_s": round(n / dt, 1), "per_worker": round(n / dt / workers, 1), "batches_timed": k,
            "seconds_timed": round(dt, 2), "worker_cpu_s": round(worker_cpu, 2),
            "consumer_cpu_s": round(main1 - main0, 2),
            "samples_per_worker_cpu_s": round(n / worker_cpu, 1)}


class HFExamples:
    """Map-style dataset of pre-tokenized NSP pairs (cycled, so no epoch ends while timing)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> dict:
        return self.examples[i % len(self.examples)]


def hf_examples(ds: PretrainingStream, n_samples: int, batch: int) -> list[dict]:
    """ptft's samples, unmasked, as the features HF's collator takes."""
    examples = []
    for p in range(0, n_samples, batch):
        b = ds.batch_at(0, np.arange(p, min(p + batch, n_samples)))
        orig = np.where(b["labels"] != -100, b["labels"], b["input_ids"])
        for i in range(len(orig)):
            n = int(b["attention_mask"][i].sum())
            examples.append({"input_ids": orig[i, :n].tolist(), "token_type_ids": b["token_type_ids"][i, :n].tolist(),
                             "next_sentence_label": int(b["next_sentence_label"][i])})
    return examples


def bench_seq_len(root: Path, seq_len: int, batch: int, seconds: float, worker_counts: list[int],
                  cache: Path) -> dict[str, Any]:
    import torch
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    cfg = DataConfig(corpus=str(root), max_seq_len=seq_len, cache_dir=str(cache))
    ds = PretrainingStream(cfg=cfg, micro_batch_size=batch)
    n_total = ds.num_samples(0)
    tok = BertTokenizerFast(vocab_file=str(root / sh.TOKENIZER_DIR / "vocab.txt"), do_lower_case=False)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, return_tensors="pt")
    examples = hf_examples(ds, min(n_total, 256 * batch), batch)
    out: dict[str, Any] = {"samples_in_epoch": n_total,
                           "mean_tokens_per_sample": round(float(np.mean([len(e["input_ids"]) for e in examples])), 1)}
    for w in worker_counts:
        ds.set_position(0, 0)
        ours = steady_rate(StreamingLoader(ds, num_workers=w, prefetch_factor=PREFETCH), w, seconds,
                           lambda b: int(b["input_ids"].shape[0]), max_samples=n_total - (w * PREFETCH + 4) * batch)
        hf_loader = torch.utils.data.DataLoader(HFExamples(examples), batch_size=batch, collate_fn=collator,
                                                num_workers=w, prefetch_factor=PREFETCH, shuffle=False)
        hf = steady_rate(hf_loader, w, seconds, lambda b: int(b["input_ids"].shape[0]))
        del hf_loader
        out[f"{w}_workers"] = {"ptft": ours, "hf_collator": hf,
                               "ratio_ptft_over_hf": round(ours["samples_per_s"] / hf["samples_per_s"], 2),
                               "load_average_after": load_average()}
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed steady state per side, length and workers")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch size")
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure")
    ap.add_argument("--tokens-per-shard", type=int, default=3_000_000)
    ap.add_argument("--shards", type=int, default=12, help="enough for 3 s at seq 512 and > 25k samples/s")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    load_before = load_average()
    t_all = time.time()
    worker_counts = [int(x) for x in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="ptft-loader-bench-") as tmp:
        root = write_synthetic_corpus(Path(tmp) / "corpus", n_shards=args.shards,
                                      tokens_per_shard=args.tokens_per_shard, vocab_size=VOCAB)
        results = {}
        for L in (int(x) for x in args.seq_lens.split(",")):
            results[str(L)] = bench_seq_len(root, L, args.batch, args.seconds, worker_counts, Path(tmp) / "cache")
    one = results.get("128", {}).get("1_workers", {}).get("ptft", {})
    report = {
        "benchmark": "loader_throughput",
        "path": "torch DataLoader with worker processes, both sides (ptft: StreamingLoader; HF: "
                "DataCollatorForLanguageModeling as collate_fn)",
        "micro_batch": args.batch, "prefetch_factor": PREFETCH, "nsp": True, "mlm_probability": 0.15,
        "results": results,
        "target": "ptft >= 20000 samples/s per worker at seq_len 128 (1 worker, through the DataLoader)",
        "target_met": one.get("per_worker", 0) >= 20000,
        "seconds": round(time.time() - t_all, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
