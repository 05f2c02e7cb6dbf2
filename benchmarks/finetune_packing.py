"""Fine-tuning throughput, packed vs padded: examples/s of the training step on short sentences.

What runs: a MiniLM-L6-shaped ``BertForSequenceClassification`` (6 layers, hidden 384, 12 heads,
intermediate 1536, vocab 30522; random weights: the shape decides the speed), 2 labels, AdamW,
dropout on (BERT's 0.1), fp32 on CPU. Batches are ptft's own: ``finetune.batches.train_shard``
(group by length on, the default, or off) and ``collate`` over synthetic examples whose lengths
follow short-sentence statistics (log-normal, mean ~30 tokens, clipped to [6, max_len 128]).

* **padded**: the stock classifier on sdpa (what ``finetune.unpad: false`` trains);
* **packed**: the same weights after ``finetune.packing.enable_packing`` (``finetune.unpad: true``).

The two alternate step by step over the same batches, so a change in machine load hits both;
each reports min and median step time, examples/s at the median, and the ratio packed/padded.

    python benchmarks/finetune_packing.py [--steps 20] [--batch 32] [--threads 1] [--out r.json]
    python benchmarks/finetune_packing.py --smoke      # tiny model, 3 steps (seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_average, machine_info

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def short_sentences(n: int, max_len: int, seed: int, vocab: int) -> Any:
    """Token ids of ``n`` examples, [CLS] ... [SEP], lengths log-normal with mean ~30."""
    from ptft_dist.finetune.batches import Encoded

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(26), 0.5, n)), 6, max_len).astype(int)
    ids = [[101, *rng.integers(1000, vocab, n_ - 2).tolist(), 102] for n_ in lengths]
    return Encoded(ids, [[0] * len(x) for x in ids])


def build(shape: dict, vocab: int) -> tuple[Any, Any]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ptft_dist.finetune.packing import enable_packing

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, num_labels=2, attn_implementation="sdpa", **shape)
    padded = BertForSequenceClassification(cfg).train()
    packed = copy.deepcopy(padded)
    if not enable_packing(packed):
        raise SystemExit("enable_packing refused the classifier")
    return padded, packed


def measure(args: argparse.Namespace, grouped: bool) -> dict[str, Any]:
    import torch

    from ptft_dist.finetune.batches import collate, train_shard

    vocab = 30522
    enc = short_sentences(args.batch * (args.steps + args.warmup), args.max_len, 0, vocab)
    labels = np.arange(len(enc)) % 2
    order = train_shard(len(enc), 0, 1, 13, 0, enc.lengths() if grouped else None, args.batch)
    batches = [collate(enc, order[i:i + args.batch], 0, labels) for i in range(0, len(order), args.batch)]
    models = dict(zip(("padded", "packed"), build(TINY if args.smoke else MINILM, vocab)))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=2e-5) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for step, b in enumerate(batches):
        for name, model in models.items():  # alternate: the same load for both
            torch.manual_seed(step)  # the same dropout draws would need the same layout; seeds only pin each side
            t0 = time.perf_counter()
            out = model(**b)
            out.loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times[name].append(dt)
                losses[name].append(round(out.loss.item(), 4))
    real = sum(int(b["attention_mask"].sum()) for b in batches[args.warmup:])
    positions = sum(b["input_ids"].numel() for b in batches[args.warmup:])
    res: dict[str, Any] = {"group_by_length": grouped, "pad_fraction": round(1 - real / positions, 3)}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"step_s_min": round(min(ts), 4), "step_s_median": round(med, 4),
                     "examples_per_s": round(args.batch / med, 1), "first_losses": losses[name][:3]}
    res["ratio"] = round(res["packed"]["examples_per_s"] / res["padded"]["examples_per_s"], 3)
    res["ratio_min_times"] = round(res["padded"]["step_s_min"] / res["packed"]["step_s_min"], 3)
    return res


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per order (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 3, 1
    import torch

    torch.set_num_threads(args.threads)
    load_before = load_average()
    t0 = time.time()
    report = {
        "benchmark": "finetune_packing",
        "model": "tiny" if args.smoke else "MiniLM-L6 shape (6x384, 12 heads, vocab 30522), random weights",
        "batch": args.batch, "max_len": args.max_len, "threads": args.threads, "steps": args.steps,
        "runs": [measure(args, grouped=True), measure(args, grouped=False)],
        "target": "ratio >= 1.5 (packed/padded examples/s, short sentences)",
    }
    report["seconds"] = round(time.time() - t0, 1)
    report["load_average_before"] = load_before
    report["load_average_after"] = load_average()
    report["machine"] = machine_info()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
