"""The planner against real 2-rank runs of the pretraining path (CPU, gloo, DeepSpeed 0.19), one run
per ZeRO stage (tests/plan/plan_job.py builds ``pretrain.loop.Trainer`` exactly as ``ptft pretrain``):

* memory: predicted peak per rank vs the rank's measured peak RSS above its pre-build baseline,
  within 15%, each rank;
* communication: bytes per step per collective vs DeepSpeed's comms logger, within 10%.

The model shape here (hidden 384, 6 layers, seq 96, micro-batch 6) is not the one the planner's CPU
constants were measured on (hidden 512, 4 layers, seq 128; ptft_dist/plan/memory.py), so the check
is of the model, not of a fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptft_dist.config import load_config
from ptft_dist.dist.discover import free_port
from ptft_dist.engine.ds_config import DS_CONFIG_DIR
from ptft_dist.plan.planner import PlanRequest, make_plan
from tests.corpus_factory import make_corpus

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "tests/plan/plan_job.py"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SHAPE = ["model.preset=small", "model.hidden_size=384", "model.num_hidden_layers=6", "model.num_attention_heads=6",
         "model.intermediate_size=1536", "data.max_seq_len=96", "data.short_seq_prob=0", "data.num_workers=0",
         "train.micro_batch_size=6", "train.precision=fp32", "train.eval_every=0", "train.max_steps=100",
         "optim.warmup_steps=1"]
MEMORY_TOLERANCE = 0.15
COMMS_TOLERANCE = 0.10
STEPS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan-corpus")
    make_corpus(root, shard_docs=(40, 40), val_docs=(4,), sentences=(20, 40), n_words=(8, 16))
    return root


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PTFT_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/ptft/torch_extensions"))
    return env


def comms_logged_config(stage: int, out: Path) -> Path:
    """The shipped ZeRO template with DeepSpeed's comms logger on (the run is otherwise the template's)."""
    cfg = json.loads((DS_CONFIG_DIR / f"zero{stage}.json").read_text())
    cfg["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    path = out / f"zero{stage}-comms.json"
    path.write_text(json.dumps(cfg))
    return path


def run_ranks(overrides: list[str], out: Path, ranks: int = 2, timeout: float = 600) -> list[dict]:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(JOB), "--out", str(out),
           "--steps", str(STEPS), *overrides]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=timeout, cwd=out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.distributed
# CI checks the ends (no partitioning, everything partitioned); ZeRO-1/2 (-1..+6% measured) run extended
@pytest.mark.parametrize("stage", [0, pytest.param(1, marks=pytest.mark.extended),
                                   pytest.param(2, marks=pytest.mark.extended), 3])
def test_memory_and_bytes_per_step_match_a_real_run(stage, corpus, tmp_path):
    overrides = [*SHAPE, f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"train.zero_stage={stage}",
                 f"train.run_dir={tmp_path / 'run'}", f"train.deepspeed_config={comms_logged_config(stage, tmp_path)}"]
    ranks = run_ranks(overrides, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["zero_stage"] == stage

    plan = make_plan(load_config(None, overrides), PlanRequest(nodes=1, gpus_per_node=2, gpu="cpu", mfu=0.5))
    predicted = plan["configured"]
    assert predicted["micro_batch"] == 6 and predicted["zero_stage"] == stage
    want_mib = predicted["memory_gib"]["total"] * 1024
    for r in ranks:
        got_mib = r["hwm_mb"] - r["rss_baseline_mb"]
        print(f"ZeRO-{stage} rank {r['rank']}: peak RSS above baseline {got_mib:.0f} MiB, predicted {want_mib:.0f} "
              f"MiB ({want_mib / got_mib - 1:+.1%})")
        assert abs(want_mib / got_mib - 1) <= MEMORY_TOLERANCE, (stage, r["rank"], got_mib, want_mib)

    logged = predicted["comm"]["logged_bytes_by_op"]
    measured = {op: rec["bytes"] / r["steps"] for op, rec in ranks[0]["comms"].items()}
    for op, want in logged.items():
        got = measured.get(op, 0.0)
        print(f"ZeRO-{stage} {op}: {got / 1e6:.2f} MB/step logged, predicted {want / 1e6:.2f} MB ({want / got - 1:+.1%})")
        assert abs(want / got - 1) <= COMMS_TOLERANCE, (stage, op, got, want)
    # nothing sizeable goes unpredicted (DeepSpeed's grad-norm all-reduce and ZeRO-3's tiny broadcasts aside)
    unpredicted = sum(v for op, v in measured.items() if op not in logged)
    assert unpredicted <= 0.01 * sum(measured.values()), measured
