"""``python -m ptft_dist.dist`` (and the file form launch.sh runs): modes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ptft_dist.dist.launcher_env import decode_argv, encode_argv
from tests.dist.helpers import slurm_step

REPO = Path(__file__).resolve().parents[2]
MAIN = str(REPO / "ptft_dist" / "dist" / "__main__.py")  # the file form: launch.sh and deepspeed's slurm runner


def _run_file(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, timeout=60, env=env)


def test_cli_write_deepspeed_env_and_hostnames(tmp_path):
    py = sys.executable
    out = tmp_path / "envfile"
    proc = subprocess.run(
        [py, "-m", "ptft_dist.dist", "--write-deepspeed-env", str(out), "--set", "PTFT_A=b c"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PTFT_A=b c" in out.read_text().splitlines()
    proc = subprocess.run(
        [py, MAIN, "--hostnames", "n[1-2],x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": "/nonexistent"},
    )
    assert proc.stdout.split() == ["n1", "n2", "x"], proc.stderr


def test_cli_discover_and_layout_error_exit_code():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PTFT_LAUNCHER"):
        env.pop(k, None)
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.9", MASTER_PORT="29999")
    proc = subprocess.run(
        [sys.executable, "-m", "ptft_dist.dist", "--discover"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["rank"], got["world_size"], got["master_addr"], got["master_port"]) == (1, 2, "10.0.0.9", 29999)
    bad = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
    bad.update(
        slurm_step(
            PATH="/nonexistent",
            SLURM_STEP_NUM_TASKS="3",
            SLURM_NTASKS="3",
            SLURM_STEP_TASKS_PER_NODE="2,1",
            SLURM_NTASKS_PER_NODE="2",
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ptft_dist.dist", "--discover"],
        capture_output=True,
        text=True,
        timeout=60,
        env=bad,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ptft dist: error: inconsistent SLURM layout: 3 tasks != 2 nodes x 2 tasks per node")
    assert "Traceback" not in proc.stderr


def test_cli_gpus_per_node():
    """launch.sh's one-task-per-GPU count: the number, or nothing (no GPUs, or 0 in a CPU-only job)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cases = [({}, ""), ({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2")]
    cases.append(({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "0"}, ""))
    for over, expected in cases:
        proc = _run_file("--gpus-per-node", env={**base, **over})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected, over


def test_cli_encode_argv_matches_the_library():
    argv = ["-m", "ptft_dist.cli", "--exec-b64", "a b", "it's", "--help", ""]
    proc = _run_file("--encode-argv", *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == encode_argv(argv)
    assert decode_argv(proc.stdout.strip()) == argv
    assert _run_file("--exec-b64").returncode == 2
