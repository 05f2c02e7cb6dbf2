"""ptft_dist.dist: discovery from every launcher's variables, layout checks, preflight errors, helpers.

Fast and in-process (no multi-process runs here; those are in test_launch.py).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ptft_dist import dist
from ptft_dist.dist import DistEnv, LayoutError, PreflightError, discover

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    return dist.free_port()


def _busy_socket(port: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("", port or 0))
    s.listen()
    return s


def _slurm(**over: str) -> dict[str, str]:
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


@pytest.fixture
def fake_scontrol(tmp_path: Path) -> str:
    """A PATH whose ``scontrol`` knows nodes nx1/nx2 (NodeAddr 127.0.0.1/127.0.0.2) and expands lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "scontrol"
    exe.write_text(
        "#!/bin/bash\n"
        "if [[ $1 == show && $2 == hostnames ]]; then echo nx1; echo nx2; exit 0; fi\n"
        'if [[ $1 == show && $2 == node ]]; then n=${4:-$3}; echo "NodeName=$n Arch=x86_64 '
        'NodeAddr=127.0.0.${n#nx} NodeHostName=box State=IDLE"; exit 0; fi\n'
        "exit 1\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


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
    assert dist.expand_hostlist(spec) == names


def test_expand_hostlist_rejects_garbage():
    with pytest.raises(LayoutError, match="malformed"):
        dist.expand_hostlist("n[1-")
    with pytest.raises(LayoutError, match="malformed"):
        dist.expand_hostlist("n[a-b]")


def test_expand_tasks_per_node():
    assert dist.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert dist.expand_tasks_per_node("4") == [4]
    with pytest.raises(LayoutError, match="tasks-per-node"):
        dist.expand_tasks_per_node("2(y3)")


def test_derived_port_in_range_and_stable():
    assert dist.derived_port(1234) == dist.DERIVED_PORT_BASE + 1234
    assert dist.derived_port(1234 + dist.DERIVED_PORT_SPAN) == dist.derived_port(1234)
    assert dist.derived_port("abc") == dist.derived_port("abc")
    assert dist.DERIVED_PORT_BASE <= dist.derived_port("abc") < dist.DERIVED_PORT_BASE + dist.DERIVED_PORT_SPAN


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
    env = discover(_slurm(PATH=fake_scontrol, SLURM_PROCID="1", SLURM_NODEID="1", SLURMD_NODENAME="nx2"))
    assert env.launcher == "slurm"
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (1, 2, 0, 1, 1)
    assert env.hosts == ("nx1", "nx2") and env.host == "nx2"
    # nx1 does not resolve: the master is its NodeAddr from `scontrol show node`
    assert env.master_addr == "127.0.0.1"
    assert env.master_port == dist.derived_port(1234) and env.port_source == "SLURM_JOB_ID=1234"


def test_slurm_port_and_addr_overrides(fake_scontrol):
    env = discover(_slurm(PATH=fake_scontrol, PTFT_MASTER_PORT="24567", PTFT_MASTER_ADDR="10.1.1.1"))
    assert (env.master_addr, env.master_port, env.port_source) == ("10.1.1.1", 24567, "PTFT_MASTER_PORT")
    assert discover(_slurm(PATH=fake_scontrol, MASTER_PORT="24568")).master_port == 24568


def test_slurm_without_scontrol_expands_in_python():
    env = discover(_slurm(PATH="/nonexistent", SLURM_STEP_NODELIST="localhost,nx2"))
    assert env.hosts == ("localhost", "nx2") and env.master_addr == "localhost"


def test_stale_rank_variables_beside_slurm_are_an_error():
    # RANK/WORLD_SIZE exported in the shell that ran sbatch reach every task: each would be "rank 0 of 1"
    with pytest.raises(LayoutError, match="RANK=0 WORLD_SIZE=1 in the environment contradict the slurm launcher"):
        discover(_slurm(PATH="/nonexistent", SLURM_PROCID="1", SLURM_NODEID="1", RANK="0", WORLD_SIZE="1"))
    # ... but agreeing ones are fine, and a launcher marker (torchrun inside srun) makes them authoritative
    assert discover(_slurm(PATH="/nonexistent", RANK="0", WORLD_SIZE="2")).launcher == "slurm"
    env = discover(_slurm(PATH="/nonexistent", RANK="3", WORLD_SIZE="8", TORCHELASTIC_RUN_ID="x", MASTER_ADDR="h"))
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 3, 8)
    # a child of an initialised rank: export_env() left PTFT_LAUNCHER
    env = discover(_slurm(PATH="/nonexistent", RANK="1", WORLD_SIZE="2", PTFT_LAUNCHER="slurm", MASTER_ADDR="h"))
    assert (env.launcher, env.rank) == ("slurm", 1)


def test_slurm_batch_script_is_not_a_step():
    # sbatch's own shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process, not rank 0 of 2
    env = {k: v for k, v in _slurm().items() if not k.startswith("SLURM_STEP")}
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
        discover(_slurm(PATH="/nonexistent", **over))


def test_slurm_layout_check_can_be_disabled():
    over = {"SLURM_GPUS_ON_NODE": "4", "PTFT_LAYOUT_CHECK": "0"}
    assert discover(_slurm(PATH="/nonexistent", **over)).world_size == 2


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
    assert env.master_addr == "127.0.0.1" and env.master_port == dist.derived_port("1722548225")


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
        dist.check_layout(DistEnv(**fields))


def test_device_for_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert str(dist.device_for(DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2))) == "cpu"


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
        dist.preflight(env, timeout_s=3)
    elapsed = time.monotonic() - t0
    assert f"rank 3 on host h2 cannot reach master 127.0.0.1:{port} within 3 s" in str(err.value)
    assert 3 <= elapsed < 6


def test_busy_derived_port_names_port_and_override(fake_scontrol):
    # a busy port inside the derived range, and a job id that maps onto it
    for port in range(dist.DERIVED_PORT_BASE + 7000, dist.DERIVED_PORT_BASE + 8000):
        try:
            sock = _busy_socket(port)
            break
        except OSError:
            continue
    else:
        pytest.skip("no free port in the derived range")
    try:
        job_id = port - dist.DERIVED_PORT_BASE
        env = discover(_slurm(PATH=fake_scontrol, SLURM_JOB_ID=str(job_id)))
        assert env.master_port == port
        with pytest.raises(PreflightError) as err:
            dist.preflight(env, timeout_s=3)
        msg = str(err.value)
        assert f"master port {port} is already in use" in msg
        assert f"SLURM_JOB_ID={job_id}" in msg and "PTFT_MASTER_PORT" in msg
    finally:
        sock.close()


def test_missing_ranks_are_named():
    port = dist.free_port()
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
            dist.preflight(DistEnv(rank=r, local_rank=r, host=f"h{r}", **base), timeout_s=3)
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
    port = dist.free_port()
    base = {"world_size": 2, "local_world_size": 2, "master_addr": "127.0.0.1", "master_port": port}
    out: dict[int, object] = {}

    def rank(r: int) -> None:
        out[r] = dist.preflight(DistEnv(rank=r, local_rank=r, **base), timeout_s=10)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # rank 1 first: it waits for 0
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert out[0] is not None and out[1] is not None
    assert dist.preflight(DistEnv(), timeout_s=1) is None


def test_init_distributed_single_process_exports_and_does_not_init(monkeypatch):
    import torch.distributed as tdist

    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    for k in (*exported, "PTFT_LAUNCHER"):
        monkeypatch.setenv(k, "x")  # recorded, so monkeypatch restores (removes) what init_distributed sets
        monkeypatch.delenv(k)
    env = DistEnv(master_port=23999)
    dist.init_distributed(env)
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
    assert dist.format_topology(topo, env, "gloo") == (
        "ptft dist: 4 ranks on 2 host(s) (n1: ranks 0-1 on cpu | n2: ranks 2-3 on cpu), backend gloo, "
        "master 10.0.0.1:29500, launcher slurm"
    )


# --------------------------------------------------------------------------- .deepspeed_env and the exec shim


def test_write_deepspeed_env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", "/data/hf")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("PTFT_CACHE", "/c")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/ext")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("SOME_SECRET", "x")
    monkeypatch.setenv("PTFT_WEIRD", 'a"b')
    path = tmp_path / ".deepspeed_env"
    written = dist.write_deepspeed_env(path, extra={"PTFT_EXTRA": "1"})
    lines = path.read_text().splitlines()
    assert all("=" in ln for ln in lines) and lines == sorted(lines)
    got = dict(ln.split("=", 1) for ln in lines)
    assert got == written
    for key, value in {
        "HF_HOME": "/data/hf",
        "NCCL_DEBUG": "INFO",
        "GLOO_SOCKET_IFNAME": "eth0",
        "PTFT_CACHE": "/c",
        "OMP_NUM_THREADS": "4",
        "TORCH_EXTENSIONS_DIR": "/ext",
        "PTFT_EXTRA": "1",
    }.items():
        assert got[key] == value
    assert "CUDA_VISIBLE_DEVICES" not in got and "SOME_SECRET" not in got and "PTFT_WEIRD" not in got
    assert "not forwarding PTFT_WEIRD" in capsys.readouterr().err
    assert got["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    if sys.prefix != sys.base_prefix:
        assert got["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")

    # a hand-written file is merged, its values winning, and they stay the user's on later rewrites
    path.write_text("HF_HOME=/mine\nMY_VAR=1\n")
    got = dist.write_deepspeed_env(path)
    assert got["HF_HOME"] == "/mine" and got["MY_VAR"] == "1"
    monkeypatch.setenv("HF_HOME", "/new")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    got = dist.write_deepspeed_env(path)
    assert (got["HF_HOME"], got["MY_VAR"], got["NCCL_DEBUG"]) == ("/mine", "1", "WARN")
    assert got[dist.DEEPSPEED_ENV_USER_KEYS] == "HF_HOME,MY_VAR"


def test_cli_write_deepspeed_env_and_hostnames(tmp_path):
    py = sys.executable
    out = tmp_path / "envfile"
    proc = subprocess.run(
        [py, "-m", "ptft_dist.dist", "--write-deepspeed-env", str(out), "--set", "PTFT_A=b c"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PTFT_A=b c" in out.read_text().splitlines()
    proc = subprocess.run(
        [py, str(REPO / "ptft_dist" / "dist.py"), "--hostnames", "n[1-2],x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": "/nonexistent"},
    )
    assert proc.stdout.split() == ["n1", "n2", "x"], proc.stderr


def test_exec_shim_keeps_arguments_intact(tmp_path):
    script = tmp_path / "argv.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    weird = ["a b", "it's", 'say "hi"', "$HOME", "back\\slash", "", "--flag=x y"]
    for argv in ([str(script), *weird], [sys.executable, str(script), *weird]):
        proc = subprocess.run(
            [sys.executable, str(REPO / "ptft_dist" / "dist.py"), "--exec-b64", dist.encode_argv(argv)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == weird


def test_cli_discover_and_layout_error_exit_code():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PTFT_LAUNCHER"):
        env.pop(k, None)
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.9", MASTER_PORT="29999")
    proc = subprocess.run(
        [sys.executable, "-m", "ptft_dist.dist", "--discover"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["rank"], got["world_size"], got["master_addr"], got["master_port"]) == (1, 2, "10.0.0.9", 29999)
    bad = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
    bad.update(
        _slurm(
            PATH="/nonexistent",
            SLURM_STEP_NUM_TASKS="3",
            SLURM_NTASKS="3",
            SLURM_STEP_TASKS_PER_NODE="2,1",
            SLURM_NTASKS_PER_NODE="2",
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ptft_dist.dist", "--discover"],
        capture_output=True,
        text=True,
        timeout=60,
        env=bad,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ptft dist: error: inconsistent SLURM layout: 3 tasks != 2 nodes x 2 tasks per node")
    assert "Traceback" not in proc.stderr
