"""The pretraining model (ptft_dist/pretrain/model.py): exactness of the sparse head and packing, export keys, FLOPs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertForPreTraining

from ptft_dist.config import ModelConfig
from ptft_dist.metrics.parameters import count_parameters
from ptft_dist.pretrain import model as M

VOCAB = 101
SMALL = {"preset": "tiny", "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def small_config(**overrides):
    return M.bert_config(ModelConfig(**{**SMALL, **overrides}), VOCAB, 0)


def make_batch(seed: int = 0):
    """Right-padded batch: varied lengths, one padding sample (all labels -100), one NSP label ignored."""
    g = torch.Generator().manual_seed(seed)
    B, S = 5, 24
    lengths = torch.tensor([24, 17, 9, 2, 13])
    am = (torch.arange(S)[None] < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (B, S), generator=g) * am
    tt = ((torch.arange(S)[None] > lengths[:, None] // 2) & am.bool()).long()
    chosen = (torch.rand(B, S, generator=g) < 0.25) & am.bool()
    labels = torch.where(chosen, torch.randint(5, VOCAB, (B, S), generator=g), -100)
    labels[3] = -100  # the stream's padding sample: [CLS] [SEP], nothing predicted
    nsp = torch.tensor([0, 1, 1, -100, 0])
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am, "labels": labels, "next_sentence_label": nsp}


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------- config


def test_presets_are_the_standard_shapes():
    want = {
        "tiny": (2, 128, 2),
        "mini": (4, 256, 4),
        "small": (4, 512, 8),
        "medium": (8, 512, 8),
        "base": (12, 768, 12),
        "large": (24, 1024, 16),
    }
    for name, (layers, hidden, heads) in want.items():
        cfg = M.bert_config(ModelConfig(preset=name), 30522, 0)
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (layers, hidden, heads)
        assert cfg.intermediate_size == 4 * hidden
        assert cfg._attn_implementation == "sdpa" and cfg.type_vocab_size == 2


def test_overrides_and_bad_values_name_the_key():
    cfg = M.bert_config(ModelConfig(preset="mini", hidden_size=384, num_attention_heads=6), 1000, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.pad_token_id) == (384, 1536, 4, 3)
    with pytest.raises(ValueError, match=r"model\.hidden_size \(500\).*model\.num_attention_heads \(8\)"):
        M.bert_config(ModelConfig(preset="small", hidden_size=500), 1000, 0)
    with pytest.raises(ValueError, match=r"model\.num_hidden_layers"):
        M.bert_config(ModelConfig(num_hidden_layers=0), 1000, 0)
    with pytest.raises(ValueError, match=r"model\.attn_implementation"):
        M.bert_config(ModelConfig(attn_implementation="fast"), 1000, 0)
    with pytest.raises(ValueError, match=r"model\.preset"):
        M.bert_config(ModelConfig(preset="huge"), 1000, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pad_token_id"):
        M.bert_config(ModelConfig(), 1000, 1000)


# --------------------------------------------------------------------------- export compatibility


def test_state_dict_is_bert_for_pretraining_and_ties_hold(tmp_path):
    from transformers import AutoModelForPreTraining

    pre = M.BertPretrainer.from_config(small_config())
    plain = BertForPreTraining(small_config())
    assert list(pre.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(pre.state_dict(), strict=True)
    emb = pre.bert.embeddings.word_embeddings.weight
    assert pre.cls.predictions.decoder.weight is emb
    assert pre.hf_model.cls.predictions.decoder.weight is emb and pre.hf_model.bert is pre.bert
    pre.to(torch.float64)
    assert pre.cls.predictions.decoder.weight is pre.bert.embeddings.word_embeddings.weight
    assert len({id(p) for p in pre.parameters()}) == len(list(pre.parameters()))

    pre.to(torch.float32).hf_model.save_pretrained(tmp_path)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(loaded) is BertForPreTraining and loaded.config.architectures == ["BertForPreTraining"]
    pre.eval()
    b = make_batch()
    ref = pre.hf_model(**{k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    got = loaded(**{k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    torch.testing.assert_close(got.prediction_logits, ref.prediction_logits)

    # model.init_from: the export is a valid starting point; contradicting settings fail by key.
    again = M.build_pretrainer(ModelConfig(init_from=str(tmp_path), hidden_dropout_prob=0.0), VOCAB, 0, nsp=True)
    torch.testing.assert_close(again.state_dict(), pre.state_dict())
    assert again.config.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match=r"model\.init_from"):
        M.build_pretrainer(ModelConfig(init_from=str(tmp_path)), VOCAB + 1, 0, nsp=True)
    with pytest.raises(ValueError, match=r"model\.hidden_size"):
        M.build_pretrainer(ModelConfig(init_from=str(tmp_path), hidden_size=64), VOCAB, 0, nsp=True)


# --------------------------------------------------------------------------- losses


def test_sparse_head_equals_dense_bert_for_pretraining_loss_and_grads():
    torch.manual_seed(0)
    hf = BertForPreTraining(small_config()).eval()
    pre = M.BertPretrainer(copy.deepcopy(hf)).eval()
    b = make_batch()

    ref = hf(**b)
    ref.loss.backward()
    out = pre(**b)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert_grads_close(grads(pre), grads(hf))
    assert set(grads(pre)) == {n for n, _ in pre.named_parameters()}  # no unused parameter (DDP-safe)

    logits = ref.prediction_logits.reshape(-1, VOCAB)
    mlm_ref = F.cross_entropy(logits, b["labels"].reshape(-1))
    torch.testing.assert_close(out.mlm_loss, mlm_ref.detach(), atol=1e-5, rtol=0)
    predicted = b["labels"].reshape(-1) != -100
    assert out.mlm_count.item() == predicted.sum().item()
    assert out.mlm_correct.item() == (logits.argmax(-1) == b["labels"].reshape(-1))[predicted].sum().item()
    assert out.nsp_count.item() == 4
    assert out.nsp_correct.item() == (ref.seq_relationship_logits.argmax(-1) == b["next_sentence_label"]).sum().item()


def test_dense_head_flag_and_mlm_only_mode():
    torch.manual_seed(1)
    hf = BertForPreTraining(small_config()).eval()
    b = make_batch(1)
    sparse = M.BertPretrainer(copy.deepcopy(hf), nsp=False).eval()
    dense = M.BertPretrainer(copy.deepcopy(hf), nsp=False, sparse_mlm_head=False).eval()
    a, c = sparse(**b), dense(**b)
    assert a.nsp_loss is None and a.nsp_count is None
    torch.testing.assert_close(a.loss, a.mlm_loss)
    torch.testing.assert_close(a.loss, c.loss, atol=1e-5, rtol=0)
    assert a.mlm_correct.item() == c.mlm_correct.item()
    a.loss.backward()
    c.loss.backward()
    assert_grads_close(grads(sparse), grads(dense))
    # Pooler + NSP head: kept for the export, frozen; every trainable parameter gets a gradient.
    frozen = {n for n, p in sparse.named_parameters() if not p.requires_grad}
    assert frozen == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "cls.seq_relationship.weight",
        "cls.seq_relationship.bias",
    }
    assert set(grads(sparse)) == {n for n, _ in sparse.named_parameters()} - frozen
    assert list(sparse.state_dict()) == list(hf.state_dict())
    b.pop("next_sentence_label")
    with pytest.raises(ValueError, match="next_sentence_label"):
        M.BertPretrainer(hf)(**b)


def test_nothing_predicted_gives_zero_loss_not_nan():
    pre = M.BertPretrainer.from_config(small_config())
    b = make_batch()
    b["labels"][:] = -100
    b["next_sentence_label"][:] = -100
    out = pre(**b)
    assert out.loss.item() == 0.0 and out.mlm_count.item() == 0
    out.loss.backward()


# --------------------------------------------------------------------------- unpadding


@pytest.mark.parametrize("kernel", ["auto", "pad_around"])
def test_packed_encoder_equals_padded(monkeypatch, kernel):
    """The real ptft_varlen kernels (CPU: per-sample SDPA; pad-around, which CUDA uses under dropout):
    packed and padded give the same losses, counts and gradients (dropout off)."""
    from ptft_dist.pretrain import attention

    if kernel != "auto":
        monkeypatch.setattr(attention, "choose_kernel", lambda *a: kernel)
    assert M.BertPretrainer.from_config(small_config()).packed  # sdpa + unpad (the defaults) packs
    assert not M.BertPretrainer.from_config(small_config(), unpad=False).packed
    assert not M.BertPretrainer.from_config(small_config(attn_implementation="eager")).packed

    torch.manual_seed(2)
    padded_hf = BertForPreTraining(small_config()).eval()
    packed_hf = copy.deepcopy(padded_hf)
    padded, packed = M.BertPretrainer(padded_hf, unpad=False).eval(), M.BertPretrainer(packed_hf).eval()
    assert packed.packed and not padded.packed
    assert packed.config._attn_implementation == "ptft_varlen" and padded.config._attn_implementation == "sdpa"

    b = make_batch(2)
    ref = padded(**b)
    ref.loss.backward()
    out = packed(**b)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.nsp_loss, ref.nsp_loss, atol=1e-5, rtol=0)
    assert (out.mlm_count, out.mlm_correct, out.nsp_correct) == (ref.mlm_count, ref.mlm_correct, ref.nsp_correct)
    assert_grads_close(grads(packed), grads(padded))

    # The stream's precomputed packing (numpy-made, on the CPU) gives the same result.
    lengths = b["attention_mask"].sum(1)
    stream_keys = {
        "cu_seqlens": F.pad(lengths.cumsum(0), (1, 0)).int(),
        "indices": b["attention_mask"].reshape(-1).nonzero().squeeze(1),
        "max_seqlen": int(lengths.max()),
        "sample_ids": torch.arange(5),
    }
    again = packed(**b, **stream_keys)
    torch.testing.assert_close(again.loss, out.loss)


def test_cpu_packs_only_batches_with_enough_padding(monkeypatch):
    """Below CPU_MIN_PAD_SHARE a CPU micro-batch runs padded (same loss); above it, packed."""
    from ptft_dist.pretrain import attention

    calls = []
    real = attention.per_sample
    monkeypatch.setattr(attention, "per_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)
    model = M.BertPretrainer.from_config(small_config()).eval()
    b = make_batch(3)  # 46 % padding
    full = {k: v[:1] for k, v in b.items()}  # one full-length row: no padding
    ref = M.BertPretrainer(copy.deepcopy(model.hf_model), unpad=False).eval()
    torch.testing.assert_close(model(**full).loss, ref(**full).loss)
    assert calls == []
    torch.testing.assert_close(model(**b).loss, ref(**b).loss, atol=1e-5, rtol=0)
    assert len(calls) == small_config().num_hidden_layers


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("nsp", [True, False])
def test_flops_per_token_matches_a_direct_count(nsp):
    cfg = small_config(attn_implementation="eager")
    pre = M.BertPretrainer.from_config(cfg, nsp=nsp)
    B, S = 3, 40
    ids = torch.randint(5, VOCAB, (B, S))
    labels = torch.full((B, S), -100)
    labels[:, ::7] = ids[:, ::7]
    masked = (labels != -100).float().mean().item()
    with FlopCounterMode(display=False) as counter:
        pre(ids, torch.zeros_like(ids), torch.ones_like(ids), labels, torch.zeros(B, dtype=torch.long)).loss.backward()
    counted = counter.get_total_flops()
    predicted = M.flops_per_token(cfg, S, masked, nsp) * B * S
    # The only uncounted matmul: the (unused) pooler forward in MLM-only mode.
    assert abs(predicted - counted) / counted < 0.02


def test_effective_seq_len_and_parameter_counts():
    assert M.effective_seq_len(torch.tensor([4, 4])) == 4.0
    assert M.effective_seq_len(torch.tensor([1, 3])) == pytest.approx(10 / 4)
    cfg = small_config()
    counts = count_parameters(M.BertPretrainer.from_config(cfg))
    H = cfg.hidden_size
    assert counts["embedding"] == (VOCAB + cfg.max_position_embeddings + 2) * H
    assert counts["total"] == sum(p.numel() for p in BertForPreTraining(cfg).parameters())
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]
    assert counts["trainable"] == counts["total"]
    mlm_only = count_parameters(M.BertPretrainer.from_config(cfg, nsp=False))  # pooler + NSP head frozen
    assert mlm_only["trainable"] == counts["total"] - (H * H + H) - (2 * H + 2)


def test_micro_batch_work_counts_real_tokens_and_samples():
    cfg = small_config()
    batch = make_batch()
    batch["sample_ids"] = torch.tensor([4, 9, 1, -1, 7])  # the padding sample has id -1
    tokens, samples, flops = M.micro_batch_work(batch, cfg, nsp=True)
    assert (tokens, samples) == (24 + 17 + 9 + 2 + 13, 4)
    masked = int((batch["labels"] != -100).sum()) / tokens
    seq = M.effective_seq_len(torch.tensor([24, 17, 9, 2, 13]))
    assert flops == pytest.approx(tokens * M.flops_per_token(cfg, seq, masked, True))
    assert set(M.model_inputs(batch)) == set(M.MODEL_INPUTS) - {"cu_seqlens", "indices", "max_seqlen"}
    # packed rows: attention spans the chunks of cu_seqlens, not the rows
    batch["cu_seqlens"] = torch.tensor([0, 12, 24, 41, 50, 52, 65], dtype=torch.int32)
    _, _, packed_flops = M.micro_batch_work(batch, cfg, nsp=True)
    chunks = M.effective_seq_len(torch.tensor([12, 12, 17, 9, 2, 13]))
    assert packed_flops == pytest.approx(tokens * M.flops_per_token(cfg, chunks, masked, True)) and packed_flops < flops
