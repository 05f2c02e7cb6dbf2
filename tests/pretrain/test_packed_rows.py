"""A packed row (``data.pack_samples``) through the pretraining model: the loss, the predictions and
every gradient equal those of its chunks run one per row, padded, with plain SDPA. Packing that let
attention cross a chunk boundary, restarted no position, or dropped a token would change them
(the control at the end shows the comparison notices)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from ptft_dist.config import ConfigError
from ptft_dist.pretrain import attention
from ptft_dist.pretrain.pretrainer import MaskedLMPretrainer
from ptft_dist.stream.dataset import to_torch
from tests.stream.test_packed_rows import packed_stream


def tiny(arch: str, vocab: int):
    torch.manual_seed(0)
    kw = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=80,
              attn_implementation="sdpa")
    if arch == "roberta":  # positions count from pad + 1: a chunk must restart there, not at 0
        return RobertaForMaskedLM(RobertaConfig(pad_token_id=0, **kw))
    return BertForMaskedLM(BertConfig(**kw))


def one_chunk_per_row(batch: dict) -> dict:
    """The same chunks (tokens, masks, labels) as a padded batch with one chunk per row."""
    flat = {k: batch[k].reshape(-1)[batch["indices"]] for k in ("input_ids", "labels")}
    cu = batch["cu_seqlens"].tolist()
    width = max(e - a for a, e in zip(cu[:-1], cu[1:]))
    out = {k: torch.full((len(cu) - 1, width), fill, dtype=torch.long)
           for k, fill in (("input_ids", 0), ("labels", -100), ("attention_mask", 0))}
    for i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
        out["input_ids"][i, : e - a] = flat["input_ids"][a:e]
        out["labels"][i, : e - a] = flat["labels"][a:e]
        out["attention_mask"][i, : e - a] = 1
    return out


@pytest.mark.parametrize("arch,kernel", [("bert", None), ("roberta", None), ("bert", "pad_around")])
def test_packed_row_equals_its_chunks_alone(arch, kernel, monkeypatch):
    """``kernel``: None = the CPU kernel (one SDPA call per chunk); pad_around = CUDA's training kernel
    (scatter to the rows, block-diagonal mask), forced here on CPU."""
    if kernel:
        monkeypatch.setattr(attention, "choose_kernel", lambda *a: kernel)
    ds = packed_stream(mb=4)
    batch = to_torch(ds.batch_at(0, np.arange(4)))
    assert len(batch["cu_seqlens"]) - 1 > 2 * len(batch["input_ids"]), "rows should hold several chunks"
    hf = tiny(arch, ds.manifest.vocab_size)
    reference_hf = copy.deepcopy(hf)
    packed = MaskedLMPretrainer(hf, nsp=False, unpad=True, packed_rows=True)
    alone = MaskedLMPretrainer(reference_hf, nsp=False, unpad=False)
    assert packed.packed and not alone.packed

    out = packed(**{k: v for k, v in batch.items() if k != "sample_ids"})
    ref = alone(**one_chunk_per_row(batch))
    assert int(out.mlm_count) == int(ref.mlm_count) == int((batch["labels"] != -100).sum())
    assert int(out.mlm_correct) == int(ref.mlm_correct)
    assert torch.allclose(out.loss, ref.loss, rtol=0, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(packed.named_parameters(), alone.parameters()):
        if p.grad is not None or q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name

    # Every token's hidden state equals its chunk's alone; the control (each row as ONE sequence:
    # attention across its chunks, positions running on) differs, so this comparison sees a leak.
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "labels")}
    alone_batch = one_chunk_per_row(batch)
    leaky_cu = torch.nn.functional.pad(batch["attention_mask"].sum(1).cumsum(0), (1, 0)).int()
    with torch.no_grad():
        hidden = packed._encode_packed(**inputs, position_ids=None, cu_seqlens=batch["cu_seqlens"],
                                       indices=batch["indices"], max_seqlen=batch["max_seqlen"])[0]
        leaked = packed._encode_packed(**inputs, position_ids=None, cu_seqlens=leaky_cu, indices=batch["indices"],
                                       max_seqlen=int(batch["attention_mask"].sum(1).max()))[0]
        encoder = alone._encoder()
        ref_hidden = encoder(input_ids=alone_batch["input_ids"], attention_mask=alone_batch["attention_mask"]
                             ).last_hidden_state[alone_batch["attention_mask"].bool()]
    assert hidden.shape == ref_hidden.shape == (int(batch["attention_mask"].sum()), 32)
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)
    assert (leaked - ref_hidden).abs().max() > 1e-2


def test_packed_rows_need_a_varlen_attention():
    hf = tiny("bert", 400)
    with pytest.raises(ConfigError, match="data.pack_samples=true.*no variable-length"):
        MaskedLMPretrainer(hf, nsp=False, unpad=False, packed_rows=True)


@pytest.mark.distributed
def test_pretrain_with_packed_rows_through_the_cli(tmp_path):
    """2 DeepSpeed ranks (gloo, ZeRO-2) on short documents: rows carry several documents each, the
    first epoch delivers every row exactly once, and the loss is finite and falls on the fixed
    validation rows."""
    import json

    from tests.corpus_factory import make_corpus
    from tests.pretrain.test_pretrain import TINY, losses, run, sample_ids

    corpus = tmp_path / "corpus"
    make_corpus(corpus, shard_docs=(40, 25, 50, 30), val_docs=(12,), sentences=(1, 2), n_words=(2, 6))
    run(corpus, tmp_path / "run", *TINY, "data.nsp=false", "data.pack_samples=true", "train.zero_stage=2",
        "model.hidden_dropout_prob=0.0")
    rows, chunks = (packed_stream(corpus, pack=p, mb=4).num_samples(0) for p in (True, False))
    assert rows < chunks / 2
    ids = sample_ids(tmp_path / "run")
    steps_per_epoch = -(-rows // 8)  # 2 ranks x micro-batch 4
    first_epoch = [i for s in range(1, steps_per_epoch + 1) for i in ids[s]]
    assert sorted(first_epoch) == list(range(rows))
    loss = losses(tmp_path / "run")
    assert len(loss) == 12 and all(np.isfinite(v) for v in loss.values())
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and r["step"] == steps_per_epoch - 1][0]
    assert train["consumed_tokens"] / train["consumed_samples"] > 2 * chunks_mean_length(corpus)
    evals = [r for r in records if r["split"] == "eval"]
    assert [e["step"] for e in evals] == [6, 12] and evals[1]["mlm_loss"] < evals[0]["mlm_loss"]


def chunks_mean_length(corpus) -> float:
    ds = packed_stream(corpus, pack=False, mb=64)
    lengths = [int(b["attention_mask"].sum()) for b in ds.iter_numpy()]
    return sum(lengths) / ds.num_samples(0)
