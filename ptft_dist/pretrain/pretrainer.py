"""The pretraining module: MLM (+ NSP for BERT) loss around a stock HF encoder (pretrain/model.py
builds it; pretrain/architectures.py says where each architecture keeps its encoder and head)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ptft_dist.config import ConfigError
from ptft_dist.dist.collectives import all_sum
from ptft_dist.pretrain import architectures as A
from ptft_dist.pretrain import attention
from ptft_dist.stream.masking import IGNORE_INDEX

log = logging.getLogger(__name__)

# Attention functions (names registered with transformers' AttentionInterface) that honour the
# ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs of a packed (1, total_tokens) batch. The flash
# family is recognised by transformers' own check; ptft's own (torch kernels) is pretrain/attention.py.
VARLEN_ATTENTION_IMPLEMENTATIONS: set[str] = {attention.NAME}
# CPU packing runs one SDPA call per sample: below this pad share the work it saves is smaller than
# that loop's cost, so such micro-batches run padded (same result; docs/performance.md). The
# environment variable exists for benchmarks and the GPU benchmark's CPU smoke mode (0 = always pack).
CPU_MIN_PAD_SHARE = float(os.environ.get("PTFT_CPU_MIN_PAD_SHARE", "0.10"))
# architectures whose packed path is proven equal to the padded one with ptft_varlen (tests/pretrain)
PTFT_VARLEN_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert")


def packing_implementation(impl: str | None, unpad: bool, model_type: str = "bert") -> str | None:
    """The attention a model with ``model.attn_implementation=impl`` runs: with ``unpad``, ``sdpa`` (the
    default) becomes ``ptft_varlen``, which is sdpa on padded batches and packs on every device."""
    return attention.NAME if unpad and impl in (None, "sdpa") and model_type in PTFT_VARLEN_TYPES else impl


def attn_supports_packing(impl: str | None) -> bool:
    """Whether the attention implementation runs packed variable-length sequences (cu_seqlens)."""
    if not impl:
        return False
    from transformers.utils.generic import is_flash_attention_requested

    return impl in VARLEN_ATTENTION_IMPLEMENTATIONS or is_flash_attention_requested(
        requested_attention_implementation=impl
    )


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


class MaskedLMPretrainer(nn.Module):
    """MLM (+ NSP) pretraining loss around a stock ``BertForPreTraining`` or ``*ForMaskedLM``.

    Loss: ``mlm_loss`` is the mean cross-entropy over this micro-batch's predicted tokens (labels
    != -100) and ``nsp_loss`` (BERT only) the mean over samples with ``next_sentence_label`` != -100,
    exactly like the HF models; an empty micro-batch gives 0 instead of NaN. Padding samples (all
    labels -100) therefore contribute nothing. Logits are upcast to fp32 before the loss.

    ``unpad`` -- what is and is not skipped:

    * If the attention implementation has a variable-length kernel (``sdpa``, which becomes
      ``ptft_varlen`` -- torch's varlen_attn on CUDA, per-sample SDPA on CPU, see
      pretrain/attention.py --, ``flash_attention_2/3/4``, a hub flash kernel, or a name in
      ``VARLEN_ATTENTION_IMPLEMENTATIONS``), the micro-batch is
      **packed**: the real tokens of all samples are concatenated into one (1, T) sequence with
      per-sample position ids (RoBERTa's from ``pad + 1``) and ``cu_seqlens``, and the whole
      encoder runs on real tokens only; attention stays within each sample. ``self.packed`` is
      then True. Requires right padding (each row's tokens are a prefix), which is what the data
      stream produces; pass its ``cu_seqlens``/``indices``/``max_seqlen`` to avoid recomputing
      them (recomputing costs two host syncs). Supported architectures only.
    * Otherwise (``eager``, ``flex_attention``; ``sdpa`` on ModernBERT) nothing is packed. The
      encoder processes every position of the micro-batch, pad positions included; what limits
      that waste is the data stream, which pads each micro-batch only to its longest sample. Pads
      are still masked out of attention, never reach the MLM head (sparse) and never enter a loss.
    """

    def __init__(self, hf_model: PreTrainedModel, *, nsp: bool = True, sparse_mlm_head: bool = True,
                 unpad: bool = True, packed_rows: bool = False) -> None:
        super().__init__()
        # The HF model's own children: state_dict keys are the HF model's, ties intact.
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_hf_model", hf_model)  # a reference, not a submodule (no "model." prefix)
        self.config = hf_model.config
        self.arch = A.arch_of(self.config)
        self.nsp = nsp
        if nsp and not (self.arch and self.arch.nsp and hasattr(hf_model, "cls")
                        and hasattr(hf_model.cls, "seq_relationship")):
            raise ConfigError(f"data.nsp=true: a {type(hf_model).__name__} has no next-sentence head "
                              "(NSP is BertForPreTraining's); set data.nsp=false for MLM-only pretraining")
        object.__setattr__(self, "_head", A.mlm_head(hf_model) if self.arch else None)  # not a second registration
        self.sparse_mlm_head = sparse_mlm_head and self._head is not None
        if sparse_mlm_head and self._head is None:
            log.info("model: no sparse MLM head for model type %r; the dense head runs on every position",
                     self.config.model_type)
        impl = packing_implementation(self.config._attn_implementation, bool(unpad), self.config.model_type)
        if self.arch is not None and impl != self.config._attn_implementation:
            hf_model.set_attn_implementation(impl)  # sdpa -> ptft_varlen: same math, packed batches too
        self.packed = bool(unpad) and self.arch is not None and attn_supports_packing(self.config._attn_implementation)
        if not nsp and self.arch is not None and self.arch.nsp:
            # MLM only: pooler and NSP head stay in the module (the export keeps its shape) but are
            # frozen; they would get no gradient anyway, and unused trainable parameters make DDP
            # (Accelerate) fail without find_unused_parameters.
            heads = (getattr(self.bert, "pooler", None), getattr(getattr(self, "cls", None), "seq_relationship", None))
            for head in heads:
                if head is not None:
                    head.requires_grad_(False)
        # data.pack_samples: a row holds several samples, so the packed path is the only correct one
        self.packed_rows = bool(packed_rows)
        if self.packed_rows and not self.packed:
            raise ConfigError(
                f"data.pack_samples=true: the {self.config.model_type} model with attention "
                f"{self.config._attn_implementation!r} has no variable-length (cu_seqlens) path, so a row's samples "
                f"would attend to each other; use model.unpad=true with attn_implementation sdpa on "
                f"{', '.join(PTFT_VARLEN_TYPES)} (or a flash attention), or set data.pack_samples=false")
        if unpad and not self.packed:
            log.info("model.unpad: attention %r has no variable-length kernel; micro-batches run padded "
                     "(to their longest sample)", self.config._attn_implementation)
        # from_pretrained returns the model in eval mode: without this, an init_from run trained without
        # dropout until its first checkpoint or evaluation switched it back (and a resumed run differed)
        self.train()

    @property
    def hf_model(self) -> PreTrainedModel:
        """The plain HF model sharing these weights: ``save_pretrained`` it to export."""
        return self._hf_model

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> MaskedLMPretrainer:
        return cls(A.new_model(config), **kwargs)

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
            raise ConfigError("the pretrainer needs MLM labels (-100 where nothing is predicted)")
        if self.nsp and next_sentence_label is None:
            raise ConfigError("NSP is on (data.nsp=true) but the batch has no next_sentence_label")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.arch is None:
            hidden, flat_labels, pooled = None, labels.reshape(-1), None
        elif self.packed and (self.packed_rows or _worth_packing(input_ids, attention_mask, indices)):
            hidden, flat_labels, pooled = self._encode_packed(
                input_ids, token_type_ids, attention_mask, labels, position_ids, cu_seqlens, indices, max_seqlen
            )
        else:
            out = self._encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                  **self._extra_inputs(token_type_ids, position_ids))
            hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            flat_labels = labels.reshape(-1)
            pooled = getattr(out, "pooler_output", None)

        if hidden is None:
            mlm_loss, mlm_correct, mlm_count = self._dense_mlm(input_ids, attention_mask, flat_labels)
        else:
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

    def _encoder(self) -> nn.Module:
        return getattr(self, self.arch.encoder)

    def _extra_inputs(self, token_type_ids: torch.Tensor, position_ids: torch.Tensor | None) -> dict:
        """Token types only for an encoder that uses them (RoBERTa checkpoints have one type;
        DistilBERT and ModernBERT ignore them silently); positions only when given."""
        extra = {"token_type_ids": token_type_ids} if self.arch.token_types else {}
        if position_ids is not None:
            extra["position_ids"] = position_ids
        return extra

    def _mlm(self, hidden: torch.Tensor, flat_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """MLM loss/accuracy from (N, H) hidden states and (N,) labels."""
        if self.sparse_mlm_head:
            # One host sync (nonzero): the price of running the head on predicted rows only.
            rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
            hidden, flat_labels = hidden.index_select(0, rows), flat_labels.index_select(0, rows)
        logits = self._head(hidden).float()
        return _ce_stats(logits, flat_labels)

    def _dense_mlm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   flat_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """An architecture without a known head: the HF model's own forward, every position."""
        logits = self._hf_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits
        return _ce_stats(logits.reshape(-1, logits.shape[-1]).float(), flat_labels)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the encoder on the real tokens only, as one packed (1, T) sequence."""
        device = input_ids.device
        if indices is None or cu_seqlens is None or max_seqlen is None:
            if self.packed_rows:  # per-row lengths would let a row's samples attend to each other
                raise ConfigError("data.pack_samples: the batch must carry the stream's cu_seqlens/indices/max_seqlen")
            lengths = attention_mask.sum(1, dtype=torch.int32)
            indices = attention_mask.reshape(-1).nonzero().squeeze(1)
            cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_seqlen = lengths.max()
        indices = indices.to(device=device, dtype=torch.long, non_blocking=True)
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        max_seqlen = int(max_seqlen)
        if position_ids is None:  # each sequence counts from its own first token (a packed row: each chunk)
            positions = attention.token_places(cu_seqlens, indices.numel())[1] + A.first_position(self.config)
        else:
            positions = position_ids.expand_as(input_ids).reshape(-1).index_select(0, indices)
        types = token_type_ids.reshape(-1).index_select(0, indices)[None]
        extra = {"token_type_ids": types} if self.arch.token_types else {}
        if self.packed_rows:  # the rows the chunks sit in: CUDA's pad-around kernel scatters to them
            extra["ptft_rows_cu"] = F.pad(attention_mask.sum(1).cumsum(0, dtype=torch.int32), (1, 0)).to(device)
            extra["ptft_rows_max"] = input_ids.shape[1]
        out = self._encoder()(
            input_ids=input_ids.reshape(-1).index_select(0, indices)[None],
            position_ids=positions[None],
            attention_mask=None,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            return_dict=True,
            **extra,
        )
        hidden = out.last_hidden_state[0]  # (T, H)
        first = cu_seqlens[:-1].long()  # each sample's [CLS] row
        pooled = self.bert.pooler(hidden.index_select(0, first)[:, None]) if self.nsp else None
        return hidden, labels.reshape(-1).index_select(0, indices), pooled


BertPretrainer = MaskedLMPretrainer  # the name it had when BERT was the only architecture


def _worth_packing(input_ids: torch.Tensor, attention_mask: torch.Tensor, indices: torch.Tensor | None) -> bool:
    """Always on GPUs; on CPU only when pads are at least ``CPU_MIN_PAD_SHARE`` of the micro-batch,
    summed over the ranks: every rank must take the same path, or ZeRO's gradient buckets (filled in
    the order the backward reaches each parameter) no longer line up across ranks (ZeRO-3 aborted
    with a gloo size mismatch when each rank decided alone)."""
    if input_ids.device.type != "cpu":
        return True
    real = indices.numel() if indices is not None else int(attention_mask.sum())
    real, total = all_sum([real, input_ids.numel()])  # no-op on one process
    return 1.0 - real / max(total, 1) >= CPU_MIN_PAD_SHARE


def _ce_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean CE over non-ignored targets, 0 if none; #correct; #counted) without host syncs."""
    valid = target != IGNORE_INDEX
    count = valid.sum()
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = total / count.clamp(min=1)
    correct = ((logits.detach().argmax(-1) == target) & valid).sum()
    return loss, correct, count
