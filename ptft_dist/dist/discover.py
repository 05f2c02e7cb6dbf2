"""Who am I: rank, world size, local rank and master, whatever started this process.

Every stage runs unchanged as one process or under any launcher, so one place reads the
launchers' variables, and rejects an impossible layout before anything connects (it would
otherwise hang, or run every task as "rank 0 of 1")::

    env = discover()           # here: torchrun / deepspeed / accelerate, OpenMPI, SLURM srun, or one process
    init_distributed(env)      # rendezvous.py: export the variables, preflight, init_process_group, topology
    device = device_for(env)   # rendezvous.py: cuda:<local rank> or cpu

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

``DistEnv`` and ``check_layout`` live in ``layout.py``; SLURM's host-list syntax and ``scontrol`` in ``slurm.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from ptft_dist.dist.layout import DEFAULT_MASTER_PORT, LAUNCHERS, DistEnv, LayoutError, check_layout
from ptft_dist.dist.slurm import expand_tasks_per_node, slurm_gpus_per_node, slurm_hostnames, slurm_node_address

# Variables only a launcher that sets RANK/WORLD_SIZE itself leaves (torchrun/accelerate, deepspeed,
# export_env() in a parent process): without one, RANK/WORLD_SIZE beside SLURM or MPI variables are stale.
_LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "CROSS_RANK", "PTFT_LAUNCHER")

# Ports this module derives (SLURM, MPI without mpi4py) lie in [BASE, BASE + SPAN): below Linux's
# ephemeral range (32768+), so a derived port never collides with an outgoing connection.
DERIVED_PORT_BASE = 15000
DERIVED_PORT_SPAN = 15000


# --------------------------------------------------------------------------- reading variables


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


def _enabled(environ: Mapping[str, str], name: str) -> bool:
    """An on-by-default switch: off only for 0/false/no/off."""
    return environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def short_hostname() -> str:
    """This host's name without the domain (how SLURM and the topology line name nodes)."""
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


# --------------------------------------------------------------------------- torchrun / deepspeed / accelerate


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
    host = short_hostname()
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


# --------------------------------------------------------------------------- SLURM srun step


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _need_int(environ, "SLURM_PROCID")
    world = _need_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _need_int(environ, "SLURM_LOCALID")
    node_rank = _need_int(environ, "SLURM_NODEID")
    num_nodes = _need_int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    tasks, where = _slurm_tasks_per_node(environ, world, num_nodes, node_rank)
    if _enabled(environ, "PTFT_LAYOUT_CHECK"):
        _check_slurm_layout(environ, tasks, node_rank, where)
    hosts = _slurm_step_hosts(environ, num_nodes, where)
    addr, port, source = _slurm_master(environ, hosts)
    host = _get(environ, "SLURMD_NODENAME") or (hosts[node_rank] if node_rank < len(hosts) else short_hostname())
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=tasks[node_rank],
        node_rank=node_rank,
        master_addr=addr,
        master_port=port,
        launcher="slurm",
        hosts=hosts,
        num_nodes=num_nodes,
        host=host,
        port_source=source,
    )


def _slurm_tasks_per_node(
    environ: Mapping[str, str], world: int, num_nodes: int, node_rank: int
) -> tuple[list[int], str]:
    """The step's per-node task counts, checked against its task and node counts; and a description
    of the step for later messages."""
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
    return tasks, where


def _check_slurm_layout(environ: Mapping[str, str], tasks: list[int], node_rank: int, where: str) -> None:
    """A step that contradicts its allocation (srun -n/-N, uneven nodes, tasks != GPUs) runs, but
    with ranks on the wrong devices or idle GPUs: refuse it unless PTFT_LAYOUT_CHECK=0."""
    world, num_nodes, local_world = sum(tasks), len(tasks), tasks[node_rank]
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
    gpus = slurm_gpus_per_node(environ)
    per_task = _int(environ, "SLURM_GPUS_PER_TASK")
    if gpus and not per_task and local_world != gpus:
        raise LayoutError(
            f"inconsistent SLURM layout: {local_world} task(s) on node {node_rank} but {gpus} GPU(s) per node: "
            f"expected {num_nodes} nodes x {gpus} tasks per node = {num_nodes * gpus} tasks, got {world} "
            f"(use srun --ntasks-per-node={gpus}, or PTFT_LAYOUT_CHECK=0 to allow it)"
        )


def _slurm_step_hosts(environ: Mapping[str, str], num_nodes: int, where: str) -> tuple[str, ...]:
    nodelist = _get(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = tuple(slurm_hostnames(nodelist, environ)) if nodelist else ()
    if hosts and len(hosts) != num_nodes:
        raise LayoutError(f"inconsistent {where}: node list {nodelist!r} names {len(hosts)} nodes")
    return hosts


def _slurm_master(environ: Mapping[str, str], hosts: tuple[str, ...]) -> tuple[str, int, str]:
    """(address, port, port source): the first node's address and a port derived from the job id,
    which every task computes alike without talking to the others."""
    addr, port, source = _chosen_addr_port(environ)
    if addr is None:
        if not hosts:
            raise LayoutError("SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is not set: cannot tell the master node")
        addr = slurm_node_address(hosts[0], environ)
    if port is None:
        job_id = _need_int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        port, source = derived_port(job_id), f"SLURM_JOB_ID={job_id}"
    return addr, port, source


# --------------------------------------------------------------------------- OpenMPI, MPICH / Intel MPI


@dataclass(frozen=True)
class _MpiVars:
    """What one rank's MPI variables say, before it asks the others."""

    names: tuple[str, str, str, str]  # the rank, size, local rank and local size variables
    rank: int
    world: int
    local_rank: int | None
    local_world: int | None
    addr: str | None
    port: int | None
    source: str


_MPI_CACHE: dict[tuple, DistEnv] = {}


def _from_mpi(environ: Mapping[str, str], rank_vars: tuple[str, str, str, str]) -> DistEnv:
    rank_v, size_v, lrank_v, lsize_v = rank_vars
    rank = _need_int(environ, rank_v)
    world = _need_int(environ, size_v)
    local_rank, local_world = _int(environ, lrank_v), _int(environ, lsize_v)
    v = _MpiVars(rank_vars, rank, world, local_rank, local_world, *_chosen_addr_port(environ))
    host = short_hostname()
    use_mpi4py = _enabled(environ, "PTFT_MPI4PY")
    key = (v.rank, v.world, v.addr, v.port)
    # a second discover() must not run the collectives again (other ranks would not join them)
    if use_mpi4py and environ is os.environ and key in _MPI_CACHE:
        return _MPI_CACHE[key]
    comm = _mpi4py_world() if use_mpi4py else None
    fields = _mpi_ask_the_ranks(comm, v, host) if comm is not None else _mpi_from_variables(environ, v, host)
    hosts, local_world = fields["hosts"], fields["local_world_size"]
    env = DistEnv(
        rank=v.rank,
        world_size=v.world,
        launcher="mpi",
        num_nodes=max(len(hosts), 1) if hosts else max(1, -(-v.world // max(local_world, 1))),
        host=host,
        **fields,
    )
    if comm is not None and environ is os.environ:
        _MPI_CACHE[key] = env
    return env


def _mpi4py_world() -> Any | None:
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _mpi_ask_the_ranks(comm: Any, v: _MpiVars, host: str) -> dict[str, Any]:
    """With mpi4py: gather every rank's host (node and local ranks), rank 0 picks the master."""
    if comm.Get_size() != v.world or comm.Get_rank() != v.rank:
        raise LayoutError(
            f"{v.names[0]}={v.rank}/{v.names[1]}={v.world} disagree with MPI_COMM_WORLD "
            f"(rank {comm.Get_rank()} of {comm.Get_size()})"
        )
    names = comm.allgather(host)
    hosts = tuple(dict.fromkeys(names))
    local_rank, local_world = v.local_rank, v.local_world
    if local_rank is None or local_world is None:
        same = [r for r, n in enumerate(names) if n == host]
        local_rank, local_world = same.index(v.rank), len(same)
    chosen = None
    if v.rank == 0:
        m_addr = v.addr or ("127.0.0.1" if len(hosts) == 1 else _primary_address())
        chosen = (m_addr, free_port(), "free port picked by rank 0") if v.port is None else (m_addr, v.port, v.source)
    addr, port, source = comm.bcast(chosen, root=0)
    return {
        "local_rank": local_rank,
        "local_world_size": local_world,
        "node_rank": hosts.index(host),
        "master_addr": addr,
        "master_port": port,
        "hosts": hosts,
        "port_source": source,
    }


def _mpi_from_variables(environ: Mapping[str, str], v: _MpiVars, host: str) -> dict[str, Any]:
    """Without mpi4py the ranks cannot agree on a master address: one host only (or MASTER_ADDR),
    and a port derived from the MPI job id."""
    if v.local_rank is None or v.local_world is None:
        raise LayoutError(f"{v.names[2]}/{v.names[3]} are not set and mpi4py is not installed (pip install mpi4py)")
    single_host = v.local_world == v.world
    addr, port, source = v.addr, v.port, v.source
    if addr is None:
        if not single_host:
            raise LayoutError(
                f"{v.world} MPI ranks on several hosts: install mpi4py (pip install mpi4py) so rank 0 can "
                "broadcast the master address, or set MASTER_ADDR/MASTER_PORT"
            )
        addr = "127.0.0.1"
    if port is None:
        job = _get(environ, "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE", "PMI_JOBID")
        if job is None:
            raise LayoutError("cannot derive a master port shared by all MPI ranks: set MASTER_PORT")
        port, source = derived_port(job), "MPI job id"
    return {
        "local_rank": v.local_rank,
        "local_world_size": v.local_world,
        "node_rank": v.rank // v.local_world if v.local_world else 0,
        "master_addr": addr,
        "master_port": port,
        "hosts": (host,) if single_host else (),
        "port_source": source,
    }


# --------------------------------------------------------------------------- one process, and the dispatch


def _single(environ: Mapping[str, str]) -> DistEnv:
    addr, port, source = _chosen_addr_port(environ)
    if port is None:
        port, source = free_port(), "free port"
    host = short_hostname()
    return DistEnv(master_addr=addr or "127.0.0.1", master_port=port, hosts=(host,), host=host, port_source=source)


_OMPI_VARS = tuple(f"OMPI_COMM_WORLD_{v}" for v in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE"))
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
            _reject_stale_rank_vars(environ, env)
    else:
        env = _single(environ)
    check_layout(env)
    return env


def _reject_stale_rank_vars(environ: Mapping[str, str], env: DistEnv) -> None:
    """RANK/WORLD_SIZE without a launcher that sets them were probably inherited from the submitting
    shell; if they disagree with SLURM/MPI, trusting either would be wrong somewhere."""
    stale = (_int(environ, "RANK"), _int(environ, "WORLD_SIZE"))
    if stale != (env.rank, env.world_size):
        raise LayoutError(
            f"RANK={stale[0]} WORLD_SIZE={stale[1]} in the environment contradict the {env.launcher} "
            f"launcher (rank {env.rank} of {env.world_size}); they were probably inherited from the shell "
            "that started the job: unset RANK WORLD_SIZE LOCAL_RANK"
        )
