"""ptft_dist.dist.discover, .layout and .slurm: every launcher's variables, layout checks, SLURM syntax.

Fast and in-process (no multi-process runs here; those are in tests/launch/test_launch.py).
"""

from __future__ import annotations

import pytest

from ptft_dist.dist.discover import DERIVED_PORT_BASE, DERIVED_PORT_SPAN, derived_port, discover
from ptft_dist.dist.layout import DistEnv, LayoutError, check_layout
from ptft_dist.dist.slurm import expand_hostlist, expand_tasks_per_node, slurm_gpus_per_node
from tests.dist.helpers import slurm_step

# --------------------------------------------------------------------------- parsing helpers


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[1-2,5],gpu[08-10]", ["n1", "n2", "n5", "gpu08", "gpu09", "gpu10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a,b", ["a", "b"]),
    ],
)
def test_expand_hostlist(spec, names):
    assert expand_hostlist(spec) == names


def test_expand_hostlist_rejects_garbage():
    with pytest.raises(LayoutError, match="malformed"):
        expand_hostlist("n[1-")
    with pytest.raises(LayoutError, match="malformed"):
        expand_hostlist("n[a-b]")


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(LayoutError, match="tasks-per-node"):
        expand_tasks_per_node("2(y3)")


@pytest.mark.parametrize(
    ("over", "gpus"),
    [
        ({}, None),
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "2"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:2(x2),1"}, 2),
        ({"SLURM_GPUS_PER_NODE": "8"}, 8),
        ({"SLURM_GPUS_ON_NODE": "0"}, 0),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100"}, None),
    ],
)
def test_slurm_gpus_per_node(over, gpus):
    assert slurm_gpus_per_node(over) == gpus


def test_derived_port_in_range_and_stable():
    assert derived_port(1234) == DERIVED_PORT_BASE + 1234
    assert derived_port(1234 + DERIVED_PORT_SPAN) == derived_port(1234)
    assert derived_port("abc") == derived_port("abc")
    assert DERIVED_PORT_BASE <= derived_port("abc") < DERIVED_PORT_BASE + DERIVED_PORT_SPAN


# --------------------------------------------------------------------------- discover()


def test_single_process():
    env = discover({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("single", 0, 1, 0, 1)
    assert env.master_addr == "127.0.0.1" and 1 <= env.master_port <= 65535 and env.port_source == "free port"
    assert discover({"PTFT_MASTER_PORT": "23456"}).master_port == 23456


def test_torchrun_variables():
    env = discover(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2",
            "MASTER_ADDR": "h0",
            "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "abc",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": "2",
            "PTFT_MASTER_PORT": "1111",  # the launcher's port wins: its agent already serves there
        }
    )
    assert env.launcher == "torchrun"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.node_rank, env.num_nodes) == (1, 2)
    assert (env.master_addr, env.master_port) == ("h0", 29400)
    assert env.agent_store and env.restart_count == 2


def test_deepspeed_variables():
    env = discover(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_SIZE": "2",
            "CROSS_RANK": "1",
            "CROSS_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
        }
    )
    assert env.launcher == "deepspeed"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == (
        3,
        4,
        1,
        2,
        1,
        2,
    )
    assert (env.master_addr, env.master_port, env.agent_store) == ("10.0.0.1", 29500, False)


def test_launcher_variables_multi_node_need_master_addr():
    with pytest.raises(LayoutError, match="MASTER_ADDR"):
        discover({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"})


def test_slurm_step(fake_scontrol):
    env = discover(slurm_step(PATH=fake_scontrol, SLURM_PROCID="1", SLURM_NODEID="1", SLURMD_NODENAME="nx2"))
    assert env.launcher == "slurm"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (1, 2, 0, 1, 1)
    assert env.hosts == ("nx1", "nx2") and env.host == "nx2"
    # nx1 does not resolve: the master is its NodeAddr from `scontrol show node`
    assert env.master_addr == "127.0.0.1"
    assert env.master_port == derived_port(1234) and env.port_source == "SLURM_JOB_ID=1234"


def test_slurm_port_and_addr_overrides(fake_scontrol):
    env = discover(slurm_step(PATH=fake_scontrol, PTFT_MASTER_PORT="24567", PTFT_MASTER_ADDR="10.1.1.1"))
    assert (env.master_addr, env.master_port, env.port_source) == ("10.1.1.1", 24567, "PTFT_MASTER_PORT")
    assert discover(slurm_step(PATH=fake_scontrol, MASTER_PORT="24568")).master_port == 24568


def test_slurm_without_scontrol_expands_in_python():
    env = discover(slurm_step(PATH="/nonexistent", SLURM_STEP_NODELIST="localhost,nx2"))
    assert env.hosts == ("localhost", "nx2") and env.master_addr == "localhost"


def test_stale_rank_variables_beside_slurm_are_an_error():
    # RANK/WORLD_SIZE exported in the shell that ran sbatch reach every task: each would be "rank 0 of 1"
    with pytest.raises(LayoutError, match="RANK=0 WORLD_SIZE=1 in the environment contradict the slurm launcher"):
        discover(slurm_step(PATH="/nonexistent", SLURM_PROCID="1", SLURM_NODEID="1", RANK="0", WORLD_SIZE="1"))
    # ... but agreeing ones are fine, and a launcher marker (torchrun inside srun) makes them authoritative
    assert discover(slurm_step(PATH="/nonexistent", RANK="0", WORLD_SIZE="2")).launcher == "slurm"
    env = discover(slurm_step(PATH="/nonexistent", RANK="3", WORLD_SIZE="8", TORCHELASTIC_RUN_ID="x", MASTER_ADDR="h"))
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 3, 8)
    # a child of an initialised rank: export_env() left PTFT_LAUNCHER
    env = discover(slurm_step(PATH="/nonexistent", RANK="1", WORLD_SIZE="2", PTFT_LAUNCHER="slurm", MASTER_ADDR="h"))
    assert (env.launcher, env.rank) == ("slurm", 1)


def test_slurm_batch_script_is_not_a_step():
    # sbatch's own shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process, not rank 0 of 2
    env = {k: v for k, v in slurm_step().items() if not k.startswith("SLURM_STEP")}
    assert discover(env).launcher == "single"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        # srun -n 3 inside --ntasks-per-node=2 on 2 nodes
        (
            {
                "SLURM_STEP_NUM_TASKS": "3",
                "SLURM_NTASKS": "3",
                "SLURM_STEP_TASKS_PER_NODE": "2,1",
                "SLURM_NTASKS_PER_NODE": "2",
            },
            "3 tasks != 2 nodes x 2 tasks per node",
        ),
        (
            {
                "SLURM_STEP_NUM_TASKS": "3",
                "SLURM_NTASKS": "3",
                "SLURM_STEP_TASKS_PER_NODE": "2,1",
                "SLURM_NTASKS_PER_NODE": "",
            },
            "uneven SLURM layout",
        ),
        ({"SLURM_GPUS_ON_NODE": "4"}, "1 task\\(s\\) on node 0 but 4 GPU\\(s\\) per node: expected 2 nodes x 4"),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, "but 2 GPU\\(s\\) per node"),
        ({"SLURM_STEP_TASKS_PER_NODE": "1(x3)"}, "3 per-node counts for 2 nodes"),
        ({"SLURM_STEP_NUM_TASKS": "5"}, "per-node counts add up to 2, not 5"),
        ({"SLURM_PROCID": "two"}, "SLURM_PROCID='two' is not an integer"),
        ({"SLURM_PROCID": "7"}, "rank 7 is not in \\[0, 2\\)"),
        ({"SLURM_STEP_NODELIST": "nx[1-3]"}, "names 3 nodes"),
    ],
)
def test_slurm_layout_errors(over, message):
    with pytest.raises(LayoutError, match=message):
        discover(slurm_step(PATH="/nonexistent", **over))


def test_slurm_layout_check_can_be_disabled():
    over = {"SLURM_GPUS_ON_NODE": "4", "PTFT_LAYOUT_CHECK": "0"}
    assert discover(slurm_step(PATH="/nonexistent", **over)).world_size == 2


def test_mpi_without_mpi4py_single_host():
    env = discover(
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "OMPI_MCA_ess_base_jobid": "1722548225",
            "PTFT_MPI4PY": "0",
            # mpirun inside an allocation: the daemons' srun step leaks SLURM variables; MPI wins
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert env.launcher == "mpi"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert env.master_addr == "127.0.0.1" and env.master_port == derived_port("1722548225")


def test_mpi_without_mpi4py_across_hosts_needs_it():
    with pytest.raises(LayoutError, match="install mpi4py"):
        discover(
            {
                "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "PTFT_MPI4PY": "0",
            }
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": 2, "world_size": 2}, "rank 2 is not in"),
        ({"local_rank": 1, "local_world_size": 1, "world_size": 2, "rank": 1}, "local rank 1"),
        ({"local_world_size": 3, "world_size": 2}, "local world size 3"),
        ({"master_port": 70000}, "master port 70000"),
        ({"launcher": "pbs"}, "unknown launcher"),
    ],
)
def test_check_layout(fields, message):
    with pytest.raises(LayoutError, match=message):
        check_layout(DistEnv(**fields))
