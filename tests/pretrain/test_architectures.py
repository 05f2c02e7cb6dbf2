"""Every supported encoder (BERT, RoBERTa, XLM-R, DistilBERT, ModernBERT) trains through the one
pretrainer: the sparse MLM head equals the dense head and the HF model's own loss, in loss and in
every gradient; state-dict keys are the HF model's; packing keeps RoBERTa's positions; NSP is
refused where there is no NSP head; unknown masked-LM models fall back to the dense head."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForMaskedLM

from ptft_dist.config import ConfigError, ModelConfig
from ptft_dist.pretrain import architectures as A
from ptft_dist.pretrain import model as M
from ptft_dist.pretrain import pretrainer as P
from tests.arch_factory import TOKENIZER_OF, build_tokenizer, tiny_config, tiny_model_dir
from tests.pretrain.test_model import assert_grads_close, grads

TYPES = ["bert", "roberta", "xlm-roberta", "distilbert", "modernbert"]
_TOKENIZERS: dict = {}


def tokenizer(kind: str):
    if kind not in _TOKENIZERS:
        _TOKENIZERS[kind] = build_tokenizer(kind)
    return _TOKENIZERS[kind]


def hf_model(model_type: str, seed: int = 0, **overrides):
    config = tiny_config(model_type, *tokenizer(TOKENIZER_OF[model_type]))
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(config).eval()


def mlm_batch(config, seed: int = 0):
    """Right-padded batch with specials at the ends, ~25 % of the real tokens labelled, one padding sample."""
    g = torch.Generator().manual_seed(seed)
    B, S = 4, 20
    lengths = torch.tensor([20, 13, 2, 7])
    am = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.randint(5, config.vocab_size, (B, S), generator=g)
    ids = torch.where(am.bool(), ids, torch.full_like(ids, config.pad_token_id))
    chosen = (torch.rand(B, S, generator=g) < 0.25) & am.bool()
    labels = torch.where(chosen, torch.randint(5, config.vocab_size, (B, S), generator=g), -100)
    labels[2] = -100
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


@pytest.mark.parametrize("model_type", TYPES)
def test_sparse_head_equals_dense_head_and_the_hf_loss(model_type):
    hf = hf_model(model_type)
    b = mlm_batch(hf.config)
    ref = copy.deepcopy(hf)
    hf_loss = ref(**b).loss
    hf_loss.backward()

    sparse = P.MaskedLMPretrainer(copy.deepcopy(hf), nsp=False).eval()
    dense = P.MaskedLMPretrainer(copy.deepcopy(hf), nsp=False, sparse_mlm_head=False).eval()
    assert sparse.sparse_mlm_head and sparse.arch.name == A.MODEL_TYPES[model_type]
    assert list(sparse.state_dict()) == list(hf.state_dict())  # checkpoints hold the HF names
    out_s, out_d = sparse(**b), dense(**b)
    out_s.loss.backward()
    out_d.loss.backward()
    torch.testing.assert_close(out_s.loss, out_d.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_s.loss, hf_loss, atol=1e-5, rtol=0)
    assert out_s.mlm_count == int((b["labels"] != -100).sum()) and out_s.mlm_correct == out_d.mlm_correct
    g_sparse, g_dense = grads(sparse), grads(dense)
    assert_grads_close(g_sparse, g_dense)
    assert_grads_close(g_sparse, grads(ref))
    # every weight learns (no unused parameter for DDP): the set of parameters with a gradient is all of them
    assert set(g_sparse) == {n for n, _ in sparse.named_parameters()}


def test_token_types_reach_bert_only():
    rob = P.MaskedLMPretrainer(hf_model("roberta"), nsp=False).eval()  # type_vocab_size=1: types 1 would crash
    b = mlm_batch(rob.config)
    out = rob(**b, token_type_ids=torch.ones_like(b["input_ids"]))
    torch.testing.assert_close(out.loss, rob(**b).loss)


@pytest.mark.parametrize("model_type", ["roberta", "distilbert", "modernbert"])
def test_nsp_is_refused_without_an_nsp_head(model_type):
    with pytest.raises(ConfigError, match="data.nsp=false"):
        P.MaskedLMPretrainer(hf_model(model_type), nsp=True)
    config = hf_model(model_type).config
    with pytest.raises(ConfigError, match=r"data.nsp=true.*has no next-sentence head.*data.nsp=false"):
        M.check_model_fits(config, True, 32, {"pad": config.pad_token_id}, config.vocab_size)
    M.check_model_fits(config, False, 32, {"pad": config.pad_token_id}, config.vocab_size)


def test_model_fit_checks_name_the_setting():
    config = hf_model("roberta").config  # 64 tokens: 64 + pad + 1 position rows
    assert A.max_tokens(config) == 64 and config.max_position_embeddings == 66
    with pytest.raises(ConfigError, match=r"data.max_seq_len=65 exceeds the model's 64 positions"):
        M.check_model_fits(config, False, 65, {"pad": 1}, config.vocab_size)
    with pytest.raises(ConfigError, match="pad_token_id is 1.*pad token is 0"):
        M.check_model_fits(config, False, 64, {"pad": 0}, config.vocab_size)
    with pytest.raises(ConfigError, match="vocab_size"):
        M.check_model_fits(config, False, 64, {"pad": 1}, config.vocab_size + 1)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_packed_encoder_equals_padded(model_type, monkeypatch):
    """The real ptft_varlen kernel (CPU: per-sample SDPA) on each architecture: packing puts
    RoBERTa's positions at pad + 1 + column, like its padded forward; losses and gradients equal."""
    from ptft_dist.pretrain import attention

    monkeypatch.setattr(P, "CPU_MIN_PAD_SHARE", 0.0)  # pack every micro-batch, however full
    padded_hf = hf_model(model_type, seed=3)
    packed_hf = copy.deepcopy(padded_hf)
    padded = P.MaskedLMPretrainer(padded_hf, nsp=False, unpad=False).eval()
    packed = P.MaskedLMPretrainer(packed_hf, nsp=False).eval()
    assert packed.packed and not padded.packed
    assert packed.config._attn_implementation == attention.NAME
    b = mlm_batch(padded_hf.config, seed=4)
    ref, out = padded(**b), packed(**b)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert_grads_close(grads(packed), grads(padded))


def test_unknown_masked_lm_falls_back_to_the_dense_head(caplog):
    from transformers import AlbertConfig, AlbertForMaskedLM

    torch.manual_seed(0)
    hf = AlbertForMaskedLM(AlbertConfig(vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)).eval()
    with caplog.at_level(logging.INFO, logger=P.__name__):
        pre = P.MaskedLMPretrainer(copy.deepcopy(hf), nsp=False).eval()
    assert not pre.sparse_mlm_head and pre.arch is None
    assert sum("no sparse MLM head for model type 'albert'" in r.message for r in caplog.records) == 1
    b = mlm_batch(hf.config)
    torch.testing.assert_close(pre(**b).loss, hf(**b).loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", A.ARCHS)
def test_from_scratch_arch_uses_the_tokenizer_specials(arch):
    specials = {"pad": 1, "cls": 0, "sep": 2, "mask": 99, "unk": 3}
    cfg = ModelConfig(arch=arch, hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                      max_position_embeddings=64, hidden_dropout_prob=0.0)
    config = M.planned_config(cfg, 100, 1, specials)
    assert A.MODEL_TYPES[config.model_type] == arch and config.pad_token_id == 1
    assert A.max_tokens(config) in (64, None)
    pre = M.build_pretrainer(cfg, 100, 1, nsp=False, special_ids=specials)
    assert type(pre.hf_model).__name__ == A.model_class(config).__name__
    b = mlm_batch(config)
    assert torch.isfinite(pre(**b).loss)
    if arch != "bert":
        with pytest.raises(ConfigError, match="data.nsp=false"):
            M.build_pretrainer(cfg, 100, 1, nsp=True, special_ids=specials)


@pytest.mark.parametrize("model_type", TYPES)
def test_init_from_any_masked_lm_dir(model_type, tmp_path):
    src = tiny_model_dir(model_type, tmp_path / "m")
    ref = AutoModelForMaskedLM.from_pretrained(src).eval()
    vocab, pad = ref.config.vocab_size, ref.config.pad_token_id
    pre = M.build_pretrainer(ModelConfig(init_from=str(src), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                             vocab, pad, nsp=False).eval()
    want = "BertForPreTraining" if model_type == "bert" else type(ref).__name__
    assert type(pre.hf_model).__name__ == want
    b = mlm_batch(ref.config)
    torch.testing.assert_close(pre(**b).loss, ref(**b).loss, atol=1e-5, rtol=0)  # the same weights
    other = "bert" if model_type != "bert" else "roberta"
    with pytest.raises(ConfigError, match=f"model.arch={other} contradicts model.init_from"):
        M.planned_config(ModelConfig(init_from=str(src), arch=other), vocab, pad)


def test_init_from_trains_with_dropout_from_the_first_step(tmp_path):
    src = tiny_model_dir("roberta", tmp_path / "m")
    config = AutoModelForMaskedLM.from_pretrained(src).config
    pre = M.build_pretrainer(ModelConfig(init_from=str(src)), config.vocab_size, config.pad_token_id, nsp=False)
    assert pre.training and all(m.training for m in pre.modules())  # from_pretrained alone gives eval mode
