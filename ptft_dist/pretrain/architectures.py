"""The encoder architectures ``ptft pretrain`` trains, and what differs between them.

Continued pretraining (domain adaptation) starts from the encoders people already use: BERT (with
or without its NSP head), RoBERTa / XLM-R, DistilBERT and ModernBERT. They share one training path
(pretrain/model.py); this module holds the few facts that differ, each checked against
transformers' own modelling code (research note 14):

* where the encoder and the MLM prediction head live (the sparse head runs only the masked rows
  through the head, so it must call the head's modules itself);
* which inputs the encoder takes: only BERT has token types worth sending (RoBERTa checkpoints have
  ``type_vocab_size=1``; DistilBERT and ModernBERT ignore them), only BERT has NSP;
* positions: RoBERTa numbers real tokens from ``pad_token_id + 1`` (a 512-token model has 514
  position rows), the others from 0;
* the names of the dropout settings and of the FFN width in each config class.

Any other ``AutoModelForMaskedLM`` model still trains: with the dense head (every position through
the vocabulary projection), said once in the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ptft_dist.config import ConfigError, ModelConfig

ARCHS = ("bert", "roberta", "distilbert", "modernbert")
# config.model_type → the architecture whose facts apply (XLM-R is RoBERTa's code with another name)
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert",
               "modernbert": "modernbert"}


@dataclass(frozen=True)
class Arch:
    """What differs between the supported encoders."""

    name: str
    encoder: str  # attribute of the HF model (and of the pretrainer) holding the encoder
    token_types: bool  # the encoder takes token_type_ids
    nsp: bool  # a next-sentence head exists (BertForPreTraining)
    dropout: tuple[tuple[str, ...], tuple[str, ...]]  # config keys for (hidden, attention) dropout


_ARCHS = {
    "bert": Arch("bert", "bert", True, True,
                 (("hidden_dropout_prob",), ("attention_probs_dropout_prob",))),
    "roberta": Arch("roberta", "roberta", False, False,
                    (("hidden_dropout_prob",), ("attention_probs_dropout_prob",))),
    "distilbert": Arch("distilbert", "distilbert", False, False, (("dropout",), ("attention_dropout",))),
    "modernbert": Arch("modernbert", "model", False, False,
                       (("embedding_dropout", "mlp_dropout"), ("attention_dropout",))),
}


def arch_of(config: Any) -> Optional[Arch]:
    """The architecture of an HF config, or None for a model type without a sparse head here."""
    name = MODEL_TYPES.get(getattr(config, "model_type", ""))
    return _ARCHS[name] if name else None


def mlm_head(hf_model: torch.nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The MLM prediction head of a supported model as a function of (N, H) hidden states → (N, V)
    logits, calling the model's own modules in the order its ``forward`` does; None if unknown."""
    arch = arch_of(hf_model.config)
    m: Any = hf_model
    if arch is None:
        return None
    if arch.name == "bert":  # BertForPreTraining and BertForMaskedLM
        return m.cls.predictions
    if arch.name == "roberta":  # dense → gelu → layer_norm → decoder (tied)
        return m.lm_head
    if arch.name == "distilbert":
        return lambda h: m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h))))
    return lambda h: m.decoder(m.head(h))  # modernbert


def encoder_of(hf_model: torch.nn.Module) -> torch.nn.Module:
    arch = arch_of(hf_model.config)
    return getattr(hf_model, arch.encoder) if arch else hf_model.base_model


def first_position(config: Any) -> int:
    """The position id of a sequence's first token: RoBERTa counts from ``pad_token_id + 1``."""
    arch = arch_of(config)
    return int(config.pad_token_id) + 1 if arch is not None and arch.name == "roberta" else 0


def max_tokens(config: Any) -> Optional[int]:
    """The longest sequence the model's position table holds (None: no table, e.g. ModernBERT's RoPE)."""
    arch = arch_of(config)
    if arch is not None and arch.name == "modernbert":
        return None
    table = getattr(config, "max_position_embeddings", None)
    return None if table is None else int(table) - first_position(config)


def ffn_width(config: Any) -> float:
    """The FFN width I such that one layer's FFN holds 2·H·I matmul weights (DistilBERT calls it
    ``hidden_dim``; ModernBERT's gated FFN has 3·H·I, i.e. an effective 1.5·I)."""
    arch = arch_of(config)
    if arch is not None and arch.name == "distilbert":
        return float(config.hidden_dim)
    if arch is not None and arch.name == "modernbert":
        return 1.5 * float(config.intermediate_size)
    return float(config.intermediate_size)


def dropout_overrides(config: Any, model_cfg: ModelConfig) -> dict[str, float]:
    """``model.hidden_dropout_prob`` / ``attention_probs_dropout_prob`` under the config's own names."""
    arch = arch_of(config)
    if arch is None:
        return {}
    hidden_keys, attention_keys = arch.dropout
    out = {k: model_cfg.hidden_dropout_prob for k in hidden_keys}
    out.update({k: model_cfg.attention_probs_dropout_prob for k in attention_keys})
    return out


def check_objective(arch_name: str, nsp: bool) -> None:
    """NSP exists only for BERT: refuse ``data.nsp=true`` for the others before anything is written
    (docs/design.md, guarantee 7)."""
    if nsp and not _ARCHS[arch_name].nsp:
        raise ConfigError(f"data.nsp=true: {arch_name} has no next-sentence head (NSP is BERT's); "
                          f"set data.nsp=false for MLM-only pretraining")


def scratch_config(arch_name: str, shape: dict[str, int], model_cfg: ModelConfig, vocab_size: int,
                   specials: dict[str, int], impl: str) -> Any:
    """A fresh config of ``arch_name`` with ``shape`` (hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size) and the tokenizer's special ids."""
    from transformers import BertConfig, DistilBertConfig, ModernBertConfig, RobertaConfig

    pad = specials["pad"]
    common = dict(vocab_size=vocab_size, pad_token_id=pad, attn_implementation=impl)
    positions = model_cfg.max_position_embeddings
    hidden_p, attn_p = model_cfg.hidden_dropout_prob, model_cfg.attention_probs_dropout_prob
    if arch_name == "bert":
        return BertConfig(type_vocab_size=2, max_position_embeddings=positions, hidden_dropout_prob=hidden_p,
                          attention_probs_dropout_prob=attn_p, **common, **shape)
    if arch_name == "roberta":  # as released checkpoints: one token type, positions from pad + 1
        return RobertaConfig(type_vocab_size=1, max_position_embeddings=positions + pad + 1,
                             bos_token_id=specials["cls"], eos_token_id=specials["sep"], hidden_dropout_prob=hidden_p,
                             attention_probs_dropout_prob=attn_p, **common, **shape)
    if arch_name == "distilbert":
        return DistilBertConfig(dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                                n_heads=shape["num_attention_heads"], hidden_dim=shape["intermediate_size"],
                                max_position_embeddings=positions, dropout=hidden_p, attention_dropout=attn_p,
                                **common)
    # ModernBERT's default special ids lie outside a small vocabulary (and crash it): the tokenizer's
    return ModernBertConfig(max_position_embeddings=positions, bos_token_id=specials["cls"],
                            eos_token_id=specials["sep"], cls_token_id=specials["cls"], sep_token_id=specials["sep"],
                            embedding_dropout=hidden_p, mlp_dropout=hidden_p, attention_dropout=attn_p,
                            **common, **shape)


def model_class(config: Any) -> type:
    """The HF class a run trains and exports: ``BertForPreTraining`` for BERT (NSP head kept, so
    NSP runs and BERT exports are as before), the ``AutoModelForMaskedLM`` class otherwise."""
    from transformers import AutoModelForMaskedLM, BertForPreTraining

    if getattr(config, "model_type", "") == "bert":
        return BertForPreTraining
    try:
        return AutoModelForMaskedLM._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(f"model type {config.model_type!r} has no masked-LM head in transformers "
                          "(AutoModelForMaskedLM does not load it): not an encoder ptft can pretrain") from None


def new_model(config: Any) -> Any:
    """A freshly initialised model of ``config``'s architecture (pretrain/architectures.py,
    ``model_class``); under ZeRO-3 one that no rank ever holds whole.

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

    cls = model_class(config)
    if is_deepspeed_zero3_enabled():
        return cls._from_config(config)
    with no_init_weights():
        model = cls(config)
    model.init_weights()  # HF's init, then the decoder is tied to the word embeddings
    return model
