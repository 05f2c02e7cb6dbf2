"""Two "hosts" on one machine (network namespaces joined by a veth pair, each with an sshd), shared by
the tests that need a real network between ranks: the launcher tests (tests/launch/test_launch.py:
pdsh, OpenMPI across hosts) and the planner's step-time checks (tests/plan/test_network.py: the
link rate-limited with ``tc``). ``base_env`` is the clean launcher environment both start from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.system import require_system

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

_DROP = ("SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_")
_DROP_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}


def base_env(**over: str) -> dict[str, str]:
    """This process's environment without any launcher/job variables, the GPU count pinned to 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP) and k not in _DROP_NAMES}
    env = {k: v for k, v in env.items() if not k.startswith("PTFT_")}
    env.update(
        PTFT_PYTHON=PY,
        PTFT_NUM_GPUS="0",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    )
    env.update(over)
    return env




class TwoHosts:
    """Two "hosts" on this machine: network + UTS + mount namespaces joined by a veth pair (``ptft0`` on
    both sides), each with its own hostname, /etc/hosts and an sshd that accepts one test key.

    ``ssh`` on the PATH of ``env()`` is a wrapper using a private ssh_config (the real ~/.ssh is not
    touched). Only the namespaces, links and daemons made here are removed by ``stop()``. DeepSpeed's
    pdsh runner runs ``pkill -f`` on every host when it is interrupted, and the namespaces share one
    process table: the launcher is never interrupted here (a timeout kills it with SIGKILL).
    """

    NAMES = ("hosta", "hostb")
    IFNAME = "ptft0"

    def __init__(self, root: Path, subnet: str = "10.213.7"):
        self.root = root
        tag = f"{os.getpid() % 100000}"
        self.netns = [f"ptft{tag}a", f"ptft{tag}b"]
        self.veth = [f"pa{tag}", f"pb{tag}"]
        self.addrs = [f"{subnet}.1", f"{subnet}.2"]
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    @staticmethod
    def _sh(*args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=30)

    def start(self) -> TwoHosts:
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        key = r / "id_ed25519"
        self._sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        (r / "authorized_keys").write_text((r / "id_ed25519.pub").read_text())
        hosts = "".join(f"{a} {n}\n" for a, n in zip(self.addrs, self.NAMES, strict=True))
        (r / "hosts").write_text("127.0.0.1 localhost\n" + hosts)
        (r / "resolv.conf").write_text("")
        (r / "ssh_config").write_text(
            f"Host *\n  IdentityFile {key}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n  BatchMode yes\n  ConnectTimeout 5\n"
        )
        (r / "bin").mkdir(exist_ok=True)
        wrapper = r / "bin" / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {r}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        for ns in self.netns:
            self._sh("ip", "netns", "add", ns)
            self.made.append(ns)
        self._sh("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.netns, self.veth, self.addrs, strict=True):
            self._sh("ip", "link", "set", veth, "netns", ns)
            self._sh("ip", "-n", ns, "link", "set", veth, "name", self.IFNAME)
            self._sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFNAME)
            self._sh("ip", "-n", ns, "link", "set", self.IFNAME, "up")
            self._sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, name, addr in zip(self.netns, self.NAMES, self.addrs, strict=True):
            run = r / f"run-{name}"  # a private /run (sshd wants /run/sshd)
            (run / "sshd").mkdir(parents=True, exist_ok=True)
            hostkey = r / f"hostkey-{name}"
            self._sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey))
            cfg = r / f"sshd_config-{name}"
            cfg.write_text(
                f"Port 22\nListenAddress {addr}\nHostKey {hostkey}\nAuthorizedKeysFile {r}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                f"UsePAM no\nStrictModes no\nPidFile {run}/sshd.pid\nPrintMotd no\nMaxStartups 100\nMaxSessions 100\n"
            )
            boot = (
                f"hostname {name} && mount --bind {r}/hosts /etc/hosts && mount --bind {r}/resolv.conf "
                f"/etc/resolv.conf && mount --bind {run} /run && exec /usr/sbin/sshd -D -e -f {cfg}"
            )
            with open(r / f"sshd-{name}.log", "ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        ["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--propagation", "private"]
                        + ["bash", "-c", boot],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
        for name in self.NAMES:
            deadline = time.monotonic() + 20
            while True:
                proc = self.run_on(0, ["ssh", name, "hostname"], timeout=10)
                if proc.returncode == 0 and proc.stdout.strip() == name:
                    break
                if time.monotonic() > deadline:
                    log = (r / f"sshd-{name}.log").read_text(errors="replace")
                    raise RuntimeError(f"sshd on {name} did not answer: {proc.stderr}\n{log}")
                time.sleep(0.2)
        return self

    def env(self, **over: str) -> dict[str, str]:
        env = base_env(GLOO_SOCKET_IFNAME=self.IFNAME, **over)
        env["PATH"] = f"{self.root}/bin{os.pathsep}{env['PATH']}"
        return env

    def command_on(self, host: int, argv: list[str], cwd=None) -> list[str]:
        """``argv`` wrapped to run on host ``host`` (0 or 1): inside its network, UTS and mount namespaces."""
        # nsenter --mount would otherwise move to the target's working directory ("/")
        wd = [f"--wd={cwd or os.getcwd()}"]
        return ["nsenter", f"--target={self.procs[host].pid}", "--net", "--uts", "--mount", *wd, "--", *argv]

    def run_on(self, host: int, argv: list[str], *, env=None, cwd=None, timeout: float = 60):
        """Run ``argv`` on host ``host`` (0 or 1) and wait for it."""
        cmd = self.command_on(host, argv, cwd)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or self.env())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory):
    missing = [b for b in ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "pdsh", "mpirun") if not shutil.which(b)]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("sshd")
    if os.geteuid() != 0:
        missing.append("root")
    require_system(missing, "the two-host tests (network namespaces, ssh, pdsh, OpenMPI)")
    hosts = TwoHosts(tmp_path_factory.mktemp("twohosts"))
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def shape_link(hosts: TwoHosts, rate: str | None, burst: str = "32kbit", latency: str = "50ms") -> None:
    """Rate-limit both directions of the link between the hosts with a token bucket (``tc ... tbf``:
    netem is not available on every kernel), or remove the limit (``rate=None``)."""
    for ns in hosts.netns:
        if rate is None:
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", hosts.IFNAME, "root"], capture_output=True,
                           timeout=30)
        else:
            TwoHosts._sh("tc", "-n", ns, "qdisc", "replace", "dev", hosts.IFNAME, "root", "tbf", "rate", rate,
                         "burst", burst, "latency", latency)
