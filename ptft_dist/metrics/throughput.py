"""How fast a run goes: throughput / MFU, device peak FLOPs, memory, the console progress line.

(What is logged where -- TensorBoard, ``metrics.jsonl`` -- is :mod:`ptft_dist.metrics.logger`.)
Everything here is host-side bookkeeping: nothing forces a device sync. Call
:meth:`Throughput.summary` right after something that already synced (e.g. ``loss.item()`` at a
log step) so the measured time covers the device work of the steps it averages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

# --------------------------------------------------------------------------- throughput


class Throughput:
    """Step time, tokens/s, samples/s, data-wait share and MFU over a window of steps.

    The loop calls ``start_wait()`` / ``end_wait()`` (or ``with tp.waiting():``) around fetching
    the batch and ``end_step(tokens, samples)`` after the optimizer step; :meth:`summary` averages
    the steps since the previous summary. ``tokens`` / ``samples`` are this rank's real (non-pad)
    counts; the all-rank rates assume balanced ranks (``× world_size``), which the data stream
    guarantees up to one sample. MFU = this rank's model FLOPs / elapsed / ``peak_flops`` (one
    device's peak).
    """

    def __init__(
        self,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        clock: Any = time.perf_counter,
    ) -> None:
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self._clock = clock
        self._wait_started: float | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new window now (call it after the first, warm-up step to keep it out)."""
        self._window_start = self._last = self._clock()
        self._steps = self._tokens = self._samples = 0
        self._wait = self._flops = 0.0

    def start_wait(self) -> None:
        self._wait_started = self._clock()

    def end_wait(self) -> None:
        if self._wait_started is not None:
            self._wait += self._clock() - self._wait_started
            self._wait_started = None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        self.start_wait()
        try:
            yield
        finally:
            self.end_wait()

    def exclude(self, seconds: float) -> None:
        """Keep ``seconds`` of this window out of the rates (time spent compiling, reported apart)."""
        self._window_start += seconds

    def end_step(self, tokens: int, samples: int, flops: float | None = None) -> float:
        """Close one step; ``flops`` overrides ``tokens × flops_per_token``. Returns the step's time."""
        now = self._clock()
        dt, self._last = now - self._last, now
        self._steps += 1
        self._tokens += int(tokens)
        self._samples += int(samples)
        if flops is not None:
            self._flops += flops
        elif self.flops_per_token is not None:
            self._flops += tokens * self.flops_per_token
        return dt

    def summary(self, reset: bool = True) -> dict[str, float]:
        """Averages over the window: step_time_s, tokens_per_s(_device), samples_per_s, data_wait, mfu."""
        elapsed = max(self._last - self._window_start, 1e-12)
        steps = max(self._steps, 1)
        out = {
            "step_time_s": elapsed / steps,
            "tokens_per_s": self._tokens * self.world_size / elapsed,
            "tokens_per_s_device": self._tokens / elapsed,
            "samples_per_s": self._samples * self.world_size / elapsed,
            "data_wait": min(1.0, self._wait / elapsed),
        }
        if self.peak_flops and self._flops:
            out["tflops_device"] = self._flops / elapsed / 1e12
            out["mfu"] = self._flops / elapsed / self.peak_flops
        if reset:
            self.reset()
        return out


# --------------------------------------------------------------------------- device peak

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from the vendors' data sheets. Ordered: the
# first pattern contained in the device name wins (so "H100 PCIe" before "H100", "A100" before "A10").
# "tf32" applies to fp32 matmuls when torch allows TF32; "fp32" otherwise.
_GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),  # SXM
    ("H800", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H20", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    ("GB200", {"bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
    ("B100", {"bf16": 1750.0, "fp16": 1750.0, "tf32": 875.0, "fp32": 60.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),  # AWS part, no official sheet: approximate
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("A30", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    ("A40", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("RTX 6000 Ada", {"bf16": 364.0, "fp16": 364.0, "tf32": 182.0, "fp32": 91.1}),
    ("RTX A6000", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),  # fp32-accumulate rate
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 tensor cores: bf16 is rated at fp32
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]

_DTYPE_KEY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_peak_tflops(name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Table lookup by device name (case-insensitive substring); None if unknown."""
    key = _DTYPE_KEY.get(dtype, "fp32")
    if key == "fp32" and tf32:
        key = "tf32"
    upper = name.upper()
    for pattern, peaks in _GPU_PEAK_TFLOPS:
        if pattern.upper() in upper:
            return peaks.get(key, peaks["fp32"])
    return None


@cache
def _probe_flops(device_type: str, device_index: int | None, dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s: the best of several timed batches of n×n matmuls over ~0.3 s (GPU)
    or ~1 s (CPU: data-loader workers and the other ranks start up meanwhile, so a short probe can
    land in a busy moment and read low; the best of a longer window does not)."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    n = 1024 if device_type == "cpu" else 4096
    g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG: resumed runs restore it
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync() -> None:
        if device_type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm up (thread pool, kernels)
    sync()
    best, reps, deadline = 0.0, 1, time.perf_counter() + (1.0 if device_type == "cpu" else 0.3)
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * n**3 * reps / dt)
        if dt < 0.02:
            reps *= 2
    return best


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None = None
) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and where the number comes from.

    Order: the config's ``train.device_peak_tflops``; for a GPU the data-sheet table (dense, no
    sparsity; TF32 rate for fp32 when torch allows TF32 matmuls; a probe if not in it); on CPU
    the CPU's instruction-set peak (metrics/cpu_peak.py; never a probe reading under load).
    """
    if override_tflops:
        return float(override_tflops) * 1e12, "config"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        tflops = gpu_peak_tflops(name, dtype, tf32=tf32)
        if tflops is not None:
            return tflops * 1e12, f"table: {name}"
        return _probe_flops("cuda", device.index, dtype), f"probe: {name} (not in the table)"
    return _cpu_peak_flops(dtype)


def _cpu_peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """The instruction set's peak (metrics/cpu_peak.py), not a probe taken under whatever load
    there is; a matmul probe only raises it, when the clock runs above what the OS reports."""
    from ptft_dist.metrics.cpu_peak import cpu_peak

    peak = cpu_peak(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    probed = _probe_flops("cpu", None, torch.float32)
    if probed > peak.flops:
        return probed, f"probe: cpu fp32 matmul {probed / 1e12:.3f} TFLOP/s, above the {peak.describe()}"
    return peak.flops, peak.describe()


# --------------------------------------------------------------------------- memory


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak GPU memory (MB) since the last reset, or this process's resident memory (MB) on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        mb = 1024.0**2
        return {
            "mem_max_allocated_mb": torch.cuda.max_memory_allocated(device) / mb,
            "mem_max_reserved_mb": torch.cuda.max_memory_reserved(device) / mb,
        }
    import psutil

    return {"mem_rss_mb": psutil.Process().memory_info().rss / 1024.0**2}


# --------------------------------------------------------------------------- console


def format_duration(seconds: float | None) -> str:
    """h:mm:ss (``--:--:--`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _si(value: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f}{suffix}"
    return f"{value:.1f}"


def format_progress(
    step: int,
    max_steps: int,
    loss: float | None = None,
    lr: float | None = None,
    tokens_per_s: float | None = None,
    mfu: float | None = None,
    data_wait: float | None = None,
    step_time_s: float | None = None,
) -> str:
    """One readable console line; ETA = remaining steps × ``step_time_s``. Unknown fields are left out.

    ``step 120/1000 (12.0%) | loss 6.1234 | lr 1.00e-04 | 12.35k tok/s | MFU 41.2% | data 0.5% | ETA 0:14:40``
    """
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps} ({100.0 * step / max(max_steps, 1):.1f}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if tokens_per_s is not None:
        parts.append(f"{_si(tokens_per_s)} tok/s")
    if mfu is not None:
        parts.append(f"MFU {100.0 * mfu:.1f}%")
    if data_wait is not None:
        parts.append(f"data {100.0 * data_wait:.1f}%")
    if step_time_s is not None:
        parts.append(f"ETA {format_duration(max(0, max_steps - step) * step_time_s)}")
    return " | ".join(parts)
