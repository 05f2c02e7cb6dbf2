"""ptft_varlen (ptft_dist/pretrain/attention.py): packed attention never leaks across samples, never
drops or moves a token, padded batches keep their mask, and the CUDA kernel is called by its contract."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from ptft_dist.pretrain import attention as A

LENGTHS = [7, 3, 11, 1, 6]


def tiny_bert(impl: str) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=impl)
    return BertModel(cfg, add_pooling_layer=False).eval()


def padded_batch(seed: int = 0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + 2  # two columns of pure padding as well
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, 97, (len(lengths), width), generator=g) * mask
    return ids, mask


def run_packed(model: BertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T, H) hidden states of the real tokens, packed the way BertPretrainer packs."""
    idx = mask.reshape(-1).nonzero().squeeze(1)
    lens = mask.sum(1)
    cu = F.pad(lens.cumsum(0), (1, 0)).int()
    out = model(input_ids=ids.reshape(-1)[idx][None], position_ids=(idx % ids.shape[1])[None],
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lens.max()), max_length_k=int(lens.max()))
    return out.last_hidden_state[0]


def qkv(lengths=LENGTHS, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    return [torch.randn(total, heads, dim, generator=g) for _ in range(3)], cu


def reference(q, k, v, cu):
    """Attention computed sample by sample with plain softmax: the ground truth."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) / q.shape[-1] ** 0.5
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b]))
    return torch.cat(outs)


@pytest.mark.parametrize("kernel", ["per_sample", "pad_around"])
def test_kernels_equal_per_sample_softmax(kernel):
    (q, k, v), cu = qkv()
    got = A.packed_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), None, kernel=kernel)
    torch.testing.assert_close(got, reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_pad_around_packed_rows_scatters_to_rows_with_a_block_mask(monkeypatch):
    """Packed rows (several sequences per batch row): the pad-around kernel's grid is rows x row width,
    not sequences x longest sequence, and each sequence still attends to itself only (outputs and
    gradients equal the per-sample reference; no NaN from the pad slots)."""
    (q, k, v), cu = qkv()
    rows_cu, width = torch.tensor([0, 10, 22, 28], dtype=torch.int32), 12  # rows [7, 3] [11, 1] [6]
    shapes = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q_, *a, **kw: shapes.append(q_.shape) or sdpa(q_, *a, **kw))
    for x in (q, k, v):
        x.requires_grad_(True)
    got = A.packed_attention(q, k, v, cu, cu, 11, 11, None, kernel="pad_around", rows_cu=rows_cu, rows_max=width)
    assert shapes == [torch.Size([3, 2, width, 8])]
    want = reference(q, k, v, cu)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_packed_encoder_keeps_every_token_and_no_leak():
    """Packed hidden states equal the padded model's at every real token (none dropped or moved),
    and changing one sample's tokens leaves every other sample's states bit-for-bit alone."""
    packed, padded = tiny_bert(A.NAME), tiny_bert("sdpa")
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = padded(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        got = run_packed(packed, ids, mask)
        assert got.shape == ref.shape == (sum(LENGTHS), 32)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

        changed = ids.clone()
        changed[2, : LENGTHS[2]] = torch.randint(1, 97, (LENGTHS[2],), generator=torch.Generator().manual_seed(9))
        again = run_packed(packed, changed, mask)
    owner = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    assert not torch.equal(again[owner == 2], got[owner == 2])
    assert torch.equal(again[owner != 2], got[owner != 2])


def test_padded_batches_keep_their_mask():
    """ptft_varlen on a padded batch is sdpa with the padding mask (transformers gives an unregistered
    custom name no mask at all): the pad tokens' ids do not matter."""
    model, sdpa = tiny_bert(A.NAME), tiny_bert("sdpa")
    ids, mask = padded_batch()
    noisy = torch.where(mask.bool(), ids, torch.randint(1, 97, ids.shape, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        b = model(input_ids=noisy, attention_mask=mask).last_hidden_state[mask.bool()]
        c = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


def test_kernel_choice():
    assert A.choose_kernel("cpu", torch.float32, 0.1) == "per_sample"
    assert A.choose_kernel("cpu", torch.bfloat16, 0.0) == "per_sample"
    assert A.choose_kernel("cuda", torch.bfloat16, 0.0) == "varlen"
    assert A.choose_kernel("cuda", torch.float16, 0.0) == "varlen"
    assert A.choose_kernel("cuda", torch.bfloat16, 0.1) == "pad_around"  # varlen_attn has no dropout
    assert A.choose_kernel("cuda", torch.float32, 0.0) == "pad_around"  # nor fp32
    (q, k, v), cu = qkv()
    with pytest.raises(ValueError, match="no attention dropout"):
        A.packed_attention(q, k, v, cu, cu, 11, 11, None, dropout=0.1, kernel="varlen")


def test_varlen_call_contract(monkeypatch):
    """torch's varlen_attn is CUDA-only, so a CPU stand-in (named as such) checks the documented call
    contract -- (T, H, D) q/k/v with unit last stride, int32 cu_seqlens, int max lengths, scale -- and
    computes the reference; the encoder output must match the padded model."""
    import torch.nn.attention.varlen as varlen

    calls = []

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **kw):
        assert q.dim() == 3 and q.shape == k.shape == v.shape and q.stride(-1) == 1
        assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and cu_q.shape[0] == len(LENGTHS) + 1
        assert isinstance(max_q, int) and isinstance(max_k, int) and max_q == max(LENGTHS)
        assert scale == pytest.approx(q.shape[-1] ** -0.5)
        calls.append(q.shape)
        return reference(q, k, v, cu_q)

    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    monkeypatch.setattr(A, "choose_kernel", lambda device, dtype, dropout: "varlen" if not dropout else "pad_around")
    packed, padded = tiny_bert(A.NAME), tiny_bert("sdpa")
    ids, mask = padded_batch(1)
    with torch.no_grad():
        got = run_packed(packed, ids, mask)
        ref = padded(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    assert calls == [(sum(LENGTHS), 4, 8)] * 2  # once per layer
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["per_sample", "pad_around"])
def test_attention_dropout_is_applied_in_training(kernel):
    (q, k, v), cu = qkv()
    torch.manual_seed(0)
    a = A.packed_attention(q, k, v, cu, cu, 11, 11, None, dropout=0.5, kernel=kernel)
    b = A.packed_attention(q, k, v, cu, cu, 11, 11, None, dropout=0.5, kernel=kernel)
    assert not torch.allclose(a, b)  # dropout draws differ
    assert not torch.allclose(a, reference(q, k, v, cu))


def test_export_names_no_custom_attention(tmp_path):
    tiny_bert(A.NAME).save_pretrained(tmp_path)
    assert "ptft_varlen" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = BertModel.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != A.NAME
