"""Fixtures shared by several test files: one real SLURM cluster per test session (started on first use)."""

import os
import time
from pathlib import Path

import pytest

from tests.netns_hosts import two_hosts  # noqa: F401 - a fixture, found by name
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - a fixture, found by name
from tests.system import (  # noqa: F401 - hooks, found by name: skips fail the session in CI
    pytest_collectreport,
    pytest_configure,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_shm_segments():
    """Safety net for runs killed inside DeepSpeed's init (the engine unlinks its own segment,
    ``release_shm_names``): drop this user's DeepSpeed /dev/shm segments made during the session,
    so a long suite cannot fill the RAM-backed /dev/shm."""
    start = time.time()
    yield
    in_use = _shm_segments_in_use()  # other test sessions' runs may be initialising right now
    for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if seg.stat().st_mtime >= start - 1 and seg.name not in in_use:
                seg.unlink()
        except FileNotFoundError:
            pass


def _shm_segments_in_use() -> set[str]:
    """Names of /dev/shm DeepSpeed segments some live process holds open or mapped: a run still in
    its init (its peers have not mapped them yet) would hang forever if they were unlinked."""
    names: set[str] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            names.update(Path(os.readlink(fd)).name for fd in (proc / "fd").iterdir()
                         if "deepspeed_allreduce_buffer" in os.readlink(fd))
            names.update(Path(line.split()[-1]).name for line in (proc / "maps").read_text().splitlines()
                         if "deepspeed_allreduce_buffer" in line)
        except OSError:
            continue
    return names
