"""Throughput (ptft_dist/metrics/throughput.py): rates, data-wait share, MFU, device peaks, memory, progress line."""

from __future__ import annotations

import math

import pytest
import torch

from ptft_dist.metrics import throughput as MX


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


def test_compile_time_is_kept_out_of_the_rates():
    clock = FakeClock()
    tp = MX.Throughput(flops_per_token=1e6, peak_flops=1e10, clock=clock)
    clock.t += 30.5  # the first step: 30 s of compiling, then 0.5 s of work
    tp.exclude(30.0)
    tp.end_step(tokens=1000, samples=8)
    clock.t += 0.5
    tp.end_step(tokens=1000, samples=8)
    s = tp.summary()
    assert s["step_time_s"] == pytest.approx(0.5) and s["tokens_per_s"] == pytest.approx(2000.0)


def test_device_peak_flops():
    assert MX.device_peak_flops(torch.device("cpu"), torch.float32, 12.5) == (12.5e12, "config")
    value, source = MX.device_peak_flops(torch.device("cpu"), torch.float32, None)
    # the instruction-set peak, at least what a matmul reaches (so MFU against it stays <= 100 %)
    assert value >= MX._probe_flops("cpu", None, torch.float32) and source.startswith(("cpu peak", "probe"))
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


def test_cpu_peak_comes_from_the_instruction_set_not_the_load():
    from ptft_dist.metrics import cpu_peak as CP

    spr = "model name\t: Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz\ncpu MHz\t\t: 2100.000\nflags\t\t: fma avx2 avx512f amx_tile\n"
    assert CP.isa_level(spr) == "amx" and CP.max_clock_ghz(spr) == pytest.approx(2.1)
    assert CP.isa_level("flags : sse4_2 avx2 fma\n") == "avx2" and CP.isa_level("flags : sse2\n") == "sse"
    assert CP.isa_level("Features : fp asimd\n") == "sse"
    fp32 = CP.cpu_peak(torch.float32, cores=2)
    assert fp32.flops == pytest.approx(2 * CP.max_clock_ghz(CP._cpuinfo()) * 1e9 * fp32.flops_per_cycle)
    assert CP.cpu_peak(torch.bfloat16, cores=2).flops >= fp32.flops
    assert CP.cpu_peak.__wrapped__(torch.float32, cores=2) == fp32  # no timing in it: load cannot move it
