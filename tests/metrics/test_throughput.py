"""Metrics (ptft_dist/metrics/throughput.py): TensorBoard/JSONL round trip, resume, throughput/MFU, peaks, progress."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ptft_dist.metrics import throughput as MX


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


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_throughput_rates_wait_share_and_mfu():
    clock = FakeClock()
    tp = MX.Throughput(flops_per_token=1e6, peak_flops=1e10, world_size=2, clock=clock)
    for _ in range(4):  # each step: 0.1 s waiting on data, then 0.4 s of compute
        with tp.waiting():
            clock.t += 0.1
        clock.t += 0.4
        assert tp.end_step(tokens=1000, samples=8) == pytest.approx(0.5)
    s = tp.summary()
    assert s["step_time_s"] == pytest.approx(0.5)
    assert s["tokens_per_s_device"] == pytest.approx(2000.0) and s["tokens_per_s"] == pytest.approx(4000.0)
    assert s["samples_per_s"] == pytest.approx(32.0)
    assert s["data_wait"] == pytest.approx(0.2)
    assert s["mfu"] == pytest.approx(2000.0 * 1e6 / 1e10) and s["tflops_device"] == pytest.approx(2e-3)
    clock.t += 1.0
    tp.start_wait()
    clock.t += 1.0
    tp.end_wait()
    tp.end_step(tokens=0, samples=0, flops=5e9)  # explicit FLOPs win; the window was reset by summary()
    s = tp.summary()
    assert s["data_wait"] == pytest.approx(0.5) and s["mfu"] == pytest.approx(5e9 / 2.0 / 1e10)
    assert "mfu" not in MX.Throughput(clock=clock).summary()


def test_device_peak_flops():
    assert MX.device_peak_flops(torch.device("cpu"), torch.float32, 12.5) == (12.5e12, "config")
    value, source = MX.device_peak_flops(torch.device("cpu"), torch.float32, None)
    assert value > 1e8 and source.startswith("probe")
    assert MX.device_peak_flops(torch.device("cpu"), torch.bfloat16, None)[0] == value  # cached, fp32
    table = {
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16): 312.0,
        ("NVIDIA A100 80GB PCIe", torch.float32): 19.5,
        ("NVIDIA H100 80GB HBM3", torch.bfloat16): 989.0,
        ("NVIDIA H100 PCIe", torch.bfloat16): 756.0,
        ("NVIDIA H200", torch.bfloat16): 989.0,
        ("NVIDIA A10G", torch.bfloat16): 70.0,
        ("NVIDIA L4", torch.bfloat16): 121.0,
        ("NVIDIA L40S", torch.bfloat16): 362.0,
        ("Tesla V100-SXM2-32GB", torch.float16): 125.0,
        ("Tesla V100-SXM2-32GB", torch.bfloat16): 15.7,
        ("NVIDIA GeForce RTX 4090", torch.bfloat16): 165.2,
    }
    for (name, dtype), tflops in table.items():
        assert MX.gpu_peak_tflops(name, dtype) == tflops, name
    assert MX.gpu_peak_tflops("NVIDIA A100-SXM4-40GB", torch.float32, tf32=True) == 156.0
    assert MX.gpu_peak_tflops("Some Future GPU", torch.bfloat16) is None


def test_memory_stats_on_cpu():
    stats = MX.memory_stats(torch.device("cpu"))
    assert list(stats) == ["mem_rss_mb"] and stats["mem_rss_mb"] > 10


def test_progress_line():
    line = MX.format_progress(
        step=120,
        max_steps=1000,
        loss=6.12345,
        lr=1e-4,
        tokens_per_s=12345.0,
        mfu=0.4123,
        data_wait=0.005,
        step_time_s=1.0,
    )
    assert line == (
        "step  120/1000 (12.0%) | loss 6.1235 | lr 1.00e-04 | 12.35k tok/s | MFU 41.2% | data 0.5% | ETA 0:14:40"
    )
    assert MX.format_progress(5, 10) == "step  5/10 (50.0%)"
    assert MX.format_duration(3 * 3600 + 62) == "3:01:02"
    assert MX.format_duration(math.nan) == "--:--:--"
