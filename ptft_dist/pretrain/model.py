"""The pretraining model: a stock ``BertForPreTraining`` with a loss that skips wasted work.

Why a wrapper and not a subclass: exports must be plain Hugging Face (docs/design.md, guarantee 8). The
wrapper registers the HF model's own ``bert`` and ``cls`` modules as its children, so its
``state_dict()`` keys are exactly ``BertForPreTraining``'s (``bert.*``, ``cls.*``), DeepSpeed /
ZeRO checkpoints hold those names, and ``pretrainer.hf_model.save_pretrained(dir)`` writes a model
with ``architectures: ["BertForPreTraining"]`` that ``AutoModelForPreTraining`` loads with no
custom code. Only ``forward`` differs:

* **Sparse MLM head.** The prediction head (transform + tied decoder to the vocabulary) runs only
  on the rows whose label is not -100 (~15 % of the tokens) instead of every position. The loss,
  the gradients and the logits of the predicted rows are those of the dense head.
* **Unpadding** (``unpad=True``), honestly scoped: see :class:`BertPretrainer`.
* Metrics come back as tensors (``mlm_correct``, ``mlm_count``, ...) so accuracy needs no extra
  device sync; the loop adds them up and syncs once per log interval.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForPreTraining

from ptft_dist.config import ConfigError, ModelConfig
from ptft_dist.pretrain import attention
from ptft_dist.stream.loader import MODEL_INPUTS
from ptft_dist.stream.masking import IGNORE_INDEX

log = logging.getLogger(__name__)

# Standard BERT shapes: Turc et al. 2019 ("Well-Read Students Learn Better") and Devlin et al. 2019.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2},
    "mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4},
    "small": {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8},
    "medium": {"num_hidden_layers": 8, "hidden_size": 512, "num_attention_heads": 8},
    "base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16},
}

# Attention functions (names registered with transformers' AttentionInterface) that honour the
# ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs of a packed (1, total_tokens) batch. The flash
# family is recognised by transformers' own check; ptft's own (torch kernels) is pretrain/attention.py.
VARLEN_ATTENTION_IMPLEMENTATIONS: set[str] = {attention.NAME}
# CPU packing runs one SDPA call per sample: below this pad share the work it saves is smaller than
# that loop's cost, so such micro-batches run padded (same result; docs/performance.md). The
# environment variable exists for benchmarks and the GPU benchmark's CPU smoke mode (0 = always pack).
CPU_MIN_PAD_SHARE = float(os.environ.get("PTFT_CPU_MIN_PAD_SHARE", "0.10"))


# --------------------------------------------------------------------------- config


def _positive_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def bert_config(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> BertConfig:
    """The ``BertConfig`` of a preset with the config's overrides (intermediate = 4 × hidden unless set)."""
    if model_cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset: {model_cfg.preset!r} is not one of {sorted(PRESETS)}")
    shape = dict(PRESETS[model_cfg.preset])
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = getattr(model_cfg, key)
        if value is not None:
            shape[key] = _positive_int(f"model.{key}", value)
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(f"model.hidden_size ({hidden}) is not divisible by model.num_attention_heads ({heads})")
    shape.setdefault("intermediate_size", 4 * hidden)
    _positive_int("model.max_position_embeddings", model_cfg.max_position_embeddings)
    _positive_int("vocab_size (from the corpus tokenizer)", vocab_size)
    if not 0 <= pad_token_id < vocab_size:
        raise ConfigError(f"pad_token_id {pad_token_id} is outside the vocabulary (size {vocab_size})")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        p = getattr(model_cfg, key)
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {p!r}")
    impl = model_cfg.attn_implementation or "sdpa"
    _check_attn_implementation(impl)
    return BertConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        type_vocab_size=2,
        max_position_embeddings=model_cfg.max_position_embeddings,
        hidden_dropout_prob=model_cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=model_cfg.attention_probs_dropout_prob,
        attn_implementation=impl,
        **shape,
    )


def _check_attn_implementation(impl: str) -> None:
    from transformers import AttentionInterface

    known = {"eager", *AttentionInterface._global_mapping}
    if impl not in known and "/" not in impl:  # "org/kernel" names are hub kernels, checked by transformers
        raise ConfigError(f"model.attn_implementation: {impl!r} is not one of {sorted(known)} (or a hub kernel)")


def packing_implementation(impl: str | None, unpad: bool) -> str | None:
    """The attention a model with ``model.attn_implementation=impl`` runs: with ``unpad``, ``sdpa`` (the
    default) becomes ``ptft_varlen``, which is sdpa on padded batches and packs on every device."""
    return attention.NAME if unpad and impl in (None, "sdpa") else impl


def attn_supports_packing(impl: str | None) -> bool:
    """Whether the attention implementation runs packed variable-length sequences (cu_seqlens)."""
    if not impl:
        return False
    from transformers.utils.generic import is_flash_attention_requested

    return impl in VARLEN_ATTENTION_IMPLEMENTATIONS or is_flash_attention_requested(
        requested_attention_implementation=impl
    )


# --------------------------------------------------------------------------- model


@dataclass
class PretrainOutput:
    """Losses (``loss`` carries the graph; the parts are detached) and metric counts (tensors)."""

    loss: torch.Tensor
    mlm_loss: torch.Tensor
    nsp_loss: torch.Tensor | None
    mlm_correct: torch.Tensor
    mlm_count: torch.Tensor
    nsp_correct: torch.Tensor | None
    nsp_count: torch.Tensor | None


class BertPretrainer(nn.Module):
    """MLM (+ NSP) pretraining loss around a stock ``BertForPreTraining``.

    Loss: ``mlm_loss`` is the mean cross-entropy over this micro-batch's predicted tokens (labels
    != -100) and ``nsp_loss`` the mean over samples with ``next_sentence_label`` != -100, exactly
    like ``BertForPreTraining``; an empty micro-batch gives 0 instead of NaN. Padding samples (all
    labels -100) therefore contribute nothing. Logits are upcast to fp32 before the loss.

    ``unpad`` -- what is and is not skipped:

    * If the attention implementation has a variable-length kernel (``sdpa``, which becomes
      ``ptft_varlen`` -- torch's varlen_attn on CUDA, per-sample SDPA on CPU, see
      pretrain/attention.py --, ``flash_attention_2/3/4``, a hub flash kernel, or a name in
      ``VARLEN_ATTENTION_IMPLEMENTATIONS``), the micro-batch is
      **packed**: the real tokens of all samples are concatenated into one (1, T) sequence with
      per-sample position ids and ``cu_seqlens``, and the whole encoder (embeddings, every linear
      layer, attention) runs on real tokens only; attention stays within each sample.
      ``self.packed`` is then True. Requires right padding (each row's tokens are a prefix), which
      is what the data stream produces; pass its ``cu_seqlens``/``indices``/``max_seqlen`` to avoid
      recomputing them (recomputing costs two host syncs).
    * Otherwise (``eager``, ``flex_attention``) nothing is packed:
      transformers' BERT has no varlen path for them. The encoder processes every position of the
      micro-batch, pad positions included; what limits that waste is the data stream, which pads
      each micro-batch only to its longest sample. Pads are still masked out of attention, never
      reach the MLM head (sparse) and never enter a loss.
    """

    def __init__(
        self,
        hf_model: BertForPreTraining,
        *,
        nsp: bool = True,
        sparse_mlm_head: bool = True,
        unpad: bool = True,
    ) -> None:
        super().__init__()
        # The HF model's own children: state_dict keys are BertForPreTraining's, ties intact.
        self.bert = hf_model.bert
        self.cls = hf_model.cls
        object.__setattr__(self, "_hf_model", hf_model)  # a reference, not a submodule (no "model." prefix)
        self.config: BertConfig = hf_model.config
        self.nsp = nsp
        self.sparse_mlm_head = sparse_mlm_head
        impl = packing_implementation(self.config._attn_implementation, bool(unpad))
        if impl != self.config._attn_implementation:
            hf_model.set_attn_implementation(impl)  # sdpa -> ptft_varlen: same math, packed batches too
        self.packed = bool(unpad) and attn_supports_packing(self.config._attn_implementation)
        if not nsp:
            # MLM only: pooler and NSP head stay in the module (the export keeps its shape) but are
            # frozen; they would get no gradient anyway, and unused trainable parameters make DDP
            # (Accelerate) fail without find_unused_parameters.
            for head in (self.bert.pooler, self.cls.seq_relationship):
                if head is not None:
                    head.requires_grad_(False)
        if unpad and not self.packed:
            log.info(
                "model.unpad: attention %r has no variable-length kernel; micro-batches run padded "
                "(to their longest sample)",
                self.config._attn_implementation,
            )

    @property
    def hf_model(self) -> BertForPreTraining:
        """The plain HF model sharing these weights: ``save_pretrained`` it to export."""
        return self._hf_model

    @classmethod
    def from_config(cls, config: BertConfig, **kwargs: Any) -> BertPretrainer:
        return cls(new_bert_for_pretraining(config), **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        max_seqlen: int | torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,  # accepted so the loop can pass the whole batch
    ) -> PretrainOutput:
        if labels is None:
            raise ConfigError("BertPretrainer needs MLM labels (-100 where nothing is predicted)")
        if self.nsp and next_sentence_label is None:
            raise ConfigError("NSP is on (data.nsp=true) but the batch has no next_sentence_label")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.packed and _worth_packing(input_ids, attention_mask, indices):
            hidden, flat_labels, pooled = self._encode_packed(
                input_ids, token_type_ids, attention_mask, labels, position_ids, cu_seqlens, indices, max_seqlen
            )
        else:
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                return_dict=True,
            )
            hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            flat_labels = labels.reshape(-1)
            pooled = out.pooler_output

        mlm_loss, mlm_correct, mlm_count = self._mlm(hidden, flat_labels)
        loss, nsp_loss, nsp_correct, nsp_count = mlm_loss, None, None, None
        if self.nsp:
            nsp_logits = self.cls.seq_relationship(pooled).float()
            nsp_loss, nsp_correct, nsp_count = _ce_stats(nsp_logits, next_sentence_label.reshape(-1))
            loss = mlm_loss + nsp_loss
        return PretrainOutput(
            loss=loss,
            mlm_loss=mlm_loss.detach(),
            nsp_loss=None if nsp_loss is None else nsp_loss.detach(),
            mlm_correct=mlm_correct,
            mlm_count=mlm_count,
            nsp_correct=nsp_correct,
            nsp_count=nsp_count,
        )

    def _mlm(self, hidden: torch.Tensor, flat_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """MLM loss/accuracy from (N, H) hidden states and (N,) labels."""
        if self.sparse_mlm_head:
            # One host sync (nonzero): the price of running the head on predicted rows only.
            rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
            hidden, flat_labels = hidden.index_select(0, rows), flat_labels.index_select(0, rows)
        logits = self.cls.predictions(hidden).float()
        return _ce_stats(logits, flat_labels)

    def _encode_packed(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        indices: torch.Tensor | None,
        max_seqlen: int | torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder on the real tokens only, as one packed (1, T) sequence."""
        device = input_ids.device
        width = input_ids.shape[1]
        if indices is None or cu_seqlens is None or max_seqlen is None:
            lengths = attention_mask.sum(1, dtype=torch.int32)
            indices = attention_mask.reshape(-1).nonzero().squeeze(1)
            cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_seqlen = lengths.max()
        indices = indices.to(device=device, dtype=torch.long, non_blocking=True)
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        max_seqlen = int(max_seqlen)
        if position_ids is None:
            positions = indices % width  # right padding: a row's tokens sit at columns 0..len-1
        else:
            positions = position_ids.expand_as(input_ids).reshape(-1).index_select(0, indices)
        out = self.bert(
            input_ids=input_ids.reshape(-1).index_select(0, indices)[None],
            token_type_ids=token_type_ids.reshape(-1).index_select(0, indices)[None],
            position_ids=positions[None],
            attention_mask=None,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            return_dict=True,
        )
        hidden = out.last_hidden_state[0]  # (T, H)
        first = cu_seqlens[:-1].long()  # each sample's [CLS] row
        pooled = self.bert.pooler(hidden.index_select(0, first)[:, None]) if self.nsp else None
        return hidden, labels.reshape(-1).index_select(0, indices), pooled


def _worth_packing(input_ids: torch.Tensor, attention_mask: torch.Tensor, indices: torch.Tensor | None) -> bool:
    """Always on GPUs; on CPU only when pads are at least ``CPU_MIN_PAD_SHARE`` of the micro-batch."""
    if input_ids.device.type != "cpu":
        return True
    real = indices.numel() if indices is not None else int(attention_mask.sum())
    return 1.0 - real / max(input_ids.numel(), 1) >= CPU_MIN_PAD_SHARE


def _ce_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE over non-ignored targets, 0 if none; #correct; #counted) without host syncs."""
    valid = target != IGNORE_INDEX
    count = valid.sum()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = total / count.clamp(min=1)
    correct = ((logits.detach().argmax(-1) == target) & valid).sum()
    return loss, correct, count


def new_bert_for_pretraining(config: BertConfig) -> BertForPreTraining:
    """A freshly initialised ``BertForPreTraining``; under ZeRO-3 one that no rank ever holds whole.

    Inside ``engine.model_build_context`` with ZeRO-3 (transformers then reports
    ``is_deepspeed_zero3_enabled()``), transformers builds it within ``deepspeed.zero.Init``: each
    parameter is partitioned as its module is created, and rank 0 initialises one module at a time
    on gathered parameters. Elsewhere it is built whole. Both paths skip torch's default init and
    draw HF's ``_init_weights`` in the same module order, so a seed gives the same weights under
    every ZeRO stage (ZeRO-2 and ZeRO-3 runs stay comparable)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return BertForPreTraining._from_config(config)
    with no_init_weights():
        model = BertForPreTraining(config)
    model.init_weights()  # HF's init, then the decoder is tied to the word embeddings
    return model


def planned_config(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> BertConfig:
    """The ``BertConfig`` :func:`build_pretrainer` will use, known before any weight exists (the
    ZeRO-3 build context is sized from it)."""
    if model_cfg.init_from:
        return BertConfig.from_pretrained(model_cfg.init_from)
    return bert_config(model_cfg, vocab_size, pad_token_id)


def build_pretrainer(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int, nsp: bool) -> BertPretrainer:
    """A fresh model from the config, or ``model.init_from`` (an HF model directory) when set."""
    kwargs = {"nsp": nsp, "sparse_mlm_head": model_cfg.sparse_mlm_head, "unpad": model_cfg.unpad}
    if not model_cfg.init_from:
        return BertPretrainer.from_config(bert_config(model_cfg, vocab_size, pad_token_id), **kwargs)
    hf = BertForPreTraining.from_pretrained(
        model_cfg.init_from,
        attn_implementation=model_cfg.attn_implementation or "sdpa",
        hidden_dropout_prob=model_cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=model_cfg.attention_probs_dropout_prob,
    )
    if hf.config.vocab_size != vocab_size:
        raise ConfigError(
            f"model.init_from: {model_cfg.init_from} has vocab_size {hf.config.vocab_size}, "
            f"the corpus tokenizer has {vocab_size}"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        want = getattr(model_cfg, key)
        if want is not None and want != getattr(hf.config, key):
            raise ConfigError(f"model.{key}={want} contradicts model.init_from ({key}={getattr(hf.config, key)})")
    return BertPretrainer(hf, **kwargs)


# --------------------------------------------------------------------------- accounting


def flops_per_token(config: BertConfig, seq_len: float, masked_fraction: float, nsp: bool) -> float:
    """Training (forward + backward) matmul FLOPs per token, for MFU.

    With H = hidden, L = layers, I = intermediate, V = vocab, S = ``seq_len``, m = ``masked_fraction``::

        6 · L · (4H² + 2HI)          # Q, K, V, output projections and the FFN (6 = 2 fwd + 4 bwd per weight)
      + 12 · L · H · S               # attention scores QKᵀ and context PV (2·2·S·H fwd, ×3 for training)
      + 6 · m · (H² + H·V)           # MLM transform + tied decoder, on the predicted tokens only
      + 6 · (H² + 2H) / S  if nsp    # pooler + NSP classifier, once per sample

    Embedding lookups, biases, LayerNorm, softmax and GELU are not matmuls and are left out (the
    usual MFU convention). Count real tokens only; with variable lengths pass the token-weighted
    mean length ``S = Σl² / Σl`` (see :func:`effective_seq_len`), so attention is counted per sample.
    """
    h, layers, ffn, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    flops = 6.0 * layers * (4 * h * h + 2 * h * ffn) + 12.0 * layers * h * seq_len
    flops += 6.0 * masked_fraction * (h * h + h * vocab)
    if nsp:
        flops += 6.0 * (h * h + 2 * h) / max(seq_len, 1.0)
    return flops


def effective_seq_len(lengths: torch.Tensor) -> float:
    """Σl² / Σl of the samples' real lengths: the per-token attention span for :func:`flops_per_token`."""
    lengths = lengths.double()
    total = float(lengths.sum())
    return float((lengths * lengths).sum()) / total if total else 0.0


def model_inputs(batch: dict) -> dict:
    """The part of a stream batch that :meth:`BertPretrainer.forward` takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def micro_batch_work(batch: dict, config: BertConfig, nsp: bool) -> tuple[int, int, float]:
    """(real tokens, real samples, training FLOPs) of one stream micro-batch, for throughput and MFU.

    Padding samples (``sample_ids`` < 0, which keep ranks in step) and pad positions count as no work."""
    lengths = batch["attention_mask"].sum(dim=1)
    tokens = int(lengths.sum())
    masked = int((batch["labels"] != IGNORE_INDEX).sum())
    samples = int((batch["sample_ids"] >= 0).sum())
    flops = tokens * flops_per_token(config, effective_seq_len(lengths), masked / max(tokens, 1), nsp)
    return tokens, samples, flops
