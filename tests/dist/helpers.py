"""Shared by the tests/dist modules: the variables of a SLURM srun step."""

from __future__ import annotations

import os


def slurm_step(**over: str) -> dict[str, str]:
    """Variables of task 0 of a 2-node, 1-task-per-node srun step (job 1234)."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NODELIST": "nx[1-2]",
        "SLURM_STEP_NODELIST": "nx[1-2]",
        "SLURMD_NODENAME": "nx1",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}
