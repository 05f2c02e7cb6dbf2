"""ZeRO-3 builds the pretraining model already partitioned (launched by tests/pretrain/test_zero3_build.py,
2 ranks under the deepspeed launcher).

Constructs the real ``ptft pretrain`` :class:`Trainer` with ``train.zero_stage=3``. A spy around the
loop's ``build_pretrainer`` records, the moment the model exists and before any engine does, what
THIS rank holds of each parameter. Then the weights are gathered and compared with a model built
whole (no ZeRO) from the same seed. Every rank writes OUT/rank{R}.json.

    deepspeed --num_gpus 2 tests/dist_scripts/zero3_build_job.py CORPUS RUN_DIR OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ptft_dist.config import load_config
from ptft_dist.pretrain import loop
from tests.dist_scripts.common import dump

TINY = ["model.preset=tiny", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=2",
        "model.intermediate_size=64", "data.max_seq_len=64", "data.num_workers=0", "train.micro_batch_size=4",
        "train.max_steps=2", "train.zero_stage=3", "train.seed=7", "optim.warmup_steps=1"]


def held_by_this_rank(model: torch.nn.Module) -> list[dict]:
    """Per parameter: is it a ZeRO parameter, its status, the elements held locally (full data and
    partition) and its full size."""
    rows = []
    for name, p in model.named_parameters():
        part = getattr(p, "ds_tensor", None)
        rows.append({"name": name, "zero": hasattr(p, "ds_id"), "status": str(getattr(p, "ds_status", None)),
                     "local_numel": int(p.data.numel()), "partition_numel": None if part is None else int(part.numel()),
                     "full_numel": int(getattr(p, "ds_numel", p.numel()))})
    return rows


def main() -> None:
    import deepspeed

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    corpus, run_dir, out = args[0], args[1], Path(args[2])
    built: dict = {}
    real_build = loop.build_pretrainer

    def spy(*a, **kw):
        model = real_build(*a, **kw)
        built["params"] = held_by_this_rank(model)
        return model

    loop.build_pretrainer = spy
    cfg = load_config(None, [f"data.corpus={corpus}", f"train.run_dir={run_dir}", *TINY])
    trainer = loop.Trainer(cfg)
    rank = trainer.env.rank
    params = dict(trainer.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        gathered = {n: p.detach().clone() for n, p in params.items()}
    # the same seed, built whole (outside the ZeRO-3 build context): must be the same weights
    torch.manual_seed(cfg.train.seed)
    whole = real_build(cfg.model, trainer.manifest.vocab_size, trainer.manifest.special_tokens["pad"], nsp=cfg.data.nsp)
    mismatched = [n for n, p in whole.named_parameters() if not torch.equal(p.detach(), gathered[n])]
    from ptft_dist.engine.base import param_groups

    emb = "bert.embeddings.word_embeddings.weight"
    dump(out / f"rank{rank}.json", {
        "rank": rank, "world_size": trainer.env.world_size, "params": built["params"],
        "whole_is_zero": any(hasattr(p, "ds_id") for p in whole.parameters()),
        "names_whole": sorted(n for n, _ in whole.named_parameters()), "names_gathered": sorted(gathered),
        "mismatched": mismatched, "word_embedding_std": float(gathered[emb].std()),
        "tied": trainer.model.cls.predictions.decoder.weight is trainer.model.bert.embeddings.word_embeddings.weight,
        "rng_after_build": float(torch.rand(1)),
        # weight decay groups (decay: matrices; none: biases, norms) must not see the empty placeholders
        "groups": [len(g["params"]) for g in param_groups(trainer.model, 0.01)],
        "groups_whole": [len(g["params"]) for g in param_groups(whole, 0.01)],
    })
    torch.distributed.barrier()
    os._exit(0)  # skip interpreter teardown of the loader / process group: the numbers are written


if __name__ == "__main__":
    main()
