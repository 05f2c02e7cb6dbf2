"""Running ``ptft`` the way a user does (a subprocess through the real CLI) and checking what a
refusal must look like: exit 2, one ``ptft: error:`` line, no traceback (docs/design.md, guarantee 9).
Shared by the pretrain / convert / finetune bad-input tests; ``refusal.py`` holds the in-process twins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.dist_scripts.common import cli_env

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# A pretraining run that takes seconds on one CPU process: 4 steps, checkpoints at 2 and 4.
TINY_PRETRAIN = [
    "model.preset=tiny", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=2",
    "model.intermediate_size=64", "data.max_seq_len=64", "data.num_workers=0", "train.micro_batch_size=4",
    "train.max_steps=4", "train.log_every=1", "train.eval_every=0", "checkpoint.every=2", "optim.warmup_steps=1",
]


env = cli_env



def ptft(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ptft ARGS`` in one process; returns the finished process (any exit status)."""
    return subprocess.run([PY, "-m", "ptft_dist.cli", *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def refused_proc(proc: subprocess.CompletedProcess) -> str:
    """The one ``ptft: error:`` line of a refusal (exit 2, no traceback, the error line last);
    the subprocess twin of ``tests.bad_inputs.refusal.refused``."""
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ptft: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-4000:]
    return errors[0]


def pretrain(corpus: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return ptft("pretrain", "--corpus", corpus, "--run-dir", run_dir, *TINY_PRETRAIN, *overrides)
