"""What one training step of a pretraining config is, before any hardware is chosen: the model's
shape and exact parameter count, the sample shape, the precision, the attention kernel, the FLOPs.

The model is the one ``ptft pretrain`` would build (:func:`ptft_dist.pretrain.model.planned_config`),
instantiated on the ``meta`` device so the parameter count is exact (tied embeddings counted once)
and costs no memory. The vocabulary comes from the corpus manifest when ``data.corpus`` is readable,
else from ``prepare.tokenizer.vocab_size`` (the tokenizer ``ptft prepare`` would train).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ptft_dist.config import Config
from ptft_dist.plan.hardware import PlanInputError

# Bytes per element of parameters / gradients / activations for each training precision.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Workload:
    """The per-sample and per-model quantities every other planner module reads."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    params: int  # all parameters, tied weights once
    trainable: int  # parameters the optimizer updates (MLM-only runs freeze the pooler and NSP head)
    seq_len: int
    precision: str  # fp32 | bf16 | fp16 (resolved for the device)
    attn_implementation: str
    packed: bool  # a variable-length kernel: pads are not computed, attention keeps no s x s matrix
    attention_dropout: float
    hidden_dropout: float
    mlm_fraction: float
    nsp: bool
    flops_per_token: float  # training FLOPs per (real) token, as the loop counts them for MFU
    vocab_source: str

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    def describe(self) -> str:
        return (f"BERT {self.layers} layers, hidden {self.hidden}, {self.heads} heads, vocab {self.vocab} "
                f"({self.vocab_source}); {self.params / 1e6:.1f}M parameters; seq {self.seq_len}; {self.precision}; "
                f"attention {self.attn_implementation}{' (packed)' if self.packed else ''}")


def _vocab(cfg: Config) -> tuple[int, str]:
    if cfg.data.corpus:
        try:
            from ptft_dist.corpus.format import load_manifest

            manifest = load_manifest(cfg.data.corpus, cfg.data.storage_options)
            return manifest.vocab_size, f"from the corpus {cfg.data.corpus}"
        except Exception as exc:  # unreadable here (remote, not made yet): the planned tokenizer's size
            why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            return cfg.prepare.tokenizer.vocab_size, f"prepare.tokenizer.vocab_size; corpus not read: {why}"
    return cfg.prepare.tokenizer.vocab_size, "prepare.tokenizer.vocab_size"


def resolve_precision(precision: str, accel: str) -> str:
    """``auto`` is bf16 on a GPU, fp32 on a CPU -- as the engine resolves it."""
    if precision == "auto":
        return "fp32" if accel == "cpu" else "bf16"
    if accel == "cpu" and precision != "fp32":
        raise PlanInputError(f"train.precision={precision} on cpu: the loop trains fp32 on CPU")
    return precision


def _count_parameters(bert: Any, nsp: bool) -> tuple[int, int]:
    """(all, trainable) parameters of the model the loop builds, counted on the meta device."""
    import torch
    from transformers import BertForPreTraining

    with torch.device("meta"):
        model = BertForPreTraining(bert)
    total = sum(p.numel() for p in model.parameters())
    frozen = 0
    if not nsp:  # BertPretrainer freezes the pooler and the NSP classifier for MLM-only runs
        for head in (model.bert.pooler, model.cls.seq_relationship):
            if head is not None:
                frozen += sum(p.numel() for p in head.parameters())
    return total, total - frozen


def build_workload(cfg: Config, accel: str) -> Workload:
    """The workload of ``cfg`` as ``ptft pretrain`` would run it on ``accel`` ranks."""
    from ptft_dist.pretrain.model import attn_supports_packing, flops_per_token, packing_implementation, planned_config

    vocab, vocab_source = _vocab(cfg)
    pad = 0
    bert = planned_config(cfg.model, vocab, pad)
    total, trainable = _count_parameters(bert, cfg.data.nsp)
    seq = int(cfg.data.max_seq_len)
    impl = cfg.model.attn_implementation or "sdpa"
    # CPU packs too (per-sample SDPA), but keeps each sample's l x l matrix: planned as padded there.
    packed = bool(cfg.model.unpad) and attn_supports_packing(packing_implementation(impl, True)) and accel != "cpu"
    mlm = float(cfg.data.mlm_probability)
    return Workload(
        hidden=bert.hidden_size, layers=bert.num_hidden_layers, heads=bert.num_attention_heads,
        intermediate=bert.intermediate_size, vocab=bert.vocab_size, params=total, trainable=trainable,
        seq_len=seq, precision=resolve_precision(cfg.train.precision, accel), attn_implementation=impl,
        packed=packed, attention_dropout=float(bert.attention_probs_dropout_prob),
        hidden_dropout=float(bert.hidden_dropout_prob), mlm_fraction=mlm, nsp=bool(cfg.data.nsp),
        flops_per_token=flops_per_token(bert, seq, mlm, cfg.data.nsp), vocab_source=vocab_source,
    )
