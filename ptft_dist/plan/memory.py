"""Peak memory of one rank, per ZeRO stage: model states, activations, DeepSpeed's buffers.

Model states (Ψ trainable parameters, n data-parallel ranks, w = bytes of the training dtype;
Adam = two fp32 moments; what DeepSpeed 0.19 allocates, ``runtime/zero/stage_1_and_2.py``,
``stage3.py``, ``bf16_optimizer.py``):

========  ======================  ===========================  ==========================================
stage     parameters              gradients                    optimizer
========  ======================  ===========================  ==========================================
0 fp32    4Ψ                      4Ψ                           8Ψ (the parameters are the master copy)
0 bf16    2Ψ                      2Ψ + 4Ψ (fp32 accumulation)  4Ψ master + 8Ψ (BF16_Optimizer)
1         wΨ                      wΨ + 4Ψ/n (fp32 partition)   4Ψ/n master + 8Ψ/n
2         wΨ (fp32: grads stay    fp32: wΨ (views of whole     4Ψ/n master + 8Ψ/n
          whole, DS 0.19)         param.grad) + 4Ψ/n; bf16:
                                  wΨ/n + 4Ψ/n
3         wΨ/n + w·min(Ψ, 24h²)   wΨ/n + 4Ψ/n                  4Ψ/n master + 8Ψ/n
          gathered (the live-
          parameter bound)
========  ======================  ===========================  ==========================================

Offload (``train.offload_optimizer``) moves the master copy, its gradients and the moments to host
RAM; ``offload_params`` (ZeRO-3) also the parameter partitions.

Activations per micro-batch (saved for backward), per token and layer, q = activation bytes,
m = dropout-mask bytes (a bool on GPU; a float "noise" tensor on CPU, where dropout is not fused),
a = heads, s = padded length, i = intermediate size::

    (8h + 2i)·q          inputs of QKV / output / FFN linears, Q, K, V, LayerNorm inputs, GELU in/out
  + 2h·m                 the two hidden dropouts
  + a·s·(2q + m)         the s×s attention probabilities, their dropout mask, the dropped copy --
                         only when the kernel materialises them (eager; SDPA's math path, which CPU
                         training takes because its flash kernel has no dropout); 0 for flash / packed
  + 2h·q                 SDPA math's scaled copies of Q and K

plus the embeddings (2h·q + h·m per token) and the sparse MLM head (on the masked share f of the
tokens: 4h·q + V·(q + 8) for the logits, their fp32 copy and the log-softmax).

Buffers: gradient buckets, the flattened all-reduce copy, ZeRO-3's gathered buckets -- counted in
copies of the model (Ψ·w). On CPU these coefficients, the activation factor and the runtime term
are *measured* (RSS above the pre-build baseline, DeepSpeed 0.19.8, glibc malloc, which keeps freed
blocks resident); the test suite checks them on another model shape (tests/plan/test_measured.py).
On GPU they follow DeepSpeed's bucket sizes (not measured here: no GPU in this project's CI).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptft_dist.engine.ds_config import zero3_live_parameters
from ptft_dist.plan.hardware import GIB, GPU_RUNTIME_RESERVE_GIB
from ptft_dist.plan.workload import Workload

MIB = 1024**2
ADAM_BYTES = 8  # two fp32 moments per parameter
MASTER_BYTES = 4  # an fp32 copy per parameter

# CPU (glibc) measurements, 2 ranks, fp32, BERT h=512 L=4, seq 128, micro-batch 2/4/8:
# RSS above baseline per micro-batch sample / the formula's bytes ...
CPU_ACTIVATION_FACTOR = 1.5
# ... and per stage, DeepSpeed's buffers beyond the states, in copies of the model (Ψ·4 bytes).
# ZeRO-3 since the model is built partitioned (zero.Init), live parameters are bounded and freed
# buffers go back to the OS (engine/deepspeed.py): measured 387 MiB (h=512 L=4 seq 128 mb 4) and
# 454-488 MiB over four runs (h=384 L=6 seq 96 mb 6, the test's shape) would need 0.3 and 2.3-3.0
# copies -- the model misses a term that differs between them. 1.6 errs on the safe side: the
# under-prediction (the one that ends in an out-of-memory) stays within 11%, the calibration shape
# is over-predicted by 18%.
CPU_BUFFER_COPIES = {0: 1.0, 1: 3.6, 2: 3.3, 3: 1.6}
CPU_RUNTIME_BYTES = 30 * MIB  # process group, engine, loader: RSS above baseline that no model term explains


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at its peak (device memory on GPU, resident memory on CPU)."""

    stage: int
    offload: bool
    micro_batch: int
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    runtime: float
    host_offloaded: float  # states moved to host RAM (not in the total)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.runtime

    def as_dict(self) -> dict[str, float]:
        keys = ("params", "grads", "optimizer", "activations", "buffers", "runtime", "total", "host_offloaded")
        return {k: round(getattr(self, k) / GIB, 6) for k in keys}


# --------------------------------------------------------------------------- model states


def _states(w: Workload, stage: int, ranks: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per rank, before any offload."""
    n, t, q = max(ranks, 1), w.trainable, w.dtype_bytes
    mixed = w.precision != "fp32"
    if stage == 0:
        grads = q * t + (MASTER_BYTES * t if mixed else 0)
        return q * w.params, grads, ADAM_BYTES * t + (MASTER_BYTES * t if mixed else 0)
    optimizer = (MASTER_BYTES + ADAM_BYTES) * t / n
    if stage == 1 or (stage == 2 and not mixed):
        return q * w.params, q * t + MASTER_BYTES * t / n, optimizer
    if stage == 2:
        return q * w.params, q * t / n + MASTER_BYTES * t / n, optimizer
    gathered = min(w.params, zero3_live_parameters(w.hidden))  # the live-parameter bound (engine/ds_config.py)
    return q * w.params / n + q * gathered, q * t / n + MASTER_BYTES * t / n, optimizer


def _offloaded(w: Workload, stage: int, ranks: int, offload_params: bool) -> float:
    """Bytes of states that offload moves off the device (the master copy, its grads, the moments)."""
    n, t = max(ranks, 1), w.trainable
    moved = (MASTER_BYTES + ADAM_BYTES + MASTER_BYTES) * t / n
    if offload_params and stage == 3:
        moved += w.dtype_bytes * w.params / n
    return moved


# --------------------------------------------------------------------------- activations


def activation_bytes_per_token(w: Workload, on_cpu: bool, padded_len: int) -> float:
    """Bytes saved for backward per token of a micro-batch (all layers, embeddings, MLM head)."""
    h, i, a, s = w.hidden, w.intermediate, w.heads, padded_len
    q = w.dtype_bytes
    m = q if on_cpu else 1
    hidden_masks = 2 * h * m if w.hidden_dropout > 0 else 0
    per_layer = (8 * h + 2 * i) * q + hidden_masks
    materialised = on_cpu or w.attn_implementation == "eager"  # CUDA SDPA: flash / memory-efficient kernels
    if materialised and not w.packed:
        probs = a * s * (2 * q + m) if w.attention_dropout > 0 else a * s * q
        per_layer += probs + 2 * h * q
    embeddings = 2 * h * q + (h * m if w.hidden_dropout > 0 else 0)
    head = w.mlm_fraction * (4 * h * q + w.vocab * (q + 8))
    return w.layers * per_layer + embeddings + head


def activation_bytes(w: Workload, micro_batch: int, on_cpu: bool) -> float:
    tokens = micro_batch * w.seq_len
    raw = tokens * activation_bytes_per_token(w, on_cpu, w.seq_len)
    return raw * (CPU_ACTIVATION_FACTOR if on_cpu else 1.0)


# --------------------------------------------------------------------------- buffers


def _buffer_bytes(w: Workload, stage: int, on_cpu: bool) -> float:
    """DeepSpeed's communication / flattening buffers."""
    model_copy = w.dtype_bytes * w.params
    if on_cpu:
        return CPU_BUFFER_COPIES[stage] * model_copy
    q = w.dtype_bytes
    if stage == 0:  # the flattened all-reduce bucket (allreduce_bucket_size 5e8)
        return q * min(w.trainable, 5e8)
    if stage in (1, 2):  # two ipg buckets (overlap_comm) + the flattened all-reduce copy
        return 3 * q * min(w.trainable, 2e8)
    # ZeRO-3: reduce bucket (h²) ×2, prefetch bucket (0.9 h²), the largest parameter gathered twice
    h2 = w.hidden * w.hidden
    largest = max(w.vocab * w.hidden, w.hidden * w.intermediate)
    return q * (2 * h2 + 0.9 * h2 + 2 * largest)


# --------------------------------------------------------------------------- the estimate


def estimate(w: Workload, stage: int, ranks: int, micro_batch: int, *, on_cpu: bool,
             offload: bool = False, offload_params: bool = False) -> MemoryEstimate:
    """Peak bytes of one rank running ``micro_batch`` samples per micro-step at ZeRO ``stage``."""
    params, grads, optimizer = _states(w, stage, ranks)
    host = 0.0
    if offload and stage >= 2:
        host = _offloaded(w, stage, ranks, offload_params)
        n = max(ranks, 1)
        grads -= MASTER_BYTES * w.trainable / n
        optimizer = 0.0
        if offload_params and stage == 3:
            params -= w.dtype_bytes * w.params / n
    runtime = CPU_RUNTIME_BYTES if on_cpu else GPU_RUNTIME_RESERVE_GIB * GIB
    return MemoryEstimate(stage=stage, offload=offload, micro_batch=micro_batch, params=params, grads=grads,
                          optimizer=optimizer, activations=activation_bytes(w, micro_batch, on_cpu),
                          buffers=_buffer_bytes(w, stage, on_cpu), runtime=runtime, host_offloaded=host)


def largest_micro_batch(w: Workload, stage: int, ranks: int, capacity: float, *, on_cpu: bool,
                        offload: bool = False, offload_params: bool = False, limit: int = 65536) -> int:
    """The largest micro-batch whose peak fits ``capacity`` bytes (0 if not even 1 fits)."""
    fixed = estimate(w, stage, ranks, 0, on_cpu=on_cpu, offload=offload, offload_params=offload_params).total
    per_sample = activation_bytes(w, 1, on_cpu)
    if fixed + per_sample > capacity:
        return 0
    return int(min(limit, (capacity - fixed) // per_sample))
