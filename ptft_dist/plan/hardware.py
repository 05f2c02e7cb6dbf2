"""What the planner assumes about the machines: accelerators, links between them, and the MFU a
BERT step reaches on them -- every number with where it comes from.

Peak FLOP/s are not repeated here: they come from :func:`ptft_dist.metrics.throughput.gpu_peak_tflops`
(the table MFU is logged against), looked up by the device name below. For ``cpu`` the peak is the
instruction-set peak the training loop logs MFU against (:func:`~ptft_dist.metrics.throughput.device_peak_flops`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ptft_dist.errors import UserError

GIB = 1024**3


class PlanInputError(UserError, ValueError):
    """A planner input that names no known hardware, or a job that cannot be laid out as asked."""


# --------------------------------------------------------------------------- accelerators


@dataclass(frozen=True)
class Accelerator:
    """One device a rank runs on."""

    key: str
    device_name: str  # what torch.cuda.get_device_name() says: the key into the peak table
    memory_gib: float  # capacity (binary GiB, as nvidia-smi and torch report it)
    intra_node_gbps: float  # GB/s one device can send to its node's peers (one direction)
    source: str


# Reserved per GPU rank before any tensor: CUDA context + cuBLAS/cuDNN workspaces (~0.5-0.8 GiB)
# and NCCL's channel buffers (~0.3-1 GiB at 8+ ranks); measured by anyone as
# nvidia-smi usage minus torch.cuda.max_memory_reserved() of a running job.
GPU_RUNTIME_RESERVE_GIB = 1.5

ACCELERATORS: dict[str, Accelerator] = {
    "a100": Accelerator("a100", "NVIDIA A100-SXM4-80GB", 80 * 1e9 / GIB, 300.0,
                        "NVIDIA A100 datasheet: 80 GB HBM2e, NVLink 3 600 GB/s (both directions)"),
    "h100": Accelerator("h100", "NVIDIA H100 80GB HBM3", 80 * 1e9 / GIB, 450.0,
                        "NVIDIA H100 datasheet (SXM5): 80 GB HBM3, NVLink 4 900 GB/s (both directions)"),
    "h200": Accelerator("h200", "NVIDIA H200", 141 * 1e9 / GIB, 450.0,
                        "NVIDIA H200 datasheet (SXM): 141 GB HBM3e, NVLink 4 900 GB/s (both directions)"),
    "b200": Accelerator("b200", "NVIDIA B200", 180 * 1e9 / GIB, 900.0,
                        "NVIDIA DGX B200 datasheet: 1,440 GB HBM3e for 8 GPUs, NVLink 5 1.8 TB/s per GPU "
                        "(both directions)"),
    "cpu": Accelerator("cpu", "cpu", 0.0, 1.0,
                       "this host: memory = RAM / ranks per node (psutil); peak = the loop's fp32 matmul probe; "
                       "ranks on one host talk gloo over loopback TCP, ~1 GB/s (a veth pair measured 0.72 GB/s "
                       "on this project's 2-core CI machine)"),
}


def accelerator(name: str) -> Accelerator:
    key = name.strip().lower()
    if key not in ACCELERATORS:
        raise PlanInputError(f"--gpu {name!r}: unknown; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]


def host_memory_gib() -> float:
    """This machine's RAM (what ``--gpu cpu`` ranks share)."""
    import psutil

    return psutil.virtual_memory().total / GIB


# --------------------------------------------------------------------------- links between nodes


@dataclass(frozen=True)
class Interconnect:
    """The network between nodes: per NIC, one direction."""

    key: str
    gbit_s: float  # line rate of one NIC
    latency_us: float  # one message, end to end, through the collective library
    efficiency: float  # share of the line rate a large collective reaches (protocol, framing)
    nics_per_node: int  # 0 = one per accelerator (rail-optimised clusters)
    source: str

    @property
    def gbyte_s(self) -> float:
        return self.gbit_s / 8.0 * self.efficiency


# TCP over a 1500-byte MTU: 1448 payload bytes (20 IP + 20 TCP + 12 timestamp option) per 1514
# bytes on the wire as Linux shapers count them (the 14-byte Ethernet header, no preamble/FCS).
TCP_EFFICIENCY = 1448.0 / 1514.0
# NCCL all-reduce bus bandwidth over InfiniBand / RoCE reaches ~90% of the line rate at large
# messages (nccl-tests PERFORMANCE.md's busbw; NVIDIA's published DGX runs).
RDMA_EFFICIENCY = 0.90

INTERCONNECTS: dict[str, Interconnect] = {
    "ib400": Interconnect("ib400", 400.0, 5.0, RDMA_EFFICIENCY, 0,
                          "InfiniBand NDR (ConnectX-7), one 400 Gb/s HCA per GPU as in DGX H100/H200"),
    "ib200": Interconnect("ib200", 200.0, 5.0, RDMA_EFFICIENCY, 0,
                          "InfiniBand HDR (ConnectX-6), one 200 Gb/s HCA per GPU as in DGX A100"),
    "ib100": Interconnect("ib100", 100.0, 5.0, RDMA_EFFICIENCY, 0, "InfiniBand EDR, one HCA per GPU"),
    "roce400": Interconnect("roce400", 400.0, 8.0, RDMA_EFFICIENCY, 0, "RoCE v2, 400 GbE, one NIC per GPU"),
    "roce200": Interconnect("roce200", 200.0, 8.0, RDMA_EFFICIENCY, 0, "RoCE v2, 200 GbE, one NIC per GPU"),
    "roce100": Interconnect("roce100", 100.0, 8.0, RDMA_EFFICIENCY, 1, "RoCE v2, one 100 GbE NIC per node"),
    "ethernet100": Interconnect("ethernet100", 100.0, 30.0, TCP_EFFICIENCY, 1, "100 GbE, TCP sockets, one NIC"),
    "ethernet25": Interconnect("ethernet25", 25.0, 30.0, TCP_EFFICIENCY, 1, "25 GbE, TCP sockets, one NIC"),
    "ethernet10": Interconnect("ethernet10", 10.0, 30.0, TCP_EFFICIENCY, 1, "10 GbE, TCP sockets, one NIC"),
    "ethernet1": Interconnect("ethernet1", 1.0, 50.0, TCP_EFFICIENCY, 1, "1 GbE, TCP sockets, one NIC"),
}

_RATE = re.compile(r"^(?:tcp:)?(\d+(?:\.\d+)?)\s*([kmg])bit$")
_SCALE = {"k": 1e-6, "m": 1e-3, "g": 1.0}


def interconnect(name: str) -> Interconnect:
    """A name from :data:`INTERCONNECTS`, or a TCP link of a given rate: ``50mbit``, ``tcp:1gbit``."""
    key = name.strip().lower()
    if key in INTERCONNECTS:
        return INTERCONNECTS[key]
    m = _RATE.match(key)
    if m:
        gbit = float(m.group(1)) * _SCALE[m.group(2)]
        if gbit > 0:
            return Interconnect(key, gbit, 100.0, TCP_EFFICIENCY, 1,
                                f"a {m.group(1)} {m.group(2).upper()}bit/s TCP link (user-given rate)")
    raise PlanInputError(f"--interconnect {name!r}: unknown; known: {', '.join(INTERCONNECTS)}, "
                         f"or a TCP link rate such as 50mbit, 1gbit, tcp:10gbit")


# --------------------------------------------------------------------------- achieved MFU


@dataclass(frozen=True)
class MfuSource:
    """The share of the peak a BERT training step reaches, and the run it was read from."""

    mfu: float
    source: str
    ours: bool  # measured by this project (a run of ``ptft pretrain``), not a published figure


# (accelerator, precision) -> MFU. Ours where we have a run; else a published run, named as such.
MEASURED_MFU: dict[tuple[str, str], MfuSource] = {
    ("cpu", "fp32"): MfuSource(
        0.363, "ours: benchmarks/pretrain_throughput.py, `ptft pretrain` mini, seq 128, micro-batch 32, 2 threads, "
        "2026-11-29: 0.0977 TFLOP/s achieved = 36.3% of the instruction-set peak 0.269 TFLOP/s "
        "(2 cores x 2.1 GHz x 64 FLOP/cycle; metrics/cpu_peak.py)", True),
    ("a100", "bf16"): MfuSource(
        0.366, "published, not ours: NVIDIA DeepLearningExamples TensorFlow2 BERT README, BERT-large phase 1 "
        "(seq 128, LAMB, mixed precision) on 1 DGX A100: 3,803.82 seq/s for 8 GPUs = 36.6% of 312 TFLOP/s by "
        "ptft's FLOP count", False),
}
# Hopper/Blackwell: no run of ours yet; the A100 figure is used (a faster chip usually reaches a
# lower MFU on a model this small, so treat these as optimistic) until `--calibrate RUN_DIR` or
# `--mfu` gives a measured one.
for _gpu in ("h100", "h200", "b200"):
    MEASURED_MFU[(_gpu, "bf16")] = MfuSource(
        MEASURED_MFU[("a100", "bf16")].mfu,
        f"assumed: no {_gpu.upper()} run of ours yet; the A100 published figure (36.6%) -- pass --calibrate RUN_DIR "
        f"or --mfu", False)


def mfu_for(accel: str, precision: str) -> MfuSource:
    found = MEASURED_MFU.get((accel, precision)) or MEASURED_MFU.get((accel, "bf16"))
    if found is None:
        raise PlanInputError(f"no MFU known for {accel} {precision}: pass --mfu or --calibrate RUN_DIR")
    return found


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
