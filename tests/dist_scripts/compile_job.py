"""model.compile through the real engine (launched by tests/engine/test_compile.py, one process):
eager ZeRO-0 vs compiled ZeRO-0 and ZeRO-3, packed tiny BERT, dropout off, batches of varying
shapes; writes losses and compile seconds to OUT.json."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ptft_dist.config import ModelConfig, OptimConfig, TrainConfig
from ptft_dist.engine import build_engine
from ptft_dist.engine.compile import compile_engine, compile_seconds
from ptft_dist.pretrain.model import BertPretrainer, bert_config
from tests.dist_scripts.common import dump, lr_lambda

VOCAB, STEPS, MB = 128, 4, 4


def batch(step: int) -> dict:
    """Right-padded MLM+NSP batch; the width and lengths change every step (dynamic shapes)."""
    g = torch.Generator().manual_seed(100 + step)
    width = 12 + 3 * step
    lengths = torch.randint(4, width + 1, (MB,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(5, VOCAB, (MB, width), generator=g) * mask
    labels = torch.where((torch.rand(MB, width, generator=g) < 0.3) & mask.bool(), ids, -100)
    labels[:, 1] = ids[:, 1]
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (MB,), generator=g),
            # the stream's packed form (stream/loader.py): host-made, max_seqlen a Python int
            "cu_seqlens": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int(),
            "indices": mask.reshape(-1).nonzero().squeeze(1), "max_seqlen": int(lengths.max())}


def run(stage: int, compiled: bool) -> dict:
    cfg = bert_config(ModelConfig(preset="tiny", hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), VOCAB, 0)
    torch.manual_seed(0)
    model = BertPretrainer.from_config(cfg)
    assert model.packed
    tc = TrainConfig(backend="deepspeed", zero_stage=stage, precision="fp32", micro_batch_size=MB, grad_accum=1,
                     global_batch_size=MB)
    engine = build_engine(model, tc, OptimConfig(lr=1e-2), lr_lambda, 1, torch.device("cpu"))
    if compiled:
        compile_engine(engine)
    before, losses, times = compile_seconds(), [], []
    for step in range(STEPS):
        t0 = time.perf_counter()
        out = engine.forward(**batch(step))
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        times.append(time.perf_counter() - t0)
    return {"losses": losses, "step_s": times, "compile_s": compile_seconds() - before,
            "is_compiled": bool(getattr(engine.ds, "is_compiled", False))}


if __name__ == "__main__":
    stages = [int(s) for s in sys.argv[2].split(",")]
    result = {"eager_0": run(0, False)}
    for stage in stages:
        result[f"compiled_{stage}"] = run(stage, True)
    dump(sys.argv[1], result)
