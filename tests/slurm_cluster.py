"""A real, private SLURM cluster on this host, for tests.

``SlurmCluster`` writes a ``slurm.conf`` whose every path (state, spool, pid, log, TmpFS) lies under
one directory, starts a private ``munged`` (own key and socket), ``slurmctld`` and one ``slurmd``
per fake node (``n1``, ``n2``, ...: all on this host, each on its own port, ``NodeAddr=127.0.0.1``),
and waits until ``sinfo`` reports every node idle. ``stop()`` cancels the jobs, then ends exactly the
daemons it started.

Needs root (slurmd launches jobs as the submitting user, and the config runs everything as root)
and the Debian packages that ``scripts/install_system_deps.sh`` installs.

The ``slurm_cluster`` fixture (session scope) skips when SLURM is not installed, unless
``PTFT_REQUIRE_SYSTEM=1`` (set in CI by scripts/test.sh; tests/system.py), in which case it fails instead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from tests.system import require_system

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "munged", "munge")

# States after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:.]*)=")


class SlurmError(RuntimeError):
    """A SLURM daemon or command did not do what the cluster asked of it."""


def missing_binaries() -> list[str]:
    """Names in ``SLURM_BINARIES`` that are not on PATH (nor in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [b for b in SLURM_BINARIES if shutil.which(b, path=path) is None]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now, below the kernel's ephemeral range.

    A port from the ephemeral range can be taken by any auto-bound socket between this check and its
    use: in a CI run ``srun`` bound its own I/O socket to the port a job's gloo store was then given
    (EADDRINUSE), and the job's other rank retried for 30 minutes. ptft's jobs derive their ports
    below that range for the same reason (``dist.discover.derived_port``)."""
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 2700), low))
    random.Random().shuffle(candidates)
    socks, ports = [], []
    try:
        for port in candidates:
            if len(ports) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    if len(ports) < n:
        raise RuntimeError(f"no {n} free ports below the ephemeral range ({low})")
    return ports


def parse_scontrol(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value two`` (one ``scontrol show -o`` record) -> dict.

    A value runs until the next `` Key=``, so values with spaces (Command, Reason) survive.
    """
    matches = list(_KEY_RE.finditer(line.strip()))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line.strip())
        out[m.group(1)] = line.strip()[m.end() : end].strip()
    return out


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"--- {path}: (missing)"
    return f"--- {path} (last {min(lines, len(text))} lines):\n" + "\n".join(text[-lines:])


class SlurmCluster:
    """A SLURM controller plus ``nodes`` slurmd daemons on this host, all under ``root``."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, *, start_timeout: float = 30.0):
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("need at least one node and one CPU per node")
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.start_timeout = start_timeout
        self.node_names = [f"n{i + 1}" for i in range(nodes)]
        self.hostname = socket.gethostname().split(".")[0]
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.job_dir = self.root / "jobs"
        self.ctld_port: int | None = None
        self.node_ports: dict[str, int] = {}
        self.mpi_default = "none"
        self._procs: dict[str, subprocess.Popen] = {}
        self._munged: subprocess.Popen | None = None
        self._munge_dir: Path | None = None
        self.munge_socket = ""
        self._script_count = 0
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that talk to this cluster.

        Drops any SLURM_* job variables inherited from an outer allocation (so ``srun``/``sbatch``
        do not think they run inside some other job) and points SLURM_CONF at this cluster.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf_path)
        if "/usr/sbin" not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = env.get("PATH", "/usr/bin:/bin") + os.pathsep + "/usr/sbin"
        return env

    def start(self) -> SlurmCluster:
        """Write the config, start the daemons, wait until every node is idle."""
        if self._started:
            return self
        missing = missing_binaries()
        if missing:
            raise SlurmError(
                f"SLURM/munge binaries not found: {', '.join(missing)} (run scripts/install_system_deps.sh)"
            )
        if os.geteuid() != 0:
            raise SlurmError("the test SLURM cluster must run as root (slurmd launches the jobs)")
        self._started = True
        atexit.register(self.stop)
        try:
            self._make_dirs()
            ports = free_ports(self.nodes + 1)
            self.ctld_port, node_ports = ports[0], ports[1:]
            self.node_ports = dict(zip(self.node_names, node_ports, strict=True))
            self._start_munge()
            self._write_conf("none")
            self.mpi_default = self._pick_mpi_default()
            if self.mpi_default != "none":
                self._write_conf(self.mpi_default)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)])
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf_path)])
            self._wait_idle(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *, remove: bool = False) -> None:
        """Cancel jobs, end the daemons this object started, remove state (logs and job files stay).

        ``remove=True`` deletes ``root`` entirely. Safe to call more than once.
        """
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._cancel_all_jobs(timeout=15.0)
        # slurmd first (they own the job steps), then the controller, then our munged.
        order = [k for k in self._procs if k.startswith("slurmd")] + [k for k in self._procs if k == "slurmctld"]
        self._terminate([self._procs[k] for k in order])
        self._procs.clear()
        if self._munged is not None:
            self._terminate([self._munged])
            self._munged = None
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)
            self._munge_dir = None
        for sub in ("state", "spool", "run", "tmp", "munge"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kw
    ) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; returns the CompletedProcess (text)."""
        kw.setdefault("cwd", self.job_dir)
        proc = subprocess.run(
            list(args), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sbatch(self, script: str | os.PathLike, *args: str, cwd: str | os.PathLike | None = None) -> int:
        """Submit a batch job; returns its id.

        ``script`` is a path to a script, or the text of one (anything containing a newline, or
        starting with ``#!``), which is then written under ``root/jobs``. ``args`` go to sbatch
        before the script (e.g. ``"-N", "2"``). The job runs in ``cwd`` (default ``root/jobs``,
        where ``slurm-<id>.out`` lands unless ``-o`` says otherwise).
        """
        if isinstance(script, str) and ("\n" in script or script.startswith("#!")):
            self._script_count += 1
            path = self.job_dir / f"script-{self._script_count}.sh"
            text = script if script.startswith("#!") else "#!/bin/bash\n" + script
            path.write_text(text)
            path.chmod(0o755)
        else:
            path = Path(script)
        proc = self.run(["sbatch", "--parsable", *args, str(path)], cwd=cwd or self.job_dir)
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Reason, NodeList, Restarts, ExitCode, ...)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise SlurmError(f"no such job {job_id}: {proc.stderr.strip()}")
        return parse_scontrol(proc.stdout.splitlines()[0])

    def job_state(self, job_id: int) -> str:
        """The job's state word (``RUNNING``, ``PENDING``, ``COMPLETED``...)."""
        return self.job_info(job_id)["JobState"].split()[0]

    def wait_state(self, job_id: int, states: Iterable[str], timeout: float = 60.0, poll: float = 0.2) -> str:
        """Poll ``scontrol show job`` until the job is in one of ``states``; returns that state."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            state = info["JobState"].split()[0]
            if state in wanted:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} (reason {info.get('Reason')}) after {timeout:.0f} s, "
                    f"wanted {sorted(wanted)}\n{self.log_tail()}"
                )
            time.sleep(poll)

    def wait(self, job_id: int, timeout: float = 60.0, poll: float = 0.5) -> str:
        """Block until the job ends; returns its final state (``COMPLETED``, ``FAILED``, ...). A job still
        running at the timeout is cancelled, so it cannot hold the nodes through the next tests."""
        try:
            return self.wait_state(job_id, TERMINAL_STATES, timeout=timeout, poll=poll)
        except TimeoutError:
            subprocess.run(["scancel", "--signal=KILL", "--full", str(job_id)], env=self.env, capture_output=True,
                           timeout=30)
            subprocess.run(["scancel", str(job_id)], env=self.env, capture_output=True, timeout=30)
            raise

    def node_info(self, name: str) -> dict[str, str]:
        proc = self.run(["scontrol", "show", "node", "-o", name])
        return parse_scontrol(proc.stdout.splitlines()[0])

    def node_addr(self, name: str) -> str:
        """The address jobs use to reach node ``name`` (its NodeAddr: node names do not resolve)."""
        return self.node_info(name)["NodeAddr"]

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of every daemon log (for error messages)."""
        files = sorted(self.log_dir.glob("*.log")) + sorted(self.log_dir.glob("*.out"))
        return "\n".join(_tail(f, lines) for f in files if f.stat().st_size) or "(no daemon logs)"

    # ------------------------------------------------------------------ internals
    def _make_dirs(self) -> None:
        for sub in ("etc", "state", "run", "log", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
            (self.root / "tmp" / name).mkdir(parents=True, exist_ok=True)

    def _write_conf(self, mpi_default: str) -> None:
        r = self.root
        lines = [
            f"ClusterName=ptft{os.getpid()}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            f"TmpFS={r}/tmp/%n",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            f"MpiDefault={mpi_default}",
            "ReturnToService=2",
            # Fake nodes share the host: report the configured CPUs, not the real ones.
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "KillWait=2",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            "MessageTimeout=10",
        ]
        for name in self.node_names:
            lines.append(
                f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={self.node_ports[name]} "
                f"CPUs={self.cpus_per_node} RealMemory=16000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _pick_mpi_default(self) -> str:
        """``pmix`` if this SLURM has the PMIx plugin (``srun --mpi=list``), else ``none``."""
        proc = self.run(["srun", "--mpi=list"], check=False, timeout=15)
        text = proc.stdout + proc.stderr
        return "pmix" if re.search(r"\bpmix\b", text) else "none"

    def _munge_ok(self) -> bool:
        sock = f"--socket={self.munge_socket}"
        try:
            enc = subprocess.run(["munge", "-n", sock], capture_output=True, timeout=5)
            if enc.returncode != 0:
                return False
            dec = subprocess.run(["unmunge", sock], input=enc.stdout, capture_output=True, timeout=5)
            return dec.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        """A private munged: own random key (root-owned, 0400) and own socket (``AuthInfo=socket=``).

        Nothing is shared with a system munged, so stopping ours cannot break anyone else's cluster.
        munged wants every directory above its socket world-executable, which a pytest tmp dir is
        not (0700): the socket lives in a fresh ``/tmp/ptft-munge-*`` directory instead.
        """
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o700, exist_ok=True)
        key = mdir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._munge_dir = Path(tempfile.mkdtemp(prefix="ptft-munge-"))
        self._munge_dir.chmod(0o755)
        self.munge_socket = str(self._munge_dir / "munge.socket")
        self._munged = self._popen(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root}/run/munged.pid",
                f"--seed-file={mdir}/munged.seed",
                f"--log-file={self.log_dir}/munged.log",
            ],
        )
        deadline = time.monotonic() + 10
        while not self._munge_ok():
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not come up (exit {self._munged.poll()})\n{self.log_tail()}")
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._procs[name] = self._popen(name, argv)

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start a daemon in the foreground (so we hold its pid), output to ``log/<name>.out``."""
        out = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - stays open for the daemon's life
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C on pytest does not hit the daemons; stop() ends them
        )
        out.close()
        return proc

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} during start-up\n{self.log_tail()}")
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
            last = (proc.stdout + proc.stderr).strip()
            states = dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"SLURM nodes not idle after {timeout:.0f} s; last sinfo: {last!r}\n{self.log_tail()}")
            time.sleep(0.1)

    def _cancel_all_jobs(self, timeout: float) -> None:
        proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
        ids = proc.stdout.split()
        if not ids:
            return
        self.run(["scancel", *ids], check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
            if proc.returncode != 0 or not proc.stdout.split():
                return
            time.sleep(0.2)

    @staticmethod
    def _terminate(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A started 2-node ``SlurmCluster`` shared by the session; stopped at the end, whatever happens.

    Skips when SLURM is not installed or we are not root, unless ``PTFT_REQUIRE_SYSTEM=1``,
    which turns those skips into failures (CI; tests/system.py).
    """
    missing = [*missing_binaries(), *(["root"] if os.geteuid() != 0 else [])]
    require_system(missing, "the SLURM tests (a private test cluster)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
