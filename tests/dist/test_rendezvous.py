"""ptft_dist.dist.rendezvous: preflight errors that name rank, host and port; init without a group; topology."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from ptft_dist.dist.discover import DERIVED_PORT_BASE, discover, free_port
from ptft_dist.dist.layout import DistEnv
from ptft_dist.dist.rendezvous import PreflightError, device_for, format_topology, init_distributed, preflight
from tests.dist.helpers import slurm_step


def _closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    return free_port()


def _busy_socket(port: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("", port or 0))
    s.listen()
    return s


def test_device_for_cpu_and_gpus(monkeypatch):
    """Runs on any machine: CUDA presence and GPU count are stand-ins (monkeypatched), not a skip."""
    import torch

    env = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(device_for(env)) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for(env) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per rank (CUDA_VISIBLE_DEVICES)
    assert device_for(env) == torch.device("cuda", 0)


# --------------------------------------------------------------------------- preflight


def test_unreachable_master_fails_fast_naming_host_and_port():
    port = _closed_port()
    env = DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        num_nodes=2,
        node_rank=1,
        master_addr="127.0.0.1",
        master_port=port,
        launcher="slurm",
        host="h2",
        port_source="PTFT_MASTER_PORT",
    )
    t0 = time.monotonic()
    with pytest.raises(PreflightError) as err:
        preflight(env, timeout_s=3)
    elapsed = time.monotonic() - t0
    assert f"rank 3 on host h2 cannot reach master 127.0.0.1:{port} within 3 s" in str(err.value)
    assert 3 <= elapsed < 6


def test_busy_derived_port_names_port_and_override(fake_scontrol):
    # a busy port inside the derived range, and a job id that maps onto it
    for port in range(DERIVED_PORT_BASE + 7000, DERIVED_PORT_BASE + 8000):
        try:
            sock = _busy_socket(port)
            break
        except OSError:
            continue
    else:
        pytest.fail(f"none of the 1000 ports from {DERIVED_PORT_BASE + 7000} could be bound on this host")
    try:
        job_id = port - DERIVED_PORT_BASE
        env = discover(slurm_step(PATH=fake_scontrol, SLURM_JOB_ID=str(job_id)))
        assert env.master_port == port
        with pytest.raises(PreflightError) as err:
            preflight(env, timeout_s=3)
        msg = str(err.value)
        assert f"master port {port} is already in use" in msg
        assert f"SLURM_JOB_ID={job_id}" in msg and "PTFT_MASTER_PORT" in msg
    finally:
        sock.close()


def test_missing_ranks_are_named():
    port = free_port()
    base = {
        "world_size": 3,
        "local_world_size": 3,
        "master_addr": "127.0.0.1",
        "master_port": port,
        "launcher": "slurm",
    }
    errors: dict[int, str] = {}

    def rank(r: int) -> None:
        try:
            preflight(DistEnv(rank=r, local_rank=r, host=f"h{r}", **base), timeout_s=3)
        except PreflightError as exc:
            errors[r] = str(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert "only 2 of 3 ranks joined" in errors[0] and "missing ranks: 1" in errors[0]
    assert "missing ranks: 1" in errors[2]


def test_preflight_all_join():
    port = free_port()
    base = {"world_size": 2, "local_world_size": 2, "master_addr": "127.0.0.1", "master_port": port}
    out: dict[int, object] = {}

    def rank(r: int) -> None:
        out[r] = preflight(DistEnv(rank=r, local_rank=r, **base), timeout_s=10)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # rank 1 first: it waits for 0
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert out[0] is not None and out[1] is not None
    assert preflight(DistEnv(), timeout_s=1) is None


def test_init_distributed_single_process_exports_and_does_not_init(monkeypatch):
    import torch.distributed as tdist

    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    for k in (*exported, "PTFT_LAUNCHER"):
        monkeypatch.setenv(k, "x")  # recorded, so monkeypatch restores (removes) what init_distributed sets
        monkeypatch.delenv(k)
    env = DistEnv(master_port=23999)
    init_distributed(env)
    assert not tdist.is_initialized()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "23999")
    assert os.environ["PTFT_LAUNCHER"] == "single"


def test_format_topology():
    env = DistEnv(
        rank=0,
        world_size=4,
        local_world_size=2,
        num_nodes=2,
        master_addr="10.0.0.1",
        master_port=29500,
        launcher="slurm",
    )
    topo = [
        {"rank": r, "host": h, "local_rank": r % 2, "device": "cpu"} for r, h in enumerate(["n1", "n1", "n2", "n2"])
    ]
    # rank 0 logs it after init: "ptft dist: 4 ranks on ..." (the logger adds the prefix)
    assert format_topology(topo, env, "gloo") == (
        "4 ranks on 2 host(s) (n1: ranks 0-1 on cpu | n2: ranks 2-3 on cpu), backend gloo, "
        "master 10.0.0.1:29500, launcher slurm"
    )
