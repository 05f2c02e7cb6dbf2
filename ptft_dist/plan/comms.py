"""Bytes a data-parallel rank communicates per optimizer step, per ZeRO stage, and how long that
takes over a ring / tree of links.

What DeepSpeed 0.19 actually sends (read from its code and checked against its comms logger on a
real 2-rank run, tests/plan/test_measured.py), with Ψ the trainable parameters, b the bytes of the
training dtype and n the data-parallel ranks:

==========  ===============================================  ==========  ============================
stage       collectives                                      when        bytes one rank sends (ring)
==========  ===============================================  ==========  ============================
0           all-reduce of the gradients                      per step    2(n-1)/n · Ψb
1           all-reduce of the gradients (``use_multi_rank_   per step    2(n-1)/n · Ψb + (n-1)/n · Ψb
            bucket_allreduce``, its default -- not the
            paper's reduce-scatter), all-gather of the
            updated parameter partitions
2           as 1, but the gradients are reduced in every     per micro   (the all-reduce × accum)
            micro-batch's backward (partitioned gradients)
3           all-gather of each parameter before use,         per micro   (n-1)/n · Ψb per gather pass
            reduce-scatter of the gradients                              + (n-1)/n · Ψb
==========  ===============================================  ==========  ============================

ZeRO-3 gathers each parameter once per micro-batch when it stays gathered between forward and
backward (``stage3_max_reuse_distance`` ≥ Ψ, the template's 1e9), twice otherwise: the paper's 3Ψ
is the twice case. The *logged* sizes are what DeepSpeed's comms logger records per call (the
tensor argument: the whole bucket for an all-reduce or a reduce-scatter, this rank's partition for
an all-gather); the wire bytes are the ring volumes above.

Time of one collective over ``n = nodes × per_node`` ranks (NCCL's ring; a tree when cheaper):
the bandwidth term is the rank's wire bytes over the slowest hop -- the intra-node link, or the
node's NICs together (a ring crosses each node boundary once per channel, so a node's NICs carry
one rank's volume, whatever the ranks per node) -- and the latency term is one link latency per
ring step (2(n-1) for an all-reduce) or per tree level (2·log2 n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ptft_dist.engine.ds_config import zero3_live_parameters
from ptft_dist.plan.hardware import Accelerator, Interconnect
from ptft_dist.plan.workload import Workload

# DeepSpeed defaults our templates resolve (ptft_dist/engine/ds_config.py): ZeRO-0 buckets
# (allreduce_bucket_size), ZeRO-1/2 reduce/all-gather buckets; ZeRO-3's reuse distance: zero3_live_parameters.
ZERO0_BUCKET = int(5e8)
ZERO12_BUCKET = int(2e8)


def zero3_regathered_params(w: Workload) -> float:
    """Parameters ZeRO-3 gathers a second time, for backward: those whose forward and backward uses
    are further apart than ``stage3_max_reuse_distance`` (engine/ds_config.py: ~2 layers). Between a
    layer's two uses the layers after it run; the embeddings are used first, so released. Measured
    on 2 CPU ranks (DeepSpeed's comms logger, fp32): 1.57 and 1.72 gathers per micro-batch for
    h=512 L=4 and h=384 L=6; this model gives 1.50 and 1.64."""
    h, i = w.hidden, w.intermediate
    limit = zero3_live_parameters(h)
    layer = 4 * h * h + 2 * h * i + 9 * h + 2 * i
    outside_layers = w.params - w.layers * layer  # embeddings; pooler and MLM transform (2h², used last: kept)
    regathered = float(max(outside_layers - 2 * h * h, 0))
    regathered += sum(layer for lyr in range(w.layers) if (w.layers - 1 - lyr) * layer >= limit)
    return min(regathered, float(w.params))


@dataclass(frozen=True)
class Collective:
    """One kind of collective of a step: DeepSpeed's name for it, sizes, calls, when it runs."""

    op: str  # all_reduce | all_gather_into_tensor | reduce_scatter_tensor
    logged_bytes: float  # per step, as DeepSpeed's comms logger sums its msg sizes
    wire_bytes: float  # per step, bytes one rank sends over its links (ring volume)
    calls: int  # per step
    overlappable: bool  # runs inside backward / forward (hidden when overlap_comm is on)
    why: str


@dataclass(frozen=True)
class CommPlan:
    """The collectives of one optimizer step of one rank."""

    stage: int
    ranks: int
    collectives: list[Collective] = field(default_factory=list)

    @property
    def logged_bytes(self) -> float:
        return sum(c.logged_bytes for c in self.collectives)

    @property
    def wire_bytes(self) -> float:
        return sum(c.wire_bytes for c in self.collectives)

    def by_op(self) -> dict[str, float]:
        """Logged bytes per DeepSpeed op name (what the comms logger's summary lists)."""
        out: dict[str, float] = {}
        for c in self.collectives:
            out[c.op] = out.get(c.op, 0.0) + c.logged_bytes
        return out


def _parameter_tensors(w: Workload) -> int:
    """Parameter tensors of a BERT for pretraining (ZeRO-3 gathers each one on its own): 16 per
    layer, 5 in the embeddings, 2 in the pooler, 6 in the heads (the decoder weight is tied)."""
    return 16 * w.layers + 13


def comm_plan(w: Workload, stage: int, ranks: int, grad_accum: int) -> CommPlan:
    """The collectives of one optimizer step (``grad_accum`` micro-batches) on ``ranks`` ranks."""
    plan = CommPlan(stage, ranks)
    if ranks <= 1:
        return plan
    n, b, accum = ranks, w.dtype_bytes, grad_accum
    grads = w.trainable * b
    ring = (n - 1) / n
    add = plan.collectives.append
    if stage == 0:
        add(Collective("all_reduce", grads, 2 * ring * grads, 2 * math.ceil(w.trainable / ZERO0_BUCKET), False,
                       "gradients, all-reduced once per step after the last backward"))
        return plan
    if stage in (1, 2):
        per = accum if stage == 2 else 1
        add(Collective("all_reduce", grads * per, 2 * ring * grads * per,
                       per * 2 * math.ceil(w.trainable / ZERO12_BUCKET), True,
                       "gradients, all-reduced in buckets " + ("in every micro-batch's backward" if stage == 2
                                                              else "in the last micro-batch's backward")))
        add(Collective("all_gather_into_tensor", grads / n, ring * grads, math.ceil(w.trainable / ZERO12_BUCKET),
                       False, "updated parameter partitions, all-gathered after the optimizer step"))
        return plan
    passes = 1 + zero3_regathered_params(w) / max(w.params, 1)
    gathered = w.params * b
    add(Collective("all_gather_into_tensor", passes * accum * gathered / n, passes * accum * ring * gathered,
                   math.ceil(passes * accum * _parameter_tensors(w)), True,
                   f"each parameter gathered before use, {passes:.2f}x per micro-batch (parameters further "
                   "than the reuse distance from their backward are released after forward and gathered again)"))
    buckets = math.ceil(w.trainable / max(w.hidden * w.hidden, 1))
    add(Collective("reduce_scatter_tensor", accum * grads, accum * ring * grads, accum * buckets, True,
                   "gradients, reduce-scattered in every micro-batch's backward"))
    return plan


# --------------------------------------------------------------------------- time on the wire


@dataclass(frozen=True)
class Topology:
    """Where the ranks are and what joins them."""

    nodes: int
    per_node: int
    accel: Accelerator
    link: Interconnect
    nics_per_node: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.per_node

    @property
    def node_gbyte_s(self) -> float:
        """What a node's NICs carry together, one direction, GB/s."""
        return self.nics_per_node * self.link.gbyte_s


def bottleneck_gbyte_s(topo: Topology) -> float:
    """The slowest hop of a ring through every rank, GB/s (one direction)."""
    hops = []
    if topo.per_node > 1:
        hops.append(topo.accel.intra_node_gbps)
    if topo.nodes > 1:
        hops.append(topo.node_gbyte_s)
    return min(hops) if hops else math.inf


# gloo (CPU ranks) between hosts, per collective: the share of the link's usable (TCP) rate it
# reaches. Measured with two ranks in network namespaces over a tc-tbf-shaped veth pair (torch 2.13,
# 14 MB all-reduce / 7 MB-per-rank all-gather, 50 and 200 Mbit): all_reduce 43.6-44.2 of 47.8 and
# 159-180 of 191 Mbit/s payload (the reverse stream's ACKs share the link); all_gather_into_tensor
# 29-30 and 121-126 Mbit/s -- its ring does not overlap sending with receiving. NCCL needs no such
# factor (its busbw is what the interconnect efficiency already states).
GLOO_OP_EFFICIENCY = {"all_reduce": 0.92, "reduce_scatter_tensor": 0.92, "all_gather_into_tensor": 0.63}


def collective_seconds(c: Collective, topo: Topology) -> float:
    """Time of a step's worth of one collective: bandwidth term + latency (ring or tree, the cheaper)."""
    n = topo.ranks
    if n <= 1 or c.wire_bytes <= 0:
        return 0.0
    rate = bottleneck_gbyte_s(topo)
    if topo.accel.key == "cpu" and topo.nodes > 1:
        rate *= GLOO_OP_EFFICIENCY.get(c.op, 1.0)
    bandwidth_s = c.wire_bytes / (rate * 1e9)
    alpha = (topo.link.latency_us if topo.nodes > 1 else 2.0) * 1e-6
    steps = 2 * (n - 1) if c.op == "all_reduce" else n - 1
    levels = 2 * math.ceil(math.log2(n)) if c.op == "all_reduce" else math.ceil(math.log2(n))
    return bandwidth_s + c.calls * alpha * min(steps, levels)
