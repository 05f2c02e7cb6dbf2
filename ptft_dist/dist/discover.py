"""Who am I: rank, world size, local rank and master, whatever started this process.

One place reads the launchers' variables, checks the layout before anything connects, and brings
up ``torch.distributed`` with a preflight that turns silent hangs into one-line errors:

    env = discover()             # torchrun / deepspeed / accelerate, OpenMPI (mpi4py), SLURM srun, or one process
    init_distributed(env)        # exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, preflight, init, topology
    device = device_for(env)     # cuda:<local rank> or cpu

Discovery order (first match wins):

1. launcher variables ``RANK`` + ``WORLD_SIZE`` (+ ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``/``LOCAL_SIZE``,
   ``MASTER_ADDR``, ``MASTER_PORT``): torchrun and accelerate (``launcher="torchrun"``), the
   deepspeed launcher (``"deepspeed"``, recognised by its ``CROSS_RANK``). Beside SLURM/MPI
   variables they count only with a launcher's own marker (e.g. ``TORCHELASTIC_RUN_ID``: torchrun
   inside srun); otherwise they must agree with SLURM/MPI, since stale ones inherited from the
   shell that ran sbatch would make every task "rank 0 of 1";
2. OpenMPI ``OMPI_COMM_WORLD_*`` (``"mpi"``). Checked before SLURM on purpose: ``mpirun`` inside an
   allocation starts its daemons with ``srun``, so the ranks inherit ``SLURM_*`` variables that
   describe the daemon step, not the ranks. With mpi4py the hosts are gathered and rank 0
   broadcasts the master address and a free port; without it only one host is supported (unless
   ``MASTER_ADDR`` is set);
3. SLURM inside an ``srun`` step (``SLURM_STEP_ID`` set: a batch script's own environment is not a
   step and describes no ranks) (``"slurm"``): ``SLURM_PROCID``, ``SLURM_LOCALID``,
   ``SLURM_NODEID``, the step's tasks and task-per-node counts, the node list expanded with
   ``scontrol show hostnames``; master = first node (its ``NodeAddr`` from ``scontrol show node``
   when the name does not resolve), port = ``15000 + SLURM_JOB_ID % 15000``;
4. MPICH/Intel MPI ``PMI_RANK``/``PMI_SIZE`` (``"mpi"``);
5. otherwise one process (``"single"``).

``PTFT_MASTER_ADDR`` / ``PTFT_MASTER_PORT`` override the address and port wherever this module
chooses them (SLURM, MPI, single); under torchrun/deepspeed the launcher's own ``MASTER_*`` win,
since the launcher already uses them.

Command line: ``python -m ptft_dist.dist --selftest`` (every rank prints one JSON line with the
all-reduced sum of rank+1), ``--discover`` (print this rank's ``DistEnv``, no connection),
``--write-deepspeed-env [PATH]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ptft_dist.errors import UserError

LAUNCHERS = ("single", "torchrun", "deepspeed", "slurm", "mpi")
# Variables only a launcher that sets RANK/WORLD_SIZE itself leaves (torchrun/accelerate, deepspeed,
# export_env() in a parent process): without one, RANK/WORLD_SIZE beside SLURM or MPI variables are stale.
_LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "CROSS_RANK", "PTFT_LAUNCHER")

# Ports this module derives (SLURM, MPI without mpi4py) lie in [BASE, BASE + SPAN): below Linux's
# ephemeral range (32768+), so a derived port never collides with an outgoing connection.
DERIVED_PORT_BASE = 15000
DERIVED_PORT_SPAN = 15000
DEFAULT_MASTER_PORT = 29500

# What multi-node deepspeed (pdsh/openmpi/slurm runners) must forward to every rank.
DEEPSPEED_ENV_NAMES = (
    "PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
)
DEEPSPEED_ENV_PREFIXES = ("HF_", "NCCL_", "GLOO_", "TORCH_", "PTFT_")
# Never forwarded: each host has its own devices, and a launcher sets the rank variables itself.
DEEPSPEED_ENV_NEVER = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PTFT_LAUNCHER",
    }
)
# pdsh puts each value inside "..." in a remote shell: these characters would be expanded there.
DEEPSPEED_ENV_MARKER = "PTFT_DEEPSPEED_ENV_GENERATED"  # marks a .deepspeed_env this module wrote
DEEPSPEED_ENV_USER_KEYS = "PTFT_DEEPSPEED_ENV_USER_KEYS"  # ... and which of its values came from a hand-written file
_UNSAFE_ENV_VALUE = re.compile(r'["`$\\\n\r]')

_LOG_PREFIX = "ptft dist:"


class DistError(UserError, RuntimeError):
    """The distributed setup cannot work; the message says why and what to change."""


class LayoutError(DistError):
    """The launcher's variables describe an impossible or inconsistent layout (found before any connection)."""


class PreflightError(DistError):
    """A rank cannot reach the master, the master port is taken, or ranks did not join in time."""


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


# --------------------------------------------------------------------------- discovery helpers


def _get(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return None


def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = environ.get(name)
        if value is None or value.strip() == "":
            continue
        try:
            return int(value.strip())
        except ValueError:
            raise LayoutError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def _need_int(environ: Mapping[str, str], *names: str) -> int:
    value = _int(environ, *names)
    if value is None:
        raise LayoutError(f"environment variable {' or '.join(names)} is not set")
    return value


def _hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def _port(value: str, source: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise LayoutError(f"{source}={value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise LayoutError(f"{source}={port} is not a port number (1-65535)")
    return port


def free_port(host: str = "") -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def derived_port(key: int | str) -> int:
    """A port every rank computes alike from a job id: ``BASE + key % SPAN`` (strings are crc32'd)."""
    if isinstance(key, str):
        key = int(key) if key.isdigit() else zlib.crc32(key.encode())
    return DERIVED_PORT_BASE + int(key) % DERIVED_PORT_SPAN


def expand_hostlist(spec: str) -> list[str]:
    """SLURM host list syntax -> names: ``n[1-3,7],gpu[01-02]-a`` -> n1 n2 n3 n7 gpu01-a gpu02-a."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    out: list[str] = []
    for item in (s.strip() for s in items):
        if item:
            out.extend(_expand_one(item))
    return out


def _expand_one(item: str) -> list[str]:
    lb = item.find("[")
    if lb < 0:
        return [item]
    rb = item.find("]", lb)
    if rb < 0:
        raise LayoutError(f"malformed SLURM host list entry {item!r}")
    head, body, tail = item[:lb], item[lb + 1 : rb], item[rb + 1 :]
    values: list[str] = []
    for part in body.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise LayoutError(f"malformed SLURM host list range {part!r} in {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return [head + v + rest for v in values for rest in _expand_one(tail)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` syntax -> per node counts: ``2(x3),1`` -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LayoutError(f"malformed SLURM tasks-per-node value {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _scontrol(args: Sequence[str], environ: Mapping[str, str]) -> str | None:
    exe = shutil.which("scontrol", path=environ.get("PATH", os.defpath))
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=10, env=dict(environ), stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_hostnames(nodelist: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Expand a SLURM node list with ``scontrol show hostnames`` (the authority), else in Python."""
    environ = os.environ if environ is None else environ
    out = _scontrol(["show", "hostnames", nodelist], environ)
    if out is not None:
        names = out.split()
        if names:
            return names
    return expand_hostlist(nodelist)


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        return True
    except (socket.gaierror, UnicodeError, OSError):
        return False


def slurm_node_address(name: str, environ: Mapping[str, str] | None = None) -> str:
    """How other nodes reach node ``name``: the name when it resolves, else its SLURM ``NodeAddr``."""
    environ = os.environ if environ is None else environ
    if _resolves(name):
        return name
    out = _scontrol(["show", "node", "-o", name], environ)
    if out:
        m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
        if m and m.group(1) not in ("(null)", ""):
            return m.group(1)
    return name


def _slurm_gpus_per_node(environ: Mapping[str, str]) -> int | None:
    value = _get(environ, "SLURM_GPUS_ON_NODE")
    if value is None:
        spec = _get(environ, "SLURM_GPUS_PER_NODE")
        if spec is None:
            return None
        value = spec.split(",")[0].split(":")[-1]
        value = re.sub(r"\(.*\)$", "", value)
    try:
        return int(value)
    except ValueError:
        return None


def _primary_address() -> str:
    """An address of this host that other hosts can use (not loopback when there is another)."""
    name = socket.gethostname()
    with contextlib.suppress(OSError, UnicodeError):
        for info in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM):
            addr = info[4][0]
            if not addr.startswith("127."):
                return addr
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
        v4 = [a for a in out if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", a)]
        if v4 or out:
            return (v4 or out)[0]
    return name


# --------------------------------------------------------------------------- discovery


def _from_launcher_vars(environ: Mapping[str, str]) -> DistEnv:
    rank = _need_int(environ, "RANK")
    world = _need_int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", default=0)
    is_torchrun = "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ
    launcher = "deepspeed" if ("CROSS_RANK" in environ and not is_torchrun) else "torchrun"
    if environ.get("PTFT_LAUNCHER") in LAUNCHERS:  # exported by export_env() in a parent process
        launcher = environ["PTFT_LAUNCHER"]
    num_nodes = _int(environ, "GROUP_WORLD_SIZE", "CROSS_SIZE", "NNODES")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    if local_world is None:
        local_world = world // num_nodes if num_nodes else world
    if num_nodes is None:
        num_nodes = max(1, -(-world // max(local_world, 1)))
    node_rank = _int(environ, "GROUP_RANK", "CROSS_RANK", "NODE_RANK", default=0)
    addr = _get(environ, "MASTER_ADDR")
    if addr is None:
        if num_nodes > 1:
            raise LayoutError(f"RANK/WORLD_SIZE are set for {num_nodes} nodes but MASTER_ADDR is not")
        addr = "127.0.0.1"
    port_value = _get(environ, "MASTER_PORT")
    port = _port(port_value, "MASTER_PORT") if port_value else DEFAULT_MASTER_PORT
    host = _hostname()
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        launcher=launcher,
        hosts=(host,) if num_nodes == 1 else (),
        num_nodes=num_nodes,
        host=host,
        port_source="MASTER_PORT" if port_value else "default",
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", default=0),
    )


def _chosen_addr_port(environ: Mapping[str, str]) -> tuple[str | None, int | None, str]:
    """PTFT_MASTER_* beat MASTER_*; returns (addr or None, port or None, port source)."""
    addr = _get(environ, "PTFT_MASTER_ADDR", "MASTER_ADDR")
    for name in ("PTFT_MASTER_PORT", "MASTER_PORT"):
        value = _get(environ, name)
        if value is not None:
            return addr, _port(value, name), name
    return addr, None, ""


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _need_int(environ, "SLURM_PROCID")
    world = _need_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _need_int(environ, "SLURM_LOCALID")
    node_rank = _need_int(environ, "SLURM_NODEID")
    num_nodes = _need_int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    tpn_spec = _get(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_spec is None:
        raise LayoutError("SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE is not set")
    tasks = expand_tasks_per_node(tpn_spec)
    where = f"SLURM step (SLURM_STEP_NUM_TASKS={world}, SLURM_STEP_NUM_NODES={num_nodes}, tasks per node {tpn_spec})"
    if len(tasks) != num_nodes:
        raise LayoutError(f"inconsistent {where}: {len(tasks)} per-node counts for {num_nodes} nodes")
    if sum(tasks) != world:
        raise LayoutError(f"inconsistent {where}: per-node counts add up to {sum(tasks)}, not {world}")
    if not 0 <= node_rank < num_nodes:
        raise LayoutError(f"inconsistent {where}: SLURM_NODEID={node_rank} is not below {num_nodes}")
    local_world = tasks[node_rank]
    check = environ.get("PTFT_LAYOUT_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")
    if check:
        ntpn = _int(environ, "SLURM_NTASKS_PER_NODE")
        if ntpn is not None and ntpn * num_nodes != world:
            raise LayoutError(
                f"inconsistent SLURM layout: {world} tasks != {num_nodes} nodes x {ntpn} tasks per node "
                f"(SLURM_NTASKS_PER_NODE={ntpn}); srun's -n/-N contradict the allocation: drop them, or make "
                "them agree (PTFT_LAYOUT_CHECK=0 to allow it)"
            )
        if len(set(tasks)) > 1:
            raise LayoutError(
                f"uneven SLURM layout: {where} puts a different number of ranks on each node; "
                "use the same --ntasks-per-node everywhere (or PTFT_LAYOUT_CHECK=0 to allow it)"
            )
        gpus = _slurm_gpus_per_node(environ)
        per_task = _int(environ, "SLURM_GPUS_PER_TASK")
        if gpus and not per_task and local_world != gpus:
            raise LayoutError(
                f"inconsistent SLURM layout: {local_world} task(s) on node {node_rank} but {gpus} GPU(s) per node: "
                f"expected {num_nodes} nodes x {gpus} tasks per node = {num_nodes * gpus} tasks, got {world} "
                f"(use srun --ntasks-per-node={gpus}, or PTFT_LAYOUT_CHECK=0 to allow it)"
            )
    nodelist = _get(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = tuple(slurm_hostnames(nodelist, environ)) if nodelist else ()
    if hosts and len(hosts) != num_nodes:
        raise LayoutError(f"inconsistent {where}: node list {nodelist!r} names {len(hosts)} nodes")
    addr, port, source = _chosen_addr_port(environ)
    if addr is None:
        if not hosts:
            raise LayoutError("SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is not set: cannot tell the master node")
        addr = slurm_node_address(hosts[0], environ)
    if port is None:
        job_id = _need_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        port, source = derived_port(job_id), f"SLURM_JOB_ID={job_id}"
    host = _get(environ, "SLURMD_NODENAME") or (hosts[node_rank] if node_rank < len(hosts) else _hostname())
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        launcher="slurm",
        hosts=hosts,
        num_nodes=num_nodes,
        host=host,
        port_source=source,
    )


_MPI_CACHE: dict[tuple, DistEnv] = {}


def _from_mpi(environ: Mapping[str, str], rank_vars: tuple[str, str, str, str]) -> DistEnv:
    rank_v, size_v, lrank_v, lsize_v = rank_vars
    rank = _need_int(environ, rank_v)
    world = _need_int(environ, size_v)
    local_rank = _int(environ, lrank_v)
    local_world = _int(environ, lsize_v)
    addr, port, source = _chosen_addr_port(environ)
    host = _hostname()
    use_mpi4py = environ.get("PTFT_MPI4PY", "1").strip().lower() not in ("0", "false", "no", "off")
    key = (rank, world, addr, port)
    if use_mpi4py and environ is os.environ and key in _MPI_CACHE:
        return _MPI_CACHE[key]
    mpi = None
    if use_mpi4py:
        try:
            from mpi4py import MPI

            mpi = MPI
        except ImportError:
            mpi = None
    if mpi is not None:
        comm = mpi.COMM_WORLD
        if comm.Get_size() != world or comm.Get_rank() != rank:
            raise LayoutError(
                f"{rank_v}={rank}/{size_v}={world} disagree with MPI_COMM_WORLD "
                f"(rank {comm.Get_rank()} of {comm.Get_size()})"
            )
        names = comm.allgather(host)
        hosts = tuple(dict.fromkeys(names))
        node_rank = hosts.index(host)
        if local_rank is None or local_world is None:
            same = [r for r, n in enumerate(names) if n == host]
            local_rank, local_world = same.index(rank), len(same)
        chosen = None
        if rank == 0:
            m_addr = addr or ("127.0.0.1" if len(hosts) == 1 else _primary_address())
            if port is None:
                chosen = (m_addr, free_port(), "free port picked by rank 0")
            else:
                chosen = (m_addr, port, source)
        addr, port, source = comm.bcast(chosen, root=0)
    else:
        if local_rank is None or local_world is None:
            raise LayoutError(f"{lrank_v}/{lsize_v} are not set and mpi4py is not installed (pip install mpi4py)")
        single_host = local_world == world
        if addr is None:
            if not single_host:
                raise LayoutError(
                    f"{world} MPI ranks on several hosts: install mpi4py (pip install mpi4py) so rank 0 can "
                    "broadcast the master address, or set MASTER_ADDR/MASTER_PORT"
                )
            addr = "127.0.0.1"
        if port is None:
            job = _get(environ, "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE", "PMI_JOBID")
            if job is None:
                raise LayoutError("cannot derive a master port shared by all MPI ranks: set MASTER_PORT")
            port, source = derived_port(job), "MPI job id"
        hosts = (host,) if single_host else ()
        node_rank = rank // local_world if local_world else 0
    env = DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        launcher="mpi",
        hosts=hosts,
        num_nodes=max(len(hosts), 1) if hosts else max(1, -(-world // max(local_world, 1))),
        host=host,
        port_source=source,
    )
    if mpi is not None and environ is os.environ:
        _MPI_CACHE[key] = env
    return env


def _single(environ: Mapping[str, str]) -> DistEnv:
    addr, port, source = _chosen_addr_port(environ)
    if port is None:
        port, source = free_port(), "free port"
    host = _hostname()
    return DistEnv(master_addr=addr or "127.0.0.1", master_port=port, hosts=(host,), host=host, port_source=source)


_OMPI_VARS = (
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)
_PMI_VARS = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def _rank_assigner(environ: Mapping[str, str]) -> Callable[[], DistEnv] | None:
    """The discovery for OpenMPI, a SLURM step or MPICH when their variables are present (not yet run:
    MPI discovery talks to the other ranks)."""
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return partial(_from_mpi, environ, _OMPI_VARS)
    if ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ) and "SLURM_PROCID" in environ:
        return partial(_from_slurm, environ)
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        return partial(_from_mpi, environ, _PMI_VARS)
    return None


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place in the job, from whichever launcher started it (see the module doc).

    Raises ``LayoutError`` for impossible or inconsistent layouts, before anything connects.
    ``environ`` defaults to ``os.environ`` (pass a dict in tests).
    """
    environ = os.environ if environ is None else environ
    other = _rank_assigner(environ)  # SLURM or MPI, when they describe this process
    generic = "RANK" in environ and "WORLD_SIZE" in environ
    if generic and (other is None or any(k in environ for k in _LAUNCHER_MARKERS)):
        env = _from_launcher_vars(environ)
    elif other is not None:
        env = other()
        if generic:
            # RANK/WORLD_SIZE without a launcher that sets them: inherited from the submitting shell?
            stale = (_int(environ, "RANK"), _int(environ, "WORLD_SIZE"))
            if stale != (env.rank, env.world_size):
                raise LayoutError(
                    f"RANK={stale[0]} WORLD_SIZE={stale[1]} in the environment contradict the {env.launcher} "
                    f"launcher (rank {env.rank} of {env.world_size}); they were probably inherited from the shell "
                    "that started the job: unset RANK WORLD_SIZE LOCAL_RANK"
                )
    else:
        env = _single(environ)
    check_layout(env)
    return env


def check_layout(env: DistEnv) -> None:
    """Raise ``LayoutError`` when ``env`` cannot describe a real job."""
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


# --------------------------------------------------------------------------- devices and init


def device_for(env: DistEnv):
    """``cuda:<local rank>`` when CUDA is available (``cuda:0`` when each rank sees one GPU), else cpu."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if env.local_rank < n:
        return torch.device("cuda", env.local_rank)
    if n == 1:  # one GPU per rank via CUDA_VISIBLE_DEVICES / --gpus-per-task
        return torch.device("cuda", 0)
    raise LayoutError(
        f"rank {env.rank} is local rank {env.local_rank} of {env.local_world_size} on host {env.host}, "
        f"but only {n} GPUs are visible there: launch at most one rank per GPU"
    )


def export_env(env: DistEnv) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/NODE_RANK/MASTER_ADDR/MASTER_PORT in ``os.environ``
    (and PTFT_LAUNCHER, so a child process that calls ``discover()`` trusts them)."""
    os.environ.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "NODE_RANK": str(env.node_rank),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
            "PTFT_LAUNCHER": env.launcher,
        }
    )


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def _ranges(ranks: Sequence[int], limit: int = 40) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (at most ``limit`` pieces)."""
    pieces: list[str] = []
    ranks = sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        pieces.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    if len(pieces) > limit:
        pieces = pieces[:limit] + [f"... ({len(ranks)} ranks)"]
    return ", ".join(pieces)


def _who(env: DistEnv) -> str:
    return f"rank {env.rank} on host {env.host or _hostname()}"


def _port_hint(env: DistEnv) -> str:
    if env.port_source.startswith("SLURM_JOB_ID"):
        return f"it was derived from {env.port_source}: set PTFT_MASTER_PORT to a free port"
    if env.launcher == "deepspeed":
        return "pass another --master_port to the deepspeed launcher (or set PTFT_MASTER_PORT with launch.sh)"
    if env.launcher == "torchrun":
        return "pass another --master_port / --rdzv_endpoint to the launcher"
    return f"it came from {env.port_source or 'the default'}: set PTFT_MASTER_PORT to a free port"


def _listen_socket(env: DistEnv) -> socket.socket:
    """Rank 0 binds the master port itself (a clear error when taken); TCPStore then serves on it."""
    families = [socket.AF_INET6, socket.AF_INET] if socket.has_ipv6 else [socket.AF_INET]
    last: OSError | None = None
    for family in families:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::" if family == socket.AF_INET6 else "", env.master_port))
            sock.listen(max(128, env.world_size))
            return sock
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno == errno.EADDRINUSE:
                break
    if last is not None and last.errno == errno.EADDRINUSE:
        raise PreflightError(
            f"master port {env.master_port} is already in use on host {env.host or _hostname()} "
            f"(rank 0, master {env.master_addr}:{env.master_port}); {_port_hint(env)}"
        )
    raise PreflightError(f"rank 0 cannot listen on master port {env.master_port}: {last}")


def _wait_reachable(env: DistEnv, timeout_s: float) -> None:
    """Poll a TCP connect to the master until it answers; a clear error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay, last = 0.05, "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=max(0.2, min(2.0, remaining))):
                return
        except OSError as exc:
            last = exc.strerror or str(exc) or type(exc).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PreflightError(
                f"{_who(env)} cannot reach master {env.master_addr}:{env.master_port} within {timeout_s:g} s "
                f"(last error: {last}); is rank 0 running, is the address right "
                f"({env.launcher} launcher, port from {env.port_source or 'default'}), and is the port open?"
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.5)


_KEEP: list[Any] = []  # stores and sockets that must live as long as the process group


def preflight(env: DistEnv, timeout_s: float = 60):
    """Make sure every rank reaches the master before ``init_process_group`` (which would hang silently).

    Rank 0 binds the master port (error naming the port when taken) and serves a TCPStore on it;
    every other rank first polls a TCP connect (error naming host:port after ``timeout_s``). Each
    rank then registers under ``ptft/join`` and waits until all ``world_size`` ranks have; after
    ``timeout_s`` the error names the ranks that did not join. Under torchrun the agent already
    serves the store, so rank 0 connects like the others.

    Returns the store (a ``PrefixStore``) to hand to ``init_process_group(store=...)``, or ``None``
    for a single process.
    """
    if env.world_size == 1:
        return None
    import torch.distributed as tdist

    check_layout(env)
    start = time.monotonic()
    td = datetime.timedelta(seconds=max(timeout_s, 1.0))
    if env.rank == 0 and not env.agent_store:
        sock = _listen_socket(env)
        try:
            store = tdist.TCPStore(
                env.master_addr,
                env.master_port,
                env.world_size,
                is_master=True,
                timeout=td,
                wait_for_workers=False,
                master_listen_fd=sock.fileno(),
            )
        except Exception as exc:
            sock.close()
            raise PreflightError(f"rank 0 cannot serve the rendezvous on port {env.master_port}: {exc}") from exc
        sock.detach()  # the store owns (and closes) the listening socket now
        keep: list[Any] = [store]
    else:
        _wait_reachable(env, timeout_s)
        remaining = max(1.0, timeout_s - (time.monotonic() - start))
        try:
            store = tdist.TCPStore(
                env.master_addr,
                env.master_port,
                env.world_size,
                is_master=False,
                timeout=datetime.timedelta(seconds=remaining),
                wait_for_workers=False,
            )
        except Exception as exc:
            raise PreflightError(
                f"{_who(env)} reached {env.master_addr}:{env.master_port} but could not join its store: {exc}"
            ) from exc
        keep = [store]
    prefix = tdist.PrefixStore(f"ptft/{env.restart_count}", store)
    info = {"host": env.host or _hostname(), "local_rank": env.local_rank}
    serving = env.rank == 0 and not env.agent_store
    try:
        prefix.set(f"join/{env.rank}", json.dumps(info))
        joined = prefix.add("joined", 1)
        delay = 0.02
        while joined < env.world_size:
            if joined < 0:  # rank 0 gave up and left its reason
                reason = prefix.get("abort").decode(errors="replace")
                raise PreflightError(f"{_who(env)}: rank 0 reports: {reason}")
            if time.monotonic() - start > timeout_s:
                missing = [r for r in range(env.world_size) if not prefix.check([f"join/{r}"])]
                reason = (
                    f"only {env.world_size - len(missing)} of {env.world_size} ranks joined master "
                    f"{env.master_addr}:{env.master_port} within {timeout_s:g} s; missing ranks: {_ranges(missing)}"
                )
                if serving:  # tell the waiting ranks why, and give them a moment to read it
                    prefix.set("abort", reason)
                    prefix.add("joined", -(2**40))
                    time.sleep(1.0)
                raise PreflightError(f"{_who(env)}: {reason}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
            joined = prefix.add("joined", 0)
    except PreflightError:
        raise
    except Exception as exc:  # the master went away mid-rendezvous
        raise PreflightError(
            f"{_who(env)} lost the master {env.master_addr}:{env.master_port} during the rendezvous "
            f"(did rank 0 fail or stop?): {exc}"
        ) from exc
    _KEEP.extend(keep)
    return prefix


def gather_topology(env: DistEnv) -> list[dict[str, Any]]:
    """After init: (rank, host, local_rank, device) of every rank, in rank order (an all_gather)."""
    import torch.distributed as tdist

    mine = {
        "rank": env.rank,
        "host": env.host or _hostname(),
        "local_rank": env.local_rank,
        "device": str(device_for(env)),
    }
    if env.world_size == 1 or not tdist.is_initialized():
        return [mine]
    out: list[Any] = [None] * env.world_size
    tdist.all_gather_object(out, mine)
    return out


def format_topology(topology: Sequence[Mapping[str, Any]], env: DistEnv, backend: str) -> str:
    """One line: ``ptft dist: 4 ranks on 2 hosts (n1: 0-1 cpu,cpu | n2: 2-3 cpu,cpu), backend gloo, ...``."""
    by_host: dict[str, list[Mapping[str, Any]]] = {}
    for t in topology:
        by_host.setdefault(str(t["host"]), []).append(t)
    parts = []
    for host, items in by_host.items():
        devices = sorted({str(t["device"]) for t in items})
        label = "rank" if len(items) == 1 else "ranks"
        parts.append(f"{host}: {label} {_ranges([int(t['rank']) for t in items])} on {','.join(devices)}")
    return (
        f"{_LOG_PREFIX} {len(topology)} ranks on {len(by_host)} host(s) ({' | '.join(parts)}), backend {backend}, "
        f"master {env.master_addr}:{env.master_port}, launcher {env.launcher}"
    )


def init_distributed(
    env: DistEnv,
    backend: str | None = None,
    timeout_s: float = 60,
    *,
    pg_timeout_s: float = 1800,
    announce: bool = True,
) -> None:
    """Export the rank variables, preflight, ``init_process_group``, print the topology (rank 0).

    ``timeout_s`` bounds the preflight (reaching the master, all ranks joining);
    ``pg_timeout_s`` is the process group's collective timeout. ``backend`` defaults to nccl when
    CUDA is available, else gloo. With one process nothing connects (no process group is made):
    the variables are exported so a later ``deepspeed.initialize`` can make its own 1-rank group.
    Idempotent: returns at once when a process group already exists.
    """
    import torch
    import torch.distributed as tdist

    check_layout(env)
    export_env(env)
    if env.world_size == 1 or tdist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(device_for(env))
    store = preflight(env, timeout_s)
    store.set_timeout(datetime.timedelta(seconds=max(pg_timeout_s, timeout_s)))
    tdist.init_process_group(
        backend=backend,
        store=tdist.PrefixStore("pg", store),
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=max(pg_timeout_s, timeout_s)),
    )
    topology = gather_topology(env)
    if announce and env.rank == 0:
        print(format_topology(topology, env, backend), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- .deepspeed_env


def _venv_bin() -> str | None:
    venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
    return str(Path(venv) / "bin") if venv else None


def _prepend_path(value: str, first: str) -> str:
    parts = [p for p in value.split(os.pathsep) if p and p != first]
    return os.pathsep.join([first, *parts])


def deepspeed_env(extra: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables multi-node deepspeed must forward (allow-list), with the venv first on PATH and
    this repository first on PYTHONPATH."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, value in environ.items():
        if key in DEEPSPEED_ENV_NEVER:
            continue
        if key in DEEPSPEED_ENV_NAMES or key.startswith(DEEPSPEED_ENV_PREFIXES):
            out[key] = value
    venv_bin = _venv_bin()
    if venv_bin:
        out["PATH"] = _prepend_path(out.get("PATH", os.defpath), venv_bin)
        out.setdefault("VIRTUAL_ENV", str(Path(venv_bin).parent))
    repo = str(Path(__file__).resolve().parents[2])
    out["PYTHONPATH"] = _prepend_path(out.get("PYTHONPATH", ""), repo)
    out.update(extra or {})
    return out


def write_deepspeed_env(
    path: str | os.PathLike = ".deepspeed_env", extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Write ``KEY=VALUE`` lines (DeepSpeed's ``.deepspeed_env`` format) atomically; returns what was written.

    Values a remote shell would mangle (quotes, ``$``, backslashes, newlines) are left out with a
    warning on stderr: DeepSpeed's pdsh runner pastes them into ``export K="V"``. A file already at
    ``path`` that this function did not write (no ``PTFT_DEEPSPEED_ENV_GENERATED=1`` line) was
    written by hand: its values are kept and win over the environment, now and on every later
    rewrite (their names are listed in ``PTFT_DEEPSPEED_ENV_USER_KEYS``); the rest is regenerated.
    """
    path = Path(path)
    user: dict[str, str] = {}
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines() if "=" in ln]
        existing = dict(ln.split("=", 1) for ln in lines)
        if existing.get(DEEPSPEED_ENV_MARKER) == "1":
            user_keys = [k for k in existing.get(DEEPSPEED_ENV_USER_KEYS, "").split(",") if k]
        else:  # written by hand: every value in it is the user's
            user_keys = [k for k in existing if k not in (DEEPSPEED_ENV_MARKER, DEEPSPEED_ENV_USER_KEYS)]
            print(f"{_LOG_PREFIX} keeping the {len(user_keys)} variables already in {path}", file=sys.stderr)
        user = {k: existing[k] for k in user_keys if k in existing}
    values = deepspeed_env({**user, **(extra or {})})
    values[DEEPSPEED_ENV_MARKER] = "1"
    values.pop(DEEPSPEED_ENV_USER_KEYS, None)
    if user:
        values[DEEPSPEED_ENV_USER_KEYS] = ",".join(sorted(user))
    good: dict[str, str] = {}
    for key in sorted(values):
        value = values[key]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or _UNSAFE_ENV_VALUE.search(value):
            print(
                f"{_LOG_PREFIX} warning: not forwarding {key} (its value cannot pass a remote shell)", file=sys.stderr
            )
            continue
        good[key] = value.strip()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in good.items()))
    os.replace(tmp, path)
    return good


# --------------------------------------------------------------------------- command line


def _selftest(args: argparse.Namespace) -> int:
    env = discover()
    init_distributed(env, backend=args.backend, timeout_s=args.timeout)
    import torch
    import torch.distributed as tdist

    backend = tdist.get_backend() if tdist.is_initialized() else "none"
    device = device_for(env) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(env.rank + 1)], device=device)
    if tdist.is_initialized():
        tdist.all_reduce(t)
    result = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "node_rank": env.node_rank,
        "sum": int(t.item()),
        "host": env.host,
        "backend": backend,
        "launcher": env.launcher,
        "master": f"{env.master_addr}:{env.master_port}",
    }
    if args.echo is not None:
        result["echo"] = args.echo
    sys.stdout.write(json.dumps(result) + "\n")  # one write: ranks sharing a pipe do not interleave within it
    sys.stdout.flush()
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    return 0


def _exec(argv: list[str]) -> int:
    """``--exec-b64``: run ``[-m MODULE | SCRIPT.py | EXECUTABLE] ARGS`` from base64(JSON), so any
    argument survives launchers that pass arguments through a remote shell (pdsh) or cannot run
    ``-m`` (deepspeed's slurm runner)."""
    import runpy

    here = str(Path(__file__).resolve().parent)
    if sys.path and os.path.realpath(sys.path[0] or ".") == here:
        sys.path.pop(0)  # run as a file: ptft_dist/dist/ itself must not shadow top-level modules
    repo = str(Path(here).parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    if argv[:1] == ["-m"] and len(argv) >= 2:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    if argv and argv[0].endswith(".py"):
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    if not argv:
        raise SystemExit("ptft dist: --exec-b64: empty command")
    os.execvp(argv[0], argv)
    return 127  # not reached


def encode_argv(argv: Sequence[str]) -> str:
    """The ``--exec-b64`` payload for ``argv``."""
    return base64.urlsafe_b64encode(json.dumps(list(argv)).encode()).decode()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--exec-b64"]:
        if len(argv) != 2:
            print("ptft dist: --exec-b64 takes exactly one argument", file=sys.stderr)
            return 2
        return _exec(json.loads(base64.urlsafe_b64decode(argv[1].encode())))
    p = argparse.ArgumentParser(
        prog="python -m ptft_dist.dist", description="Distributed setup: who am I, and does it work?"
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--selftest",
        action="store_true",
        help="init the process group, all_reduce rank+1, print one JSON line per rank",
    )
    mode.add_argument("--discover", action="store_true", help="print this rank's DistEnv as JSON (no connection)")
    mode.add_argument("--hostnames", metavar="NODELIST", help="expand a SLURM node list, one name a line")
    mode.add_argument(
        "--write-deepspeed-env",
        nargs="?",
        const=".deepspeed_env",
        metavar="PATH",
        help="write the variables multi-node deepspeed forwards (default .deepspeed_env)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra variable for --write-deepspeed-env"
    )
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    p.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("PTFT_INIT_TIMEOUT", "60")),
        help="preflight timeout in seconds (default $PTFT_INIT_TIMEOUT or 60)",
    )
    p.add_argument(
        "--echo", default=None, metavar="TEXT", help="--selftest: copy TEXT into the JSON (argument quoting check)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.selftest:
            return _selftest(args)
        if args.hostnames is not None:
            names = slurm_hostnames(args.hostnames)
            if not names:
                raise LayoutError(f"empty SLURM node list {args.hostnames!r}")
            print("\n".join(names))
            return 0
        if args.discover:
            print(json.dumps(discover().to_dict()), flush=True)
            return 0
        extra = {}
        for item in args.set:
            if "=" not in item:
                p.error(f"--set {item!r}: expected KEY=VALUE")
            k, v = item.split("=", 1)
            extra[k] = v
        written = write_deepspeed_env(args.write_deepspeed_env, extra)
        print(f"{_LOG_PREFIX} wrote {len(written)} variables to {args.write_deepspeed_env}", file=sys.stderr)
        return 0
    except DistError as exc:
        print(f"{_LOG_PREFIX} error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
