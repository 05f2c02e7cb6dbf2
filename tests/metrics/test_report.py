"""``ptft report``: Markdown + PNG plots from metrics.jsonl."""

import json

from ptft_dist.cli import main
from ptft_dist.metrics.report import read_metrics


def test_report_from_metrics(tmp_path, capsys):
    lines = [{"step": s, "split": "train", "loss": 10 - s / 10, "lr": 1e-3, "tokens_per_s": 1000.0 + s, "mfu": 12.5}
             for s in range(0, 100, 10)]
    lines += [{"step": 50, "split": "eval", "loss": 7.0, "mlm_acc": 0.2}, {"step": 90, "split": "eval", "loss": 5.0}]
    lines.append({"step": 90, "split": "train", "loss": 1.0})  # a resumed run redid step 90: the last wins
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 100, "spl'  # cut short by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    series = read_metrics(tmp_path)
    assert series[("train", "loss")][-1] == (90, 1.0)
    assert series[("eval", "loss")] == [(50, 7.0), (90, 5.0)]
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| train/loss | 10 |" in md and "![Loss](plots/loss.png)" in md
    for stem in ("loss", "accuracy", "lr", "throughput", "mfu"):
        png = tmp_path / "report" / "plots" / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "report" / "plots" / "finetune.png").exists()


def test_report_on_a_non_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
