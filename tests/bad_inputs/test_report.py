"""``ptft report`` on something that is not a run (docs/refusals.md)."""

from __future__ import annotations

import json

from tests.bad_inputs.refusal import accepted, refused


def test_report_of_a_missing_run_writes_nothing(tmp_path, capsys):
    err = refused(capsys, "report", tmp_path / "nope")
    assert "no metrics.jsonl (is this a ptft run directory?)" in err
    assert not (tmp_path / "nope").exists()


def test_report_of_a_run_without_metrics_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n{cut short by a kill\n")
    err = refused(capsys, "report", run)
    assert f"{run / 'metrics.jsonl'} holds no metrics" in err
    assert not (run / "report").exists()


def test_report_of_a_run_with_metrics_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", "loss": 5.0 / s}) + "\n"
                                               for s in range(1, 4)))
    accepted(capsys, "report", run)
    assert "| train/loss | 3 | 5 | 1.667 |" in (run / "report" / "report.md").read_text()
