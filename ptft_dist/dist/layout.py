"""What a job layout is (``DistEnv``), and whether one can be real (``check_layout``).

Below both ``discover.py`` (which builds a ``DistEnv`` from a launcher's variables and checks it
before anything connects) and ``slurm.py`` (whose parsers raise ``LayoutError`` too). The errors:
``DistError`` (base of every distributed-setup error, which ``python -m ptft_dist.dist`` reports
as one line), ``LayoutError`` here, ``PreflightError`` in ``rendezvous.py`` (found while connecting).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ptft_dist.errors import UserError

LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm", "mpi")
DEFAULT_MASTER_PORT = 29500


class DistError(UserError, RuntimeError):
    """The distributed setup cannot work; the message says why and what to change."""


class LayoutError(DistError):
    """The launcher's variables describe an impossible or inconsistent layout (found before any connection)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``launcher`` is one of ``LAUNCHERS``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"
    hosts: tuple[str, ...] = ()
    # Beyond the essentials: how many nodes, this process's host name (the SLURM node name under
    # SLURM), where the port came from (for error messages), and whether a torchrun agent hosts
    # the TCPStore at master_addr:master_port (then rank 0 connects instead of binding).
    num_nodes: int = 1
    host: str = ""
    port_source: str = "default"
    agent_store: bool = False
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hosts"] = list(self.hosts)
        return d


def check_layout(env: DistEnv) -> None:
    """Raise ``LayoutError`` when ``env`` cannot describe a real job: ``discover()`` ends with it, so a
    bad layout is reported before anything tries to connect, and ``preflight()`` repeats it for a
    ``DistEnv`` built by hand."""
    problems = []
    if env.launcher not in LAUNCHERS:
        problems.append(f"unknown launcher {env.launcher!r}")
    if env.world_size < 1:
        problems.append(f"world size {env.world_size} < 1")
    if not 0 <= env.rank < env.world_size:
        problems.append(f"rank {env.rank} is not in [0, {env.world_size})")
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        problems.append(f"local world size {env.local_world_size} is not in [1, {env.world_size}]")
    if not 0 <= env.local_rank < env.local_world_size:
        problems.append(f"local rank {env.local_rank} is not in [0, {env.local_world_size})")
    if env.num_nodes < 1 or not 0 <= env.node_rank < env.num_nodes:
        problems.append(f"node rank {env.node_rank} is not in [0, {env.num_nodes})")
    if env.num_nodes * env.local_world_size < env.world_size and len(set(env.hosts)) == env.num_nodes > 1:
        problems.append(f"{env.num_nodes} nodes x {env.local_world_size} ranks per node < world size {env.world_size}")
    if not 1 <= env.master_port <= 65535:
        problems.append(f"master port {env.master_port} is not in [1, 65535]")
    if not env.master_addr:
        problems.append("no master address")
    if problems:
        raise LayoutError(f"impossible {env.launcher} layout for rank {env.rank}: " + "; ".join(problems))
