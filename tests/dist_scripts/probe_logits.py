"""Load a pretraining checkpoint into the training engine (any world size, any ZeRO stage) and save
the MLM/NSP logits of ``pretrain.export.probe_batch``: the reference an export must reproduce.

    deepspeed --num_gpus 2 tests/dist_scripts/probe_logits.py RUN_DIR OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from ptft_dist.checkpoint.manager import CheckpointManager
from ptft_dist.config import load_config
from ptft_dist.corpus.format import load_manifest
from ptft_dist.dist.discover import discover
from ptft_dist.dist.rendezvous import device_for, init_distributed
from ptft_dist.engine import build_engine
from ptft_dist.engine.schedule import lr_lambda
from ptft_dist.pretrain.export import probe_batch
from ptft_dist.pretrain.model import build_pretrainer


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    run_dir, out = Path(args[0]), Path(args[1])
    cfg = load_config(run_dir / "resolved_config.yaml")
    env = discover()
    init_distributed(env)
    manifest = load_manifest(cfg.data.corpus)
    model = build_pretrainer(cfg.model, manifest.vocab_size, manifest.special_tokens["pad"], nsp=cfg.data.nsp)
    engine = build_engine(model, cfg.train, cfg.optim, lr_lambda(cfg.optim, cfg.train.max_steps),
                          env.world_size, device_for(env))
    ckpt = CheckpointManager(run_dir, cfg.checkpoint, env.rank, env.world_size)
    ckpt.load(engine, ckpt.resolve_resume())
    engine.eval()
    with torch.no_grad():
        o = engine.module.hf_model(**probe_batch(model.hf_model.config))
    if env.rank == 0:
        torch.save({"mlm": o.prediction_logits.float(), "nsp": o.seq_relationship_logits.float()}, out)


if __name__ == "__main__":
    main()
