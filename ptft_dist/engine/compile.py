"""``model.compile`` / ``finetune.compile``: torch.compile of the engine's model, and its cost.

Why compile: on a GPU the encoder is many small element-wise kernels (bias, GELU, dropout,
LayerNorm, residual) between the matmuls; inductor fuses them. On CPU we measured no speed-up
(0.8-1.15x) for 30-70 s of compile (docs/performance.md), so it stays off by default.

How: under DeepSpeed (either backend) DeepSpeed's own ``engine.compile()`` -- it compiles the wrapped
module in place and knows its ZeRO hooks; under Accelerate's DDP, ``nn.Module.compile()`` of the
DDP module (torch's DDPOptimizer splits the graph at gradient buckets). Compilation is lazy: it
happens during the first steps (the forward graph in the first forward, the backward graph in the
first backward, again for a new shape until shapes are marked dynamic). :func:`compile_seconds`
reads torch's own compile timers, so the loop can report compile time apart from step time.
"""

from __future__ import annotations

from typing import Any

from ptft_dist.log import get_logger

log = get_logger("engine")

# torch's timers (torch._dynamo.utils.compilation_time_metrics), which do not overlap: the whole of a
# dynamo frame compile (trace, AOT, inductor; a backward compiled eagerly is inside it) and the
# lazily compiled backward ("entire_backward_compile"). The inductor bw_compiler timer is not
# summed: it runs inside one or the other.
_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


def compile_engine(engine: Any) -> str:
    """Compile ``engine``'s model in place; returns how (for the log)."""
    ds = getattr(engine, "ds", None) or getattr(engine, "_ds", None)
    if ds is not None:
        ds.compile()
        how = "DeepSpeed engine.compile() (inductor)"
    else:
        engine.model.compile()
        how = "torch.compile of the DDP module (inductor)"
    log.info("compile: %s; the first steps compile (time reported as compile_s, not in step time)", how)
    return how


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo + inductor, forward and backward)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - torch without dynamo
        return 0.0
    return float(sum(sum(compilation_time_metrics.get(name, ())) for name in _TIMERS))
