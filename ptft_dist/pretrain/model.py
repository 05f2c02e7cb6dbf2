"""The pretraining model: a stock HF encoder (``BertForPreTraining``, or the ``AutoModelForMaskedLM``
class of RoBERTa / XLM-R, DistilBERT, ModernBERT: pretrain/architectures.py) with a loss that
skips wasted work.

Why a wrapper and not a subclass: exports must be plain Hugging Face (docs/design.md, guarantee 8). The
wrapper registers the HF model's own children (``bert`` and ``cls``; ``roberta`` and ``lm_head``; ...)
as its children, so its ``state_dict()`` keys are exactly the HF model's, DeepSpeed / ZeRO
checkpoints hold those names, and ``pretrainer.hf_model.save_pretrained(dir)`` writes a model that
``AutoModelForMaskedLM`` (BERT: also ``AutoModelForPreTraining``) loads with no custom code. Only
``forward`` differs:

* **Sparse MLM head.** The prediction head (transform + tied decoder to the vocabulary) runs only
  on the rows whose label is not -100 (~15 % of the tokens) instead of every position. The loss,
  the gradients and the logits of the predicted rows are those of the dense head. A model type
  without a known head runs the dense one (said once in the log).
* **Unpadding** (``unpad=True``), honestly scoped: see :class:`BertPretrainer`.
* Metrics come back as tensors (``mlm_correct``, ``mlm_count``, ...) so accuracy needs no extra
  device sync; the loop adds them up and syncs once per log interval.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from transformers import BertConfig, BertForPreTraining, PretrainedConfig

from ptft_dist.config import ConfigError, ModelConfig
from ptft_dist.pretrain import architectures as A
from ptft_dist.pretrain.architectures import new_model  # noqa: F401 - re-exported
from ptft_dist.pretrain.pretrainer import (  # noqa: F401 - re-exported: the model's public names
    CPU_MIN_PAD_SHARE,
    VARLEN_ATTENTION_IMPLEMENTATIONS,
    BertPretrainer,
    MaskedLMPretrainer,
    PretrainOutput,
    _ce_stats,
    attn_supports_packing,
    packing_implementation,
)
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

# --------------------------------------------------------------------------- config


def _positive_int(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def bert_config(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> BertConfig:
    """The ``BertConfig`` of a preset with the config's overrides (intermediate = 4 × hidden unless set)."""
    return scratch_config(model_cfg, vocab_size, {"pad": pad_token_id}, arch="bert")


def scratch_config(model_cfg: ModelConfig, vocab_size: int, specials: dict[str, int],
                   arch: Optional[str] = None) -> PretrainedConfig:
    """The config of a fresh ``model.arch`` encoder (default BERT): a preset with the config's
    overrides (intermediate = 4 × hidden unless set) and the tokenizer's special ids."""
    arch = arch or model_cfg.arch or "bert"
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
    pad_token_id = specials["pad"]
    if not 0 <= pad_token_id < vocab_size:
        raise ConfigError(f"pad_token_id {pad_token_id} is outside the vocabulary (size {vocab_size})")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        p = getattr(model_cfg, key)
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {p!r}")
    impl = model_cfg.attn_implementation or "sdpa"
    _check_attn_implementation(impl)
    ids = {"cls": pad_token_id, "sep": pad_token_id, **specials}
    return A.scratch_config(arch, shape, model_cfg, vocab_size, ids, impl)


def _check_attn_implementation(impl: str) -> None:
    from transformers import AttentionInterface

    known = {"eager", *AttentionInterface._global_mapping}
    if impl not in known and "/" not in impl:  # "org/kernel" names are hub kernels, checked by transformers
        raise ConfigError(f"model.attn_implementation: {impl!r} is not one of {sorted(known)} (or a hub kernel)")


# --------------------------------------------------------------------------- model


def new_bert_for_pretraining(config: BertConfig) -> BertForPreTraining:
    """A freshly initialised ``BertForPreTraining`` (:func:`new_model` of a ``BertConfig``)."""
    return A.new_model(config)


def _arch_name(model_cfg: ModelConfig) -> str:
    return model_cfg.arch or "bert"


def planned_config(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int,
                   special_ids: Optional[dict[str, int]] = None) -> PretrainedConfig:
    """The config :func:`build_pretrainer` will use, known before any weight exists (the ZeRO-3
    build context is sized from it): ``model.init_from``'s own, or a fresh ``model.arch`` one."""
    if model_cfg.init_from:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_cfg.init_from)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.init_from: {model_cfg.init_from}: not a Hugging Face model directory "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        found = A.MODEL_TYPES.get(config.model_type, config.model_type)
        if model_cfg.arch and found != model_cfg.arch:
            raise ConfigError(f"model.arch={model_cfg.arch} contradicts model.init_from ({model_cfg.init_from} "
                              f"holds a {config.model_type} model); leave model.arch unset with init_from")
        return config
    return scratch_config(model_cfg, vocab_size, {**(special_ids or {}), "pad": pad_token_id})


def check_model_fits(config: PretrainedConfig, nsp: bool, max_seq_len: int, specials: dict[str, int],
                     vocab_size: int) -> None:
    """Refuse, before anything is written, a model that cannot train on this corpus as configured:
    NSP without an NSP head, sequences longer than its position table, a vocabulary or padding id
    that is not the tokenizer's (docs/design.md, guarantee 7)."""
    arch = A.arch_of(config)
    if arch is not None:
        A.check_objective(arch.name, nsp)
    elif nsp:
        raise ConfigError(f"data.nsp=true: a {config.model_type} model has no next-sentence head; set data.nsp=false")
    longest = A.max_tokens(config)
    if longest is not None and max_seq_len > longest:
        raise ConfigError(f"data.max_seq_len={max_seq_len} exceeds the model's {longest} positions "
                          f"(max_position_embeddings={config.max_position_embeddings})")
    if vocab_size > config.vocab_size:
        raise ConfigError(f"the model has vocab_size {config.vocab_size}, the corpus tokenizer has {vocab_size} "
                          "tokens: tokenizer and model do not belong together")
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and "pad" in specials and pad != specials["pad"]:
        raise ConfigError(f"the model's pad_token_id is {pad}, the corpus tokenizer's pad token is "
                          f"{specials['pad']}: tokenizer and model do not belong together")


def build_pretrainer(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int, nsp: bool,
                     special_ids: Optional[dict[str, int]] = None, packed_rows: bool = False) -> MaskedLMPretrainer:
    """A fresh ``model.arch`` model from the config, or ``model.init_from`` (an HF model directory
    with a masked-LM head: BERT, RoBERTa / XLM-R, DistilBERT, ModernBERT, ...) when set."""
    kwargs = {"nsp": nsp, "sparse_mlm_head": model_cfg.sparse_mlm_head, "unpad": model_cfg.unpad,
              "packed_rows": packed_rows}
    config = planned_config(model_cfg, vocab_size, pad_token_id, special_ids)
    if not model_cfg.init_from:
        A.check_objective(_arch_name(model_cfg), nsp)
        return MaskedLMPretrainer.from_config(config, **kwargs)
    cls = A.model_class(config)
    hf = cls.from_pretrained(model_cfg.init_from, attn_implementation=model_cfg.attn_implementation or "sdpa",
                             **A.dropout_overrides(config, model_cfg))
    # ModernBERT checkpoints pad the embedding table past the tokenizer (50368 rows for 50283 tokens)
    padded_ok = config.model_type == "modernbert" and hf.config.vocab_size > vocab_size
    if hf.config.vocab_size != vocab_size and not padded_ok:
        raise ConfigError(
            f"model.init_from: {model_cfg.init_from} has vocab_size {hf.config.vocab_size}, "
            f"the corpus tokenizer has {vocab_size}"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        want, have = getattr(model_cfg, key), getattr(hf.config, key, None)
        if want is not None and have is not None and want != have:  # DistilBERT has no intermediate_size
            raise ConfigError(f"model.{key}={want} contradicts model.init_from ({key}={have})")
    return MaskedLMPretrainer(hf, **kwargs)


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
    I is the width that makes the FFN 2HI weights (architectures.ffn_width: DistilBERT's
    ``hidden_dim``, 1.5 × ModernBERT's gated ``intermediate_size``). ModernBERT's sliding-window
    layers attend to fewer than S tokens: for it the attention term is an upper bound.
    """
    h, layers, ffn, vocab = config.hidden_size, config.num_hidden_layers, A.ffn_width(config), config.vocab_size
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

    Padding samples (``sample_ids`` < 0, which keep ranks in step) and pad positions count as no work.
    Attention spans one sequence of ``cu_seqlens``: a row, or with packed rows one of its chunks
    (samples then count rows)."""
    lengths = batch["attention_mask"].sum(dim=1)
    spans = batch["cu_seqlens"].diff() if "cu_seqlens" in batch else lengths
    tokens = int(lengths.sum())
    masked = int((batch["labels"] != IGNORE_INDEX).sum())
    samples = int((batch["sample_ids"] >= 0).sum())
    flops = tokens * flops_per_token(config, effective_seq_len(spans), masked / max(tokens, 1), nsp)
    return tokens, samples, flops
