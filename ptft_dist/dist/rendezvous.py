"""Can I reach the others: bring up ``torch.distributed`` so that a setup mistake is one line, not a hang.

``init_process_group`` waits silently, until its timeout, when a rank has the wrong master
address, the port is taken or a rank never started. ``init_distributed`` runs a preflight
first, on a TCPStore it then hands to the process group: rank 0 binds the master port itself, the
others poll a TCP connect, all register and wait for each other, and each failure names the rank,
host and port involved (``PreflightError``). After init, rank 0 prints one topology line.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ptft_dist.dist.discover import short_hostname
from ptft_dist.dist.layout import DistEnv, DistError, LayoutError, check_layout
from ptft_dist.log import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("dist")


class PreflightError(DistError):
    """A rank cannot reach the master, the master port is taken, or ranks did not join in time."""


# --------------------------------------------------------------------------- devices and variables


def device_for(env: DistEnv) -> torch.device:
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
    """nccl with CUDA, else gloo."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


# --------------------------------------------------------------------------- preflight


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
    return f"rank {env.rank} on host {env.host or short_hostname()}"


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
            f"master port {env.master_port} is already in use on host {env.host or short_hostname()} "
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


_KEEP: list[Any] = []  # stores that must live as long as the process group


def preflight(env: DistEnv, timeout_s: float = 60) -> Any:
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
    if env.rank == 0 and not env.agent_store:
        store = _serve_store(env, timeout_s)
    else:
        _wait_reachable(env, timeout_s)
        store = _join_store(env, remaining=max(1.0, timeout_s - (time.monotonic() - start)))
    prefix = tdist.PrefixStore(f"ptft/{env.restart_count}", store)
    _await_all_ranks(prefix, env, timeout_s, start)
    _KEEP.append(store)
    return prefix


def _serve_store(env: DistEnv, timeout_s: float) -> Any:
    """Rank 0: the TCPStore on the port it has just bound (so "port taken" is a clear error)."""
    import torch.distributed as tdist

    sock = _listen_socket(env)
    try:
        store = tdist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=max(timeout_s, 1.0)),
            wait_for_workers=False,
            master_listen_fd=sock.fileno(),
        )
    except Exception as exc:
        sock.close()
        raise PreflightError(f"rank 0 cannot serve the rendezvous on port {env.master_port}: {exc}") from exc
    sock.detach()  # the store owns (and closes) the listening socket now
    return store


def _join_store(env: DistEnv, remaining: float) -> Any:
    """Every other rank (and rank 0 under a torchrun agent): a client of the master's store."""
    import torch.distributed as tdist

    try:
        return tdist.TCPStore(
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


def _await_all_ranks(prefix: Any, env: DistEnv, timeout_s: float, start: float) -> None:
    """Register, then wait for all ``world_size`` ranks; name the missing ones after ``timeout_s``."""
    info = {"host": env.host or short_hostname(), "local_rank": env.local_rank}
    try:
        prefix.set(f"join/{env.rank}", json.dumps(info))
        joined = prefix.add("joined", 1)
        delay = 0.02
        while joined < env.world_size:
            if joined < 0:  # rank 0 gave up and left its reason
                reason = prefix.get("abort").decode(errors="replace")
                raise PreflightError(f"{_who(env)}: rank 0 reports: {reason}")
            if time.monotonic() - start > timeout_s:
                _give_up(prefix, env, timeout_s)
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


def _give_up(prefix: Any, env: DistEnv, timeout_s: float) -> NoReturn:
    """Raise the "only N of M ranks joined" error; the rank serving the store first tells the
    waiting ranks why (a negative count), so they fail with the same reason instead of timing out."""
    missing = [r for r in range(env.world_size) if not prefix.check([f"join/{r}"])]
    reason = (
        f"only {env.world_size - len(missing)} of {env.world_size} ranks joined master "
        f"{env.master_addr}:{env.master_port} within {timeout_s:g} s; missing ranks: {_ranges(missing)}"
    )
    if env.rank == 0 and not env.agent_store:
        prefix.set("abort", reason)
        prefix.add("joined", -(2**40))
        time.sleep(1.0)  # give the waiting ranks a moment to read it
    raise PreflightError(f"{_who(env)}: {reason}")


# --------------------------------------------------------------------------- init and topology


def gather_topology(env: DistEnv) -> list[dict[str, Any]]:
    """After init: (rank, host, local_rank, device) of every rank, in rank order (an all_gather)."""
    import torch.distributed as tdist

    mine = {
        "rank": env.rank,
        "host": env.host or short_hostname(),
        "local_rank": env.local_rank,
        "device": str(device_for(env)),
    }
    if env.world_size == 1 or not tdist.is_initialized():
        return [mine]
    out: list[Any] = [None] * env.world_size
    tdist.all_gather_object(out, mine)
    return out


def format_topology(topology: Sequence[Mapping[str, Any]], env: DistEnv, backend: str) -> str:
    """One line (logged by rank 0 after init): ``4 ranks on 2 host(s) (n1: ranks 0-1 on cpu | n2: ...),
    backend gloo, master ...``; the logger adds the ``ptft dist:`` prefix."""
    by_host: dict[str, list[Mapping[str, Any]]] = {}
    for t in topology:
        by_host.setdefault(str(t["host"]), []).append(t)
    parts = []
    for host, items in by_host.items():
        devices = sorted({str(t["device"]) for t in items})
        label = "rank" if len(items) == 1 else "ranks"
        parts.append(f"{host}: {label} {_ranges([int(t['rank']) for t in items])} on {','.join(devices)}")
    return (
        f"{len(topology)} ranks on {len(by_host)} host(s) ({' | '.join(parts)}), backend {backend}, "
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
        log.info(format_topology(topology, env, backend))


def leave_process_group(timeout_s: float = 120) -> None:
    """After a command succeeded, every rank: wait for the others, then tear the group down.

    A process that exits with its gloo group alive can abort in the group's destructor ("terminate
    called without an active exception", exit status 250 seen on a 2-rank fine-tune that had written
    its results). The barrier is bounded: a rank that failed never arrives, and the others must not
    wait for it until the collective timeout -- they leave the group to the process exit."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return
    try:
        tdist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 -- a missing rank: exit without the teardown
        return
    tdist.destroy_process_group()
