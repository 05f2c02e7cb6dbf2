"""Mistakes and side effects around launching: launch.sh options, the SLURM templates' helpers
(docs/refusals.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


def test_slurm_record_step_leaves_the_git_index_untouched(tmp_path):
    """ptft_record (slurm/lib.sh) runs in every job on a checkout that other jobs and the user share:
    it must not rewrite .git/index (git status/diff/describe refresh it as a side effect, racing
    with the user's own git commands and taking .git/index.lock)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("a = 1\n")
    (repo / "b.py").write_text("b = 1\n")
    _git(repo, "add", "a.py", "b.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "b.py").write_text("b = 2\n")  # a real change: status and diff must show it
    os.utime(repo / "a.py", ns=(1_000_000_000, 1_000_000_000))  # stale stat info: a refresh would rewrite the index
    index = repo / ".git" / "index"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    out = tmp_path / "record"
    proc = subprocess.run(["bash", "-c", f'source "{ROOT}/slurm/lib.sh" && ptft_record "{out}"'],
                          env=dict(os.environ, PTFT_REPO=str(repo), PY=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before
    assert not (repo / ".git" / "index.lock").exists()
    git_txt = (out / "git.txt").read_text()
    assert f"revision: {head}" in git_txt and "-dirty" in git_txt and "M b.py" in git_txt
    assert "a.py" not in git_txt  # only its stat info changed: not a modification
    assert "+b = 2" in (out / "git.diff").read_text()


# --------------------------------------------------------------------------- launch.sh options


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PTFT_", "OMPI_"))}
    env.update(PTFT_PYTHON=sys.executable, PTFT_NUM_GPUS="0")
    return subprocess.run([str(ROOT / "launch.sh"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _launch_refused(*args: str) -> str:
    proc = _launch(*args, "--dry-run", "--", "ptft", "pretrain")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("launch.sh: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.splitlines()[0] == errors[0]
    return errors[0]


def test_launch_refuses_zero_processes_nodes_and_tasks():
    for mode, opt in [("torchrun", "--nproc"), ("torchrun", "--nproc_per_node"), ("deepspeed", "--num_gpus"),
                      ("deepspeed", "--num_nodes"), ("accelerate", "--num_processes"), ("accelerate", "--num_machines"),
                      ("mpirun", "-np")]:
        err = _launch_refused(mode, opt, "0")
        assert f"--{opt.lstrip('-').replace('_', '-')} must be at least 1, got 0" in err, err


def test_launch_refuses_a_port_outside_1_to_65535():
    assert "--master-port must be a port number (1-65535), got 70000" in _launch_refused(
        "torchrun", "--nnodes", "2", "--master_addr", "h", "--master_port", "70000")
    assert "--main-process-port must be a port number (1-65535), got 0" in _launch_refused(
        "accelerate", "--main_process_port", "0")


def test_launch_refuses_an_option_given_twice():
    err = _launch_refused("torchrun", "--nproc", "2", "--nproc", "4")
    assert "option --nproc given twice ('2', then '4')" in err


def test_launch_refuses_a_rank_beyond_the_node_count():
    err = _launch_refused("torchrun", "--nnodes", "2", "--node_rank", "2", "--rdzv_endpoint", "h:29500")
    assert "--node-rank 2 is not below --nnodes 2" in err
    err = _launch_refused("accelerate", "--num_machines", "2", "--machine_rank", "5")
    assert "--machine-rank 5 is not below --num-machines 2" in err


def test_launch_refuses_an_unknown_precision_and_a_missing_accelerate_config(tmp_path):
    assert "--mixed-precision must be no, fp16 or bf16 (got 'fp8')" in _launch_refused(
        "accelerate", "--mixed_precision", "fp8")
    assert f"--config-file {tmp_path / 'nope.yaml'} does not exist" in _launch_refused(
        "accelerate", "--config_file", str(tmp_path / "nope.yaml"))
