"""Packed fine-tuning: a classifier batch runs as one (1, T) row of real tokens, pads skipped.

Why: short sentences are where padding costs most (a batch is padded to its longest example, so a
mean of 30 tokens in a batch whose longest is 90 computes 3x the work). With ``finetune.unpad``
the training module's ``BertForSequenceClassification`` gets this subclass's ``forward`` and the
``ptft_varlen`` attention (ptft_dist/pretrain/attention.py: attention stays within each example):
embeddings, every linear layer and attention run on real tokens only; the pooler and classifier
run on each example's [CLS] row, exactly the rows HF's ``[:, 0]`` pooling takes. Logits and loss
are HF's (same problem types), within fp32 rounding.

Only the training module is switched (the class is swapped in place: same parameters, same
``state_dict`` keys, so checkpoints and LoRA wrapping are untouched); exports are built fresh from
the model directory as plain ``BertForSequenceClassification`` (docs/design.md, guarantee 8).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from ptft_dist.log import get_logger
from ptft_dist.pretrain import attention

log = get_logger("finetune")


class PackedBertForSequenceClassification(BertForSequenceClassification):
    """``BertForSequenceClassification`` whose forward packs right-padded batches (see the module doc)."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs: Any):
        extra = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
        if (attention_mask is None or input_ids is None or inputs_embeds is not None or position_ids is not None
                or extra or self.config._attn_implementation != attention.NAME):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        pooled = self._packed_pooled(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(loss=None if labels is None else self._loss(logits, labels), logits=logits)

    def _packed_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """The pooler output of each example's [CLS] row, the encoder run on real tokens only."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        width = input_ids.shape[1]
        lengths = attention_mask.sum(1, dtype=torch.int32)
        indices = attention_mask.reshape(-1).nonzero().squeeze(1)  # right padding: row i's tokens lead
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())
        out = self.bert(input_ids=input_ids.reshape(-1).index_select(0, indices)[None],
                        token_type_ids=token_type_ids.reshape(-1).index_select(0, indices)[None],
                        position_ids=(indices % width)[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=longest, max_length_k=longest, return_dict=True)
        first = out.last_hidden_state[0].index_select(0, cu[:-1].long())  # (B, H): each [CLS]
        return self.bert.pooler(first[:, None])

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """HF's loss for the configured problem type (regression MSE, single-label CE, multi-label BCE)."""
        problem = self.config.problem_type
        if problem is None:
            problem = ("regression" if self.num_labels == 1 else "single_label_classification"
                       if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


def enable_packing(model: torch.nn.Module) -> bool:
    """Switch a (possibly LoRA-wrapped) ``BertForSequenceClassification`` on ``sdpa`` to packed
    batches, in place; False (and nothing changed) for any other model or attention."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    impl = inner.config._attn_implementation if hasattr(inner, "config") else None
    if type(inner) is not BertForSequenceClassification or impl not in (None, "sdpa", attention.NAME):
        log.info("finetune.unpad: %s with attention %r has no packed path; batches run padded",
                 type(inner).__name__, impl)
        return False
    inner.set_attn_implementation(attention.NAME)
    inner.__class__ = PackedBertForSequenceClassification
    return True
