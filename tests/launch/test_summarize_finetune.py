"""slurm/summarize_finetune.py on a grid of mixed task types: one Markdown table per task type with
that task's own metrics, mean ± std over seeds per table, one TSV with a task column."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "slurm"))

import summarize_finetune  # noqa: E402


def _row(out: Path, i: int, task: str, config: str, seed: int, test: dict) -> None:
    d = out / f"row-{i:03d}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"method": "full", "task": {"task_type": task},
                                                "validation": test, "test": test}))
    rec = out / "slurm" / f"row-{i:03d}"
    rec.mkdir(parents=True)
    (rec / "row.json").write_text(json.dumps({"config": config, "seed": str(seed), "lr": "2e-5", "state": "completed"}))


def test_one_table_per_task_type_with_its_own_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    _row(out, 0, "token_classification", "ner.yaml", 1, {"f1": 0.9, "precision": 0.8, "recall": 1.0})
    _row(out, 1, "token_classification", "ner.yaml", 2, {"f1": 0.7, "precision": 0.6, "recall": 0.8})
    _row(out, 2, "extractive_qa", "qa.yaml", 1, {"f1": 0.5, "exact_match": 0.4})
    _row(out, 3, "classification", "sst2.yaml", 1, {"accuracy": 0.85})
    assert summarize_finetune.main([str(out)]) == 0
    md = (out / "summary.md").read_text()
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n## ")[1:]}
    assert set(sections) == {"classification: 1 row(s)", "extractive_qa: 1 row(s)", "token_classification: 2 row(s)"}
    qa_header = next(ln for ln in sections["extractive_qa: 1 row(s)"].splitlines() if ln.startswith("| row |"))
    assert qa_header.endswith("| validation.exact_match | validation.f1 | test.exact_match | test.f1 |")
    ner = sections["token_classification: 2 row(s)"]
    assert "test.recall" in ner and "exact_match" not in ner and "accuracy" not in ner
    assert "| ner.yaml | 2e-5 | full | 2 | 0.8000 ± 0.1414 | 0.7000 ± 0.1414 | 0.9000 ± 0.1414 |" in ner
    tsv = [ln.split("\t") for ln in (out / "summary.tsv").read_text().splitlines()]
    rows = [dict(zip(tsv[0], t)) for t in tsv[1:]]
    assert [r["task"] for r in rows] == ["token_classification", "token_classification", "extractive_qa", "classification"]
    assert rows[2]["test.exact_match"] == "0.4" and rows[2]["test.accuracy"] == ""
    assert md in capsys.readouterr().out
