"""Metrics logging (ptft_dist/metrics/logger.py): TensorBoard/JSONL round trip, resume, disabled ranks, sample ids."""

from __future__ import annotations

import json

import pytest
import torch

from ptft_dist.metrics import logger as MX


def read_scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
    logger = MX.MetricsLogger(tmp_path, enabled=True)
    for step in (10, 20, 30):
        logger.log(step, {"loss": 10.0 / step, "lr": torch.tensor(1e-4 * step), "skipped": None})
    logger.log(30, {"mlm_acc": 0.25}, split="eval")
    logger.log_text("config", "model:\n  preset: tiny\n")
    logger.close()

    loss = read_scalars(tmp_path / "tb", "train/loss")
    assert [s for s, _ in loss] == [10, 20, 30]
    assert [v for _, v in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert read_scalars(tmp_path / "tb", "eval/mlm_acc") == [(30, 0.25)]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(10, "train"), (20, "train"), (30, "train"), (30, "eval")]
    assert records[1]["lr"] == pytest.approx(2e-3) and "skipped" not in records[1]
    assert records[3]["mlm_acc"] == 0.25 and records[3]["time"] > 0


def test_resume_drops_the_steps_to_be_redone(tmp_path):
    logger = MX.MetricsLogger(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "spl')  # a line cut short by a kill

    resumed = MX.MetricsLogger(tmp_path, enabled=True)
    resumed.resume_from(2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
    ]
    assert read_scalars(tmp_path / "tb", "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MX.MetricsLogger(tmp_path / "run", enabled=False)
    logger.resume_from(3)
    logger.log(1, {"loss": 1.0})
    logger.log_text("config", "x")
    logger.close()
    assert not (tmp_path / "run").exists()


def test_sample_id_log_appends_one_line_per_step(tmp_path):
    ids = MX.SampleIdLog(tmp_path, rank=1)
    ids.write(1, [3, 0, 7])
    ids.write(2, [])
    ids.file.close()
    assert read_jsonl(tmp_path / "sample_ids" / "rank1.jsonl") == [{"step": 1, "ids": [3, 0, 7]}, {"step": 2, "ids": []}]
