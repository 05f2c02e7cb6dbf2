"""launch.sh: the exact command of every mode, arguments that survive intact, bad input, and real
multi-process runs through each launcher (selftest ranks agree on the all-reduced sum), on the
real test SLURM cluster too."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptft_dist.dist.discover import free_port
from ptft_dist.dist.launcher_env import encode_argv
from tests.netns_hosts import TwoHosts, base_env
from tests.slurm_cluster import SlurmCluster
from tests.system import require_system

REPO = Path(__file__).resolve().parents[2]
LAUNCH = str(REPO / "launch.sh")
PY = sys.executable
ROOT = os.geteuid() == 0
WEIRD = """it's a "quoted" arg with $HOME and \\ and  two spaces"""
PROG = ["ptft", "pretrain", "--config", "c.yaml", "train.steps=10"]
PROG_TAIL = "-m ptft_dist.cli pretrain --config c.yaml train.steps=10"

def launch(*args: str, env: dict[str, str] | None = None, cwd: Path | str | None = None, timeout: float = 30):
    return subprocess.run(
        [LAUNCH, *args], env=env or base_env(), cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout
    )


def dry(*args: str, env: dict[str, str] | None = None, prog: list[str] = PROG, **kw) -> str:
    proc = launch(*args, "--dry-run", "--", *prog, env=env, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def hostfiles(tmp_path: Path) -> dict[str, Path]:
    files = {
        "local": "localhost slots=2\n",
        "two": "# two hosts\nh1 slots=2\n\nh2 slots=2   # trailing comment\n",
        "bad": "h1 slots=2\nh2 4\n",
        "dup": "h1 slots=1\nh1 slots=1\n",
        "zero": "h1 slots=0\n",
        "empty": "# nothing\n\n",
    }
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"hostfile-{name}"
        out[name].write_text(text)
    return out


# --------------------------------------------------------------------------- --dry-run: exact commands


def test_dry_run_debug():
    assert dry("debug") == f"{PY} {PROG_TAIL}"


def test_dry_run_torchrun():
    assert (
        dry("torchrun", "--nproc", "2") == f"{PY} -m torch.distributed.run --standalone --nproc_per_node 2 {PROG_TAIL}"
    )
    assert dry(
        "torchrun",
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--rdzv-endpoint=h1:29400",
        "--rdzv_id",
        "job7",
        "--nproc",
        "4",
        "--max_restarts",
        "3",
    ) == (
        f"{PY} -m torch.distributed.run --nnodes 2 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint h1:29400 "
        f"--rdzv_id job7 --nproc_per_node 4 --max_restarts 3 {PROG_TAIL}"
    )


def test_dry_run_deepspeed(hostfiles):
    assert dry("deepspeed", "--num_gpus", "2", "--master_port", "29600") == (
        f"{PY} -m deepspeed.launcher.runner --num_gpus 2 --master_port 29600 --no_local_rank --module {PROG_TAIL[3:]}"
    )
    # several hosts over pdsh: .deepspeed_env is written first
    proc = launch(
        "deepspeed",
        "--hostfile",
        str(hostfiles["two"]),
        "--include",
        "h1@h2",
        "--master_addr",
        "10.0.0.1",
        "--dry-run",
        "--",
        *PROG,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{PY} -m deepspeed.launcher.runner --hostfile {hostfiles['two']} --include h1@h2 --master_addr 10.0.0.1 "
        f"--no_local_rank --module {PROG_TAIL[3:]}"
    )
    assert f"would first run: {PY} {REPO}/ptft_dist/dist/__main__.py --write-deepspeed-env .deepspeed_env" in proc.stderr


def test_dry_run_deepspeed_openmpi(hostfiles):
    largs = "--allow-run-as-root --oversubscribe" if ROOT else "--oversubscribe"
    assert dry("deepspeed", "--hostfile", str(hostfiles["local"]), "--launcher", "openmpi", "--oversubscribe") == (
        f"{PY} -m deepspeed.launcher.runner --hostfile {hostfiles['local']} --launcher openmpi --force_multi "
        f"--no_ssh_check --master_addr localhost --launcher_args {largs.replace(' ', chr(92) + ' ')} "
        f"--no_local_rank --module {PROG_TAIL[3:]}"
    )


def test_dry_run_deepspeed_slurm_generates_hostfile(tmp_path):
    env = base_env(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]", SLURM_NTASKS_PER_NODE="1", TMPDIR=str(tmp_path))
    proc = launch("deepspeed", "--launcher", "slurm", "--dry-run", "--", *PROG, env=env)
    assert proc.returncode == 0, proc.stderr
    # deepspeed's slurm runner runs `python -u SCRIPT` (no -m): the program goes through the shim
    assert proc.stdout.strip() == (
        f"{PY} -m deepspeed.launcher.runner --hostfile {tmp_path}/ptft-hostfile-7 --launcher slurm --force_multi "
        f"--no_ssh_check --master_addr n1 --no_local_rank {REPO}/ptft_dist/dist/__main__.py --exec-b64 "
        f"{encode_argv(['-m', 'ptft_dist.cli', *PROG[1:]])}"
    )
    assert "n1 slots=1\nn2 slots=1" in proc.stderr


def test_dry_run_accelerate():
    common = "--num_machines 1 --mixed_precision no --dynamo_backend no"
    assert dry("accelerate", "--nproc", "2") == (
        f"env ACCELERATE_USE_CPU=true {PY} -m accelerate.commands.launch --multi_gpu --num_processes 2 {common} {PROG_TAIL}"
    )
    assert dry("accelerate") == f"{PY} -m accelerate.commands.launch --cpu --num_processes 1 {common} {PROG_TAIL}"
    assert dry("accelerate", env=base_env(PTFT_NUM_GPUS="4")) == (
        f"{PY} -m accelerate.commands.launch --multi_gpu --num_processes 4 {common} {PROG_TAIL}"
    )


def test_dry_run_srun():
    job = base_env(SLURM_JOB_ID="7")
    assert dry("srun", env=job) == f"srun --kill-on-bad-exit=1 {PY} -u {PROG_TAIL}"
    assert dry("srun", env={**job, "SLURM_GPUS_ON_NODE": "4"}) == (
        f"srun --kill-on-bad-exit=1 --ntasks-per-node 4 {PY} -u {PROG_TAIL}"
    )
    assert dry("srun", "--nodes", "2", "--ntasks", "3", "--mpi", "pmix", env=job) == (
        f"srun --kill-on-bad-exit=1 --nodes 2 --ntasks 3 --mpi pmix {PY} -u {PROG_TAIL}"
    )


def test_dry_run_mpirun(hostfiles):
    root = " --allow-run-as-root" if ROOT else ""
    assert dry("mpirun", "-np", "2", "--oversubscribe") == f"mpirun -np 2{root} --oversubscribe {PY} -u {PROG_TAIL}"
    out = dry(
        "mpirun",
        "--nproc",
        "4",
        "--hostfile",
        str(hostfiles["two"]),
        env=base_env(PTFT_CACHE="/c", NCCL_DEBUG="INFO", NOT_FORWARDED="1"),
    )
    words = shlex.split(out)
    assert out.startswith(f"mpirun -np 4 --hostfile {hostfiles['two']}{root} -x ")
    exported = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-x")
    assert {"PATH", "PTFT_CACHE", "NCCL_DEBUG", "TORCH_EXTENSIONS_DIR"} <= set(exported)
    assert "NOT_FORWARDED" not in exported and exported["PTFT_CACHE"] == "/c"
    assert exported["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)  # remote ranks run this checkout


def test_dry_run_auto():
    assert dry(env=base_env(SLURM_JOB_ID="7")) == f"srun --kill-on-bad-exit=1 {PY} -u {PROG_TAIL}"
    assert dry("auto", env=base_env(SLURM_JOB_ID="7", SLURM_STEP_ID="0")) == f"{PY} {PROG_TAIL}"
    assert dry("auto", env=base_env(PTFT_NUM_GPUS="2")) == (
        f"{PY} -m deepspeed.launcher.runner --no_local_rank --module {PROG_TAIL[3:]}"
    )
    assert dry(env=base_env(PTFT_NUM_GPUS="1")) == f"{PY} {PROG_TAIL}"


def test_dry_run_program_kinds():
    assert dry("torchrun", "--nproc", "2", prog=["train.py", "--x", "1"]) == (
        f"{PY} -m torch.distributed.run --standalone --nproc_per_node 2 train.py --x 1"
    )
    assert dry("torchrun", "--nproc", "2", prog=["hostname"]).endswith("--nproc_per_node 2 --no-python hostname")
    assert dry("deepspeed", "--nproc", "2", prog=["python", "-u", "-m", "pkg.mod", "a"]).endswith(
        "--num_gpus 2 --no_local_rank --module pkg.mod a"
    )
    assert dry("deepspeed", "--nproc", "2", prog=["python", "-c", "print(1)"]).endswith(
        f"--no_local_rank --no_python {PY} -c print\\(1\\)"
    )
    assert dry("debug", prog=["python3", "x.py"]) == f"{PY} x.py"
    assert dry("debug", prog=["/usr/bin/python3", "-m", "m"]) == "/usr/bin/python3 -m m"
    assert dry("accelerate", prog=["echo", "hi"]).endswith("--no_python echo hi")


@pytest.mark.parametrize(
    ("mode_args", "env"),
    [
        (["debug"], None),
        (["torchrun", "--nproc", "2"], None),
        (["deepspeed", "--num_gpus", "2"], None),
        (["accelerate", "--nproc", "2"], None),
        (["mpirun", "-np", "2"], None),
        (["srun"], {"SLURM_JOB_ID": "7"}),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_dry_run_quoting_round_trip(mode_args, env):
    args = [WEIRD, "", "--opt=a b", "x'y", 'x"y']
    out = dry(*mode_args, prog=["ptft", *args], env=base_env(**(env or {})))
    assert shlex.split(out)[-len(args) :] == args


# --------------------------------------------------------------------------- arguments reach the program intact


def test_arguments_reach_the_program_intact(tmp_path):
    script = tmp_path / "argv.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    args = [WEIRD, "", "--opt=a b", "x'y", 'x"y', "*", "a\nb"]
    proc = launch("debug", "--", "python", str(script), *args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == args
    proc = launch("mpirun", "-np", "1", "--", "python", str(script), *args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == args


# --------------------------------------------------------------------------- bad input


def _usage_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "usage: ./launch.sh" in proc.stderr
    assert proc.stdout == ""


def test_unknown_mode_and_flags():
    _usage_error(launch("sbatch", "--", "ptft"), "unknown mode 'sbatch'")
    _usage_error(launch("debug", "--frobnicate", "--", "ptft"), "unknown option '--frobnicate'")
    _usage_error(
        launch("torchrun", "--hostfile", "h", "--", "ptft"), "option --hostfile is not valid for mode torchrun"
    )
    _usage_error(launch("debug", "ptft"), "unexpected argument 'ptft'")
    _usage_error(launch("debug"), "missing '--'")
    _usage_error(launch("debug", "--"), "no program after '--'")
    _usage_error(launch("torchrun", "--nproc", "two", "--", "ptft"), "--nproc wants a non-negative integer")
    _usage_error(launch("torchrun", "--nproc", "--", "ptft"), "option --nproc needs a value")
    _usage_error(launch("debug", "--nproc", "2", "--", "ptft"), "debug runs one process")
    _usage_error(launch("deepspeed", "--launcher", "ssh", "--", "ptft"), "--launcher must be pdsh, openmpi or slurm")
    _usage_error(launch("debug", "--dry-run=1", "--", "ptft"), "option --dry-run takes no value")


def test_help_goes_to_stdout():
    proc = launch("--help")
    assert proc.returncode == 0 and "usage: ./launch.sh" in proc.stdout


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "does not exist"),
        ("bad", "line 2: 'h2 4' is not 'HOST slots=N'"),
        ("dup", "line 2: host 'h1' listed twice"),
        ("zero", "line 1: 'h1 slots=0' is not 'HOST slots=N'"),
        ("empty", "lists no hosts"),
    ],
)
@pytest.mark.parametrize("mode", ["deepspeed", "mpirun"])
def test_bad_hostfiles(hostfiles, tmp_path, name, message, mode):
    path = hostfiles.get(name, tmp_path / "nope")
    proc = launch(mode, "--hostfile", str(path), "--dry-run", "--", "ptft")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_mode_preconditions(hostfiles):
    proc = launch("srun", "--", "ptft")
    assert proc.returncode == 2 and "runs inside a SLURM allocation" in proc.stderr
    proc = launch("deepspeed", "--launcher", "openmpi", "--", "ptft")
    assert proc.returncode == 2 and "needs --hostfile" in proc.stderr
    proc = launch(
        "deepspeed", "--launcher", "openmpi", "--hostfile", str(hostfiles["local"]), "--num_gpus", "2", "--", "ptft"
    )
    assert proc.returncode == 2 and "does not support --num_gpus" in proc.stderr


def test_selftest_reports_unreachable_master_without_traceback():
    port = free_port()
    env = base_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = launch("debug", "--", "python", "-m", "ptft_dist.dist", "--selftest", "--timeout", "3", env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"ptft dist: error: rank 1 on host {proc.stderr.split('on host ')[1].split()[0]} cannot reach master "
        f"127.0.0.1:{port} within 3 s (last error: Connection refused); is rank 0 running, is the address right "
        "(torchrun launcher, port from MASTER_PORT), and is the port open?"
    ]


# --------------------------------------------------------------------------- real runs


def selftest_results(text: str) -> list[dict]:
    """The JSON lines the selftest ranks printed (other launcher output ignored)."""
    out, decoder = [], json.JSONDecoder()
    for line in text.splitlines():
        if '"sum"' in line and "{" in line:
            out.append(decoder.raw_decode(line[line.index("{") :])[0])
    return out


def check_selftest(output: str, n: int, launcher: str, hosts: set[str] | None = None) -> list[dict]:
    results = selftest_results(output)
    assert sorted(r["rank"] for r in results) == list(range(n)), output
    for r in results:
        assert (r["world_size"], r["sum"], r["launcher"], r["echo"]) == (n, n * (n + 1) // 2, launcher, WEIRD), r
        assert r["backend"] == ("gloo" if n > 1 else "none")
    assert len({r["master"] for r in results}) == 1
    if n > 1:
        assert f"ptft dist: {n} ranks on" in output, output
    if hosts is not None:
        assert {r["host"] for r in results} == hosts
    return results


SELFTEST = ["python", "-m", "ptft_dist.dist", "--selftest", "--timeout", "60", "--echo", WEIRD]


def _runs():
    runs = [
        ("debug", ["debug"], 1, "single"),
        ("torchrun", ["torchrun", "--nproc", "2"], 2, "torchrun"),
        ("deepspeed", ["deepspeed", "--num_gpus", "2", "--master_port", "{port}"], 2, "deepspeed"),
        ("accelerate", ["accelerate", "--nproc", "2", "--main_process_port", "{port}"], 2, "torchrun"),
        ("mpirun", ["mpirun", "-np", "2", "--oversubscribe"], 2, "mpi"),
        (
            "deepspeed-openmpi",
            ["deepspeed", "--hostfile", "{hostfile}", "--launcher", "openmpi", "--oversubscribe"],
            2,
            "mpi",
        ),
    ]
    return [pytest.param(*r[1:], id=r[0]) for r in runs]


@pytest.mark.distributed
@pytest.mark.parametrize(("mode_args", "n", "launcher"), _runs())
def test_selftest_through_launcher(tmp_path, mode_args, n, launcher):
    if "mpirun" in mode_args or "openmpi" in mode_args:
        require_system([] if shutil.which("mpirun") else ["mpirun (OpenMPI)"], "the OpenMPI launcher tests")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    args = [a.format(port=free_port(), hostfile=hostfile) for a in mode_args]
    # run from a scratch directory: multi-node deepspeed writes .deepspeed_env into the working directory
    proc = launch(*args, "--", *SELFTEST, cwd=tmp_path, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    check_selftest(output, n, launcher)
    if "openmpi" in mode_args:
        written = (tmp_path / ".deepspeed_env").read_text()
        assert f"PYTHONPATH={REPO}" in written and "TORCH_EXTENSIONS_DIR=" in written


# --------------------------------------------------------------------------- the real SLURM cluster


def _job(cluster: SlurmCluster, name: str, body: str, *sbatch_args: str, timeout: float = 120) -> tuple[str, str]:
    d = cluster.root / "jobs" / name
    d.mkdir(parents=True, exist_ok=True)
    script = "#!/bin/bash\n" + textwrap.dedent(body)
    job = cluster.sbatch(script, *sbatch_args, "-o", str(d / "out-%j.txt"), cwd=d)
    state = cluster.wait(job, timeout=timeout)
    out = d / f"out-{job}.txt"
    return state, out.read_text() if out.exists() else ""


def _job_env() -> str:
    return (
        f"export PTFT_PYTHON={shlex.quote(PY)} OMP_NUM_THREADS=1 PTFT_MASTER_PORT={free_port()}\n"
        f"export TORCH_EXTENSIONS_DIR={shlex.quote(base_env()['TORCH_EXTENSIONS_DIR'])}\n"
    )


SELFTEST_LINE = " ".join(shlex.quote(a) for a in SELFTEST)


@pytest.mark.slurm
@pytest.mark.distributed
def test_srun_two_nodes(slurm_cluster: SlurmCluster):
    state, out = _job(
        slurm_cluster,
        "launch-srun",
        _job_env() + f"{LAUNCH} srun -- {SELFTEST_LINE}\n",
        "-N",
        "2",
        "--ntasks-per-node=1",
    )
    assert state == "COMPLETED", out
    results = check_selftest(out, 2, "slurm", hosts={"n1", "n2"})
    assert {(r["rank"], r["host"], r["node_rank"]) for r in results} == {(0, "n1", 0), (1, "n2", 1)}
    # the master is n1's NodeAddr (n1 itself does not resolve)
    assert results[0]["master"].startswith(slurm_cluster.node_addr("n1") + ":")


@pytest.mark.slurm
@pytest.mark.distributed
def test_deepspeed_slurm_launcher_two_nodes(slurm_cluster: SlurmCluster):
    d = slurm_cluster.root / "jobs" / "launch-ds-slurm"
    body = _job_env() + f"export TMPDIR={d}\n{LAUNCH} deepspeed --launcher slurm -- {SELFTEST_LINE}\n"
    state, out = _job(slurm_cluster, "launch-ds-slurm", body, "-N", "2", "--ntasks-per-node=1")
    assert state == "COMPLETED", out
    check_selftest(out, 2, "slurm", hosts={"n1", "n2"})
    assert (d / ".deepspeed_env").exists()


@pytest.mark.slurm
def test_inconsistent_slurm_layout_fails_before_init(slurm_cluster: SlurmCluster):
    body = _job_env() + f"{LAUNCH} srun --ntasks 3 -- {SELFTEST_LINE}\n"
    state, out = _job(slurm_cluster, "launch-layout", body, "-N", "2", "--ntasks-per-node=2")
    assert state == "FAILED", out
    assert "ptft dist: error: inconsistent SLURM layout: 3 tasks != 2 nodes x 2 tasks per node" in out
    assert "ranks on" not in out and '"sum"' not in out


# --------------------------------------------------------------------------- two hosts (network namespaces + sshd)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mode_args",
    [
        pytest.param(["deepspeed"], id="deepspeed-pdsh"),
        pytest.param(
            [
                "deepspeed",
                "--launcher",
                "openmpi",
                "--launcher_args",
                "--mca btl_tcp_if_include ptft0 --mca oob_tcp_if_include ptft0",
            ],
            id="deepspeed-openmpi",
        ),
        pytest.param(
            ["mpirun", "-np", "2"]
            + [
                f"--launcher-arg={a}"
                for a in ("--mca", "btl_tcp_if_include", "ptft0", "--mca", "oob_tcp_if_include", "ptft0")
            ],
            id="mpirun",
        ),
    ],
)
def test_two_hosts(two_hosts: TwoHosts, tmp_path: Path, mode_args: list[str]):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("hosta slots=1\nhostb slots=1\n")
    argv = [LAUNCH, *mode_args[:1], "--hostfile", str(hostfile), *mode_args[1:], "--", *SELFTEST]
    proc = two_hosts.run_on(0, argv, cwd=tmp_path, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    launcher = "deepspeed" if mode_args == ["deepspeed"] else "mpi"
    results = check_selftest(output, 2, launcher, hosts={"hosta", "hostb"})
    assert {r["master"].rsplit(":", 1)[0] for r in results} == {two_hosts.addrs[0]}
    if mode_args[0] == "deepspeed":
        assert f"GLOO_SOCKET_IFNAME={TwoHosts.IFNAME}" in (tmp_path / ".deepspeed_env").read_text()
