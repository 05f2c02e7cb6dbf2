"""Shared pieces of the multi-process test scripts: a tiny BERT, deterministic batches, launch env."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB, SEQ = 256, 16


def tiny_bert(seed: int = 0, dropout: float = 0.0):
    """A 2-layer, hidden-64 BertForPreTraining (MLM + NSP), identical for a given seed."""
    from transformers import BertConfig, BertForPreTraining

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=SEQ, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, attn_implementation="eager")
    torch.manual_seed(seed)
    return BertForPreTraining(cfg)


def batch(step: int, micro: int, rank: int, mb: int = 4, seed: int = 1234) -> dict:
    """The micro-batch a rank sees at (step, micro): a pure function of its arguments."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro * 101 + rank)
    ids = torch.randint(5, VOCAB, (mb, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(mb, SEQ, generator=g) < 0.25
    pick[:, 1] = True
    labels[pick] = ids[pick]
    ids = ids.masked_fill(pick, 4)
    tt = torch.zeros_like(ids)
    tt[:, SEQ // 2:] = 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": torch.ones_like(ids),
            "labels": labels, "next_sentence_label": torch.randint(0, 2, (mb,), generator=g)}


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 3)


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def dump(path: str | Path, obj) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(p)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict:
    """Environment for a test job: the project's prebuilt DeepSpeed ops, one thread per rank."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def cli_env() -> dict:
    """Environment for ``ptft`` run as a user runs it: a single process (no inherited rank variables),
    offline, the project's prebuilt DeepSpeed ops."""
    env = job_env(HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def spawn_ranks(script: str | Path, args: list[str], nproc: int, log_dir: Path, **extra: str):
    """Start ``nproc`` ranks directly (as srun would): RANK/WORLD_SIZE/MASTER_* in the environment.
    Returns the Popen objects (their pids are the ranks' pids)."""
    import subprocess

    port = str(free_port())
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for r in range(nproc):
        env = job_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        with open(log_dir / f"rank{r}.log", "ab") as log:  # the child keeps its own descriptor
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=str(ROOT)))
    return procs
