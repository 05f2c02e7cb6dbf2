"""``ptft report RUN_DIR``: a static Markdown report with PNG plots, for clusters without a browser.

Made from ``RUN_DIR/metrics.jsonl`` (written by train/metrics.py: one ``{"step", "split", ...}``
object per line), so it works for pretraining and fine-tuning runs alike and needs no TensorBoard.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# (file stem, title, [(split, metric), ...]) — a plot is drawn when any of its series has points
PLOTS = [
    ("loss", "Loss", [("train", "loss"), ("train", "mlm_loss"), ("train", "nsp_loss"), ("eval", "loss"),
                      ("eval", "mlm_loss"), ("eval", "nsp_loss")]),
    ("accuracy", "Accuracy", [("train", "mlm_acc"), ("train", "nsp_acc"), ("eval", "mlm_acc"), ("eval", "nsp_acc")]),
    ("lr", "Learning rate", [("train", "lr")]),
    ("throughput", "Tokens per second", [("train", "tokens_per_s")]),
    ("mfu", "Model FLOPs utilisation (%)", [("train", "mfu")]),
    ("finetune", "Fine-tuning (validation)", [("validation", "accuracy"), ("validation", "macro_f1"),
                                              ("validation", "mcc"), ("validation", "loss"), ("train", "epoch_loss")]),
]


def read_metrics(run_dir: str | Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(split, metric): [(step, value), ...]}; a later line for the same step replaces an earlier one."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a ptft run directory?)")
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: skip it
        step, split = rec.get("step"), rec.get("split", "train")
        for key, value in rec.items():
            if key in ("step", "split", "time") or not isinstance(value, (int, float)):
                continue
            series[(split, key)][int(step)] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def _plot(path: Path, title: str, lines: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for label, points in lines.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, marker="o" if len(points) < 20 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and ``plots/*.png`` (default: into RUN_DIR/report); returns the Markdown path."""
    run = Path(run_dir)
    out = Path(out_dir) if out_dir else run / "report"
    series = read_metrics(run)  # before anything is written: a wrong path leaves no report folder behind
    if not series:
        raise FileNotFoundError(f"{run / 'metrics.jsonl'} holds no metrics (did the run log any step?)")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    md = [f"# Run report: `{run}`", ""]
    md += ["| series | points | first | last | min | max |", "|---|---|---|---|---|---|"]
    for (split, name), points in sorted(series.items()):
        ys = [v for _, v in points]
        md.append(f"| {split}/{name} | {len(points)} | {_fmt(ys[0])} | {_fmt(ys[-1])} | {_fmt(min(ys))} | {_fmt(max(ys))} |")
    md.append("")
    for stem, title, keys in PLOTS:
        lines = {f"{s}/{m}": series[(s, m)] for s, m in keys if series.get((s, m))}
        if not lines:
            continue
        _plot(out / "plots" / f"{stem}.png", title, lines)
        md += [f"## {title}", "", f"![{title}](plots/{stem}.png)", ""]
    for name in ("resolved_config.yaml", "results.json"):
        if (run / name).is_file():
            md += [f"## {name}", "", "```", (run / name).read_text().strip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
