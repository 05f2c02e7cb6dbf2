"""Packed fine-tuning (ptft_dist/finetune/packing.py): same logits, loss and gradients as the padded
classifier (dropout off), full and LoRA, classification and regression; parameters untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from ptft_dist.config import FinetuneConfig
from ptft_dist.finetune.model import wrap_lora
from ptft_dist.finetune.packing import PackedBertForSequenceClassification, enable_packing

LENGTHS = [9, 4, 17, 2, 11, 6]


def classifier(num_labels: int = 3, impl: str = "sdpa") -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
                     attn_implementation=impl)
    return BertForSequenceClassification(cfg)


def batch(labels: torch.Tensor, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    width = max(LENGTHS) + 3
    mask = (torch.arange(width)[None] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, 97, (len(LENGTHS), width), generator=g) * mask
    types = ((torch.arange(width)[None] > torch.tensor(LENGTHS)[:, None] // 2) & mask.bool()).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def grads(m: torch.nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def check_same(padded: torch.nn.Module, packed: torch.nn.Module, b: dict) -> None:
    ref, out = padded(**b), packed(**b)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    a, c = grads(packed), grads(padded)
    assert a.keys() == c.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], c[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_packed_classifier_equals_padded(task):
    num_labels = 1 if task == "regression" else 3
    padded = classifier(num_labels)
    packed = copy.deepcopy(padded)
    keys = list(packed.state_dict())
    assert enable_packing(packed)
    assert type(packed) is PackedBertForSequenceClassification and list(packed.state_dict()) == keys
    assert packed.config._attn_implementation == "ptft_varlen"
    labels = torch.randn(len(LENGTHS)) if task == "regression" else torch.tensor([0, 2, 1, 1, 0, 2])
    check_same(padded.train(), packed.train(), batch(labels))

    # Pad ids never matter, and a changed example changes only its own logits (no leak).
    b = batch(labels, seed=1)
    with torch.no_grad():
        base = packed(**b).logits
        b["input_ids"][2, : LENGTHS[2]] = torch.randint(5, 97, (LENGTHS[2],), generator=torch.Generator().manual_seed(4))
        b["input_ids"][0, LENGTHS[0]:] = 7
        again = packed(**b).logits
    assert torch.equal(again[[0, 1, 3, 4, 5]], base[[0, 1, 3, 4, 5]]) and not torch.equal(again[2], base[2])


def test_packed_lora_equals_padded():
    cfg = FinetuneConfig(method="lora", lora_dropout=0.0)
    padded = wrap_lora(classifier(), cfg)
    packed = copy.deepcopy(padded)
    assert enable_packing(packed)
    assert type(packed.get_base_model()) is PackedBertForSequenceClassification
    check_same(padded.train(), packed.train(), batch(torch.tensor([1, 0, 2, 2, 1, 0])))


def test_other_attention_is_left_padded():
    eager = classifier(impl="eager")
    assert not enable_packing(eager) and type(eager) is BertForSequenceClassification
