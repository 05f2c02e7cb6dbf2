"""The peak FLOP/s of the CPU cores a rank computes on, from the instruction set, never from a probe.

A matmul probe measures what the cores did in that second: on a busy machine it reads low, and MFU
against it reads high (the demo once printed "MFU 95%" on a loaded machine). The data-sheet way is
cores × clock × FLOPs per cycle per core, where FLOPs per cycle is what the vector units can retire:
two FMA units × lanes × 2 (multiply + add). We take the widest unit the CPU reports and assume two
FMA units (server parts; a one-unit part only makes MFU read lower, never above 100%), and the
highest clock the OS reports (a hypervisor may hide turbo: :func:`cpu_peak` then also takes any
measured rate above it, so MFU stays ≤ 100%).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

# FLOPs per cycle per core, two FMA units: (fp32, bf16) per instruction-set level
_FLOPS_PER_CYCLE = {
    "amx": (64, 1024),  # AMX tiles: bf16 only (fp32 matmuls still run on AVX-512)
    "avx512": (64, 64),  # 16 fp32 lanes × 2 units × 2; bf16 without AMX: converted to fp32
    "avx2": (32, 32),  # 8 lanes × 2 units × 2
    "sse": (16, 16),
}


@dataclass(frozen=True)
class CpuPeak:
    flops: float
    cores: int
    ghz: float
    flops_per_cycle: int
    isa: str

    def describe(self) -> str:
        return (f"cpu peak: {self.cores} core(s) x {self.ghz:.2f} GHz x {self.flops_per_cycle} FLOP/cycle "
                f"({self.isa}, 2 FMA units)")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def isa_level(cpuinfo: str) -> str:
    """The widest vector unit the first CPU reports."""
    m = re.search(r"^(flags|Features)\s*:\s*(.*)$", cpuinfo, re.M)
    flags = set(m.group(2).split()) if m else set()
    if "amx_bf16" in flags or "amx_tile" in flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "sse"


def max_clock_ghz(cpuinfo: str) -> float:
    """The highest clock any source reports: cpufreq's maximum, the model name's '@ x.xxGHz', the
    current 'cpu MHz'. Falls back to 3 GHz when none is readable (other platforms)."""
    found = [float(x) / 1000 for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    found += [float(x) for x in re.findall(r"@\s*([\d.]+)\s*GHz", cpuinfo)]
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        found.append(float(khz) / 1e6)
    except (OSError, ValueError):
        pass
    return max(found) if found else 3.0


def compute_cores() -> int:
    """Cores this process computes on: its torch threads, at most the CPUs it may run on."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), allowed))


@cache
def cpu_peak(dtype: torch.dtype = torch.float32, cores: int | None = None) -> CpuPeak:
    """This process's theoretical peak for ``dtype`` (fp32 unless bf16 is asked for)."""
    info = _cpuinfo()
    isa = isa_level(info)
    per_cycle = _FLOPS_PER_CYCLE[isa][1 if dtype == torch.bfloat16 else 0]
    n, ghz = cores or compute_cores(), max_clock_ghz(info)
    return CpuPeak(n * ghz * 1e9 * per_cycle, n, ghz, per_cycle, isa)
