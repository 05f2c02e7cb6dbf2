"""The test SLURM cluster really schedules, signals, requeues and runs 2-node gloo jobs."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, free_ports, parse_scontrol

# The session-scoped cluster fixture (skips without SLURM unless PTFT_REQUIRE_SYSTEM=1, then fails: tests/system.py).

pytestmark = pytest.mark.slurm

PY = sys.executable


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            extra = f"\n{cluster.log_tail()}" if cluster else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(poll)


def _job_dir(cluster: SlurmCluster, name: str) -> Path:
    d = cluster.root / "jobs" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_parse_scontrol_keeps_values_with_spaces():
    info = parse_scontrol("JobId=7 JobName=x Reason=Some reason here Command=/a b/c.sh NodeList=n[1-2]")
    assert info == {
        "JobId": "7",
        "JobName": "x",
        "Reason": "Some reason here",
        "Command": "/a b/c.sh",
        "NodeList": "n[1-2]",
    }


def test_two_node_job_runs_one_task_per_node(slurm_cluster: SlurmCluster):
    d = _job_dir(slurm_cluster, "hostname")
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        srun {PY} -c 'import os; print("TASK", os.environ["SLURM_PROCID"], os.environ["SLURM_NODEID"], os.environ["SLURMD_NODENAME"])'
        """
    )
    job = slurm_cluster.sbatch(script, "-N", "2", "--ntasks-per-node=1", "-o", str(d / "out-%j.txt"))
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED", (d / f"out-{job}.txt").read_text()
    tasks = sorted(
        tuple(line.split()[1:]) for line in (d / f"out-{job}.txt").read_text().splitlines() if line.startswith("TASK ")
    )
    assert [t[0] for t in tasks] == ["0", "1"]
    assert {t[2] for t in tasks} == {"n1", "n2"}
    # node id and node name agree (n1 is node 0 of the allocation)
    assert {(t[1], t[2]) for t in tasks} == {("0", "n1"), ("1", "n2")}
    info = slurm_cluster.job_info(job)
    assert info["NumNodes"] == "2"
    assert info["ExitCode"] == "0:0"


def test_scancel_signal_reaches_batch_shell(slurm_cluster: SlurmCluster):
    d = _job_dir(slurm_cluster, "signal")
    ready, got = d / "ready", d / "got_usr1"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        trap 'echo USR1 > {got}; exit 0' USR1
        touch {ready}
        for _ in $(seq 600); do sleep 0.1 & wait $!; done
        exit 3
        """
    )
    job = slurm_cluster.sbatch(script, "-o", str(d / "out-%j.txt"))
    slurm_cluster.wait_state(job, {"RUNNING"}, timeout=20)
    _wait_for(ready.exists, 20, "the batch script to install its trap", slurm_cluster)
    t0 = time.monotonic()
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    _wait_for(got.exists, 5, "the USR1 marker file", slurm_cluster)
    latency = time.monotonic() - t0
    assert got.read_text().strip() == "USR1"
    assert slurm_cluster.wait(job, timeout=15) == "COMPLETED"
    assert latency < 5


def test_requeue_reruns_with_restart_count(slurm_cluster: SlurmCluster):
    d = _job_dir(slurm_cluster, "requeue")
    log = d / "runs.log"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH --requeue
        echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> {log}
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
            scontrol requeue "$SLURM_JOB_ID"
            sleep 60
            exit 5
        fi
        exit 0
        """
    )
    job = slurm_cluster.sbatch(script, "-o", str(d / "out-%j.txt"))
    _wait_for(lambda: log.exists() and "restart=0" in log.read_text(), 20, "the first run", slurm_cluster)
    # After the requeue the job waits (BeginTime, ~2 min by default): release it now.
    slurm_cluster.wait_state(job, {"PENDING"}, timeout=20)
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED"
    assert log.read_text().split() == ["restart=0", "restart=1"]
    assert slurm_cluster.job_info(job)["Restarts"] == "1"


def test_gloo_all_reduce_across_two_nodes(slurm_cluster: SlurmCluster):
    d = _job_dir(slurm_cluster, "gloo")
    addr = slurm_cluster.node_addr("n1")
    (port,) = free_ports(1)
    prog = d / "allreduce.py"
    prog.write_text(
        textwrap.dedent(
            f"""\
            import os
            import torch
            import torch.distributed as dist

            rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
            dist.init_process_group("gloo", init_method="tcp://{addr}:{port}", rank=rank, world_size=world)
            t = torch.tensor([float(rank + 1)])
            dist.all_reduce(t)
            print("RESULT", rank, os.environ["SLURMD_NODENAME"], int(t.item()), flush=True)
            dist.destroy_process_group()
            """
        )
    )
    script = f"#!/bin/bash\nexport GLOO_SOCKET_IFNAME=lo\nsrun {PY} {prog}\n"
    job = slurm_cluster.sbatch(script, "-N", "2", "--ntasks-per-node=1", "-o", str(d / "out-%j.txt"))
    state = slurm_cluster.wait(job, timeout=45)
    out = (d / f"out-{job}.txt").read_text()
    assert state == "COMPLETED", out
    results = sorted(tuple(line.split()[1:]) for line in out.splitlines() if line.startswith("RESULT "))
    assert results == [("0", "n1", "3"), ("1", "n2", "3")], out
