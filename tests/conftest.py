"""Fixtures shared by several test files: one real SLURM cluster per test session (started on first use)."""

import os
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401 - a fixture, found by name


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_shm_segments():
    """Safety net for runs killed inside DeepSpeed's init (the engine unlinks its own segment,
    ``release_shm_names``): drop this user's DeepSpeed /dev/shm segments made during the session,
    so a long suite cannot fill the RAM-backed /dev/shm."""
    start = time.time()
    yield
    for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if seg.stat().st_mtime >= start - 1:
                seg.unlink()
        except FileNotFoundError:
            pass
