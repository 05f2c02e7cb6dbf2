"""LoRA on every encoder ``ptft finetune`` takes (docs/finetuning.md, "Full or LoRA"): the default
targets adapt the same parts of BERT, RoBERTa, XLM-R, DistilBERT and ModernBERT under each one's
layer names, the layers between encoder and head train in full, and a real ``ptft finetune``
through the CLI trains and merges the adapters of a non-BERT encoder.

Tiny random-weight models of each architecture (tests/arch_factory.py), no hub.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ptft_dist.config import FinetuneConfig
from ptft_dist.finetune.model import ENCODER_TYPES, FinetuneError, build_model
from tests.arch_factory import tiny_model_dir

# per layer: the Linear layers of attention and feed-forward; plus the word embeddings (one)
ADAPTED_PER_LAYER = {"bert": 6, "roberta": 6, "xlm-roberta": 6, "distilbert": 6, "modernbert": 4}
# what LoRA trains whole beside the adapters, per architecture and task
WHOLE = {
    ("bert", "classification"): {"classifier", "pooler"},
    ("distilbert", "classification"): {"classifier", "pre_classifier"},
    ("modernbert", "classification"): {"classifier", "head"},
    ("modernbert", "token_classification"): {"classifier", "head"},
    ("roberta", "extractive_qa"): {"qa_outputs"},
    ("xlm-roberta", "token_classification"): {"classifier"},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-arch")
    return {t: tiny_model_dir(t, root / t) for t in ENCODER_TYPES}


def _batch(model: torch.nn.Module, task_type: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task_type == "classification":
        out["labels"] = torch.tensor([0, 1])
    elif task_type == "token_classification":
        out["labels"] = torch.randint(0, 3, (2, 12), generator=g)
    else:
        out["start_positions"], out["end_positions"] = torch.tensor([2, 3]), torch.tensor([4, 5])
    return out


@pytest.mark.parametrize("model_type,task_type", sorted(WHOLE))
def test_default_targets_adapt_every_layer_and_train_the_head_whole(model_type, task_type, model_dirs):
    labels = ["O", "B-X", "I-X"] if task_type == "token_classification" else ["neg", "pos"]
    model = build_model(model_dirs[model_type], labels, FinetuneConfig(method="lora", task_type=task_type), seed=0)
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import Linear as LoraLinear

    lora_linear = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    lora_embedding = [n for n, m in model.named_modules() if isinstance(m, LoraEmbedding)]
    assert len(lora_linear) == 2 * ADAPTED_PER_LAYER[model_type], lora_linear  # 2 layers
    assert len(lora_embedding) == 1, lora_embedding
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    whole = {n for n in trainable if "lora_" not in n}
    # every trainable non-adapter weight is a copy of a module trained whole, and each of them trains
    saved = {part for n in whole for part in n.split(".") if part in WHOLE[(model_type, task_type)]}
    assert saved == WHOLE[(model_type, task_type)], whole
    assert all("modules_to_save" in n for n in whole), whole
    # the encoder's own weights stay frozen: LayerNorms, biases outside the head
    frozen_norms = [n for n, p in model.named_parameters() if "norm" in n.lower() and "modules_to_save" not in n]
    assert frozen_norms and not any(n in trainable for n in frozen_norms)

    # one backward: every adapter of the first layer gets a gradient (B starts at zero, A does not)
    model.train()
    model(**_batch(model, task_type)).loss.backward()
    first = [n for n, p in model.named_parameters() if "lora_B" in n and (".0." in n)]
    assert first and all(dict(model.named_parameters())[n].grad.abs().sum() > 0 for n in first), first


def test_unknown_names_are_refused_with_the_model_s_own(model_dirs):
    cfg = FinetuneConfig(method="lora", lora_target_modules=["query", "value"])
    with pytest.raises(FinetuneError, match=r"matches no Linear or Embedding layer.*q_lin"):
        build_model(model_dirs["distilbert"], ["neg", "pos"], cfg, seed=0)


@pytest.mark.parametrize("model_type", ["distilbert", "modernbert"])
def test_lora_finetune_through_the_cli_trains_and_merges_the_adapters(model_type, model_dirs, tmp_path):
    from safetensors.torch import load_file

    from tests.finetune.test_finetune import run_finetune

    rng = random.Random(0)
    words = ["river", "stone", "cloud", "paper", "glass", "field", "music", "night"]
    for split, n in (("train", 64), ("validation", 16), ("test", 16)):
        rows = ["text\tlabel"]
        for i in range(n):
            text = [rng.choice(words) for _ in range(5)] + ["bright" if i % 2 else "dark"]
            rows.append(f"{' '.join(text)}\t{'pos' if i % 2 else 'neg'}")
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "ft.yaml"
    out = tmp_path / "out"
    config.write_text(
        f"finetune:\n  model: {model_dirs[model_type]}\n  method: lora\n  epochs: 1\n  batch_size: 16\n"
        f"  max_seq_len: 16\n  lora_lr: 5.0e-3\n  output_dir: {out}\n"
        + "".join(f"  {s}_file: {tmp_path / f'{s}.tsv'}\n" for s in ("train", "validation", "test")))
    results = run_finetune(config)
    assert results["method"] == "lora" and results["export"] == "merged"

    base = load_file(str(model_dirs[model_type] / "model.safetensors"))
    merged = load_file(str(out / "best" / "model.safetensors"))
    pick = {"distilbert": ("transformer.layer.0.attention.q_lin.weight", "transformer.layer.0.ffn.lin1.weight",
                           "embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight"),
            "modernbert": ("layers.0.attn.Wqkv.weight", "layers.0.mlp.Wi.weight",
                           "embeddings.tok_embeddings.weight", "embeddings.norm.weight")}[model_type]
    prefix = {"distilbert": "distilbert.", "modernbert": "model."}[model_type]

    def key_in(sd: dict, name: str) -> str:
        return next(k for k in sd if k.endswith(name) and ("head" not in k))

    changed = {name: not torch.equal(base[key_in(base, name)], merged[prefix + name]) for name in pick}
    # the adapters trained and were merged into the base weights; the frozen norm came through as it was
    assert changed == {pick[0]: True, pick[1]: True, pick[2]: True, pick[3]: False}, changed
