"""Step time over a real, rate-limited network: predicted vs measured within 20% at every rate.

Two "hosts" (network namespaces + sshd, tests/netns_hosts.py) run one rank each under DeepSpeed's
pdsh launcher (launch.sh), ZeRO-2 (the shipped default), gloo over TCP; between timed phases the test
rate-limits the veth link on both sides with ``tc ... tbf`` (50, 100, 200 Mbit). The
compute part of the prediction is calibrated from a one-host ``ptft pretrain`` run of the same model
and ranks in the same test (``ptft plan --calibrate RUN_DIR``; its own loopback communication taken
out); the communication part is the planner's own
(bytes per step per stage over the link's rate, gloo's measured per-collective efficiency). The
model (3.5M parameters, 4 x 32 tokens per step) is sized so that communication dominates at every
rate: compute on the shared 2-core CI machine varies by 2x from minute to minute with other jobs'
load, which a compute-bound setting (1 Gbit: docs/scaling.md) would turn into the test's verdict.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from ptft_dist.dist.discover import free_port
from tests.corpus_factory import make_corpus
from tests.netns_hosts import TwoHosts, base_env, shape_link
from tests.system import require_system

REPO = Path(__file__).resolve().parents[2]
LAUNCH = str(REPO / "launch.sh")
# CI checks the two ends of the range; the extended run (PTFT_EXTENDED=1) the middle too (-1.8% measured)
RATES = ("50mbit", "100mbit", "200mbit") if os.environ.get("PTFT_EXTENDED") == "1" else ("50mbit", "200mbit")
STEPS = 4
TOLERANCE = 0.20
MODEL = ["model.preset=mini", "model.hidden_size=256", "model.num_hidden_layers=4", "model.num_attention_heads=4",
         "model.intermediate_size=1024", "data.max_seq_len=32", "data.short_seq_prob=0", "data.num_workers=0",
         "train.micro_batch_size=4", "train.grad_accum=1", "train.zero_stage=2", "train.precision=fp32",
         "train.eval_every=0", "optim.warmup_steps=1", "checkpoint.every=0"]


def _calibration_run(overrides: list[str], run_dir: Path) -> None:
    """One host, two ranks (the two "hosts" share this machine's cores too): ``ptft pretrain`` itself
    under the deepspeed launcher; its metrics.jsonl is what ``ptft plan --calibrate`` reads."""
    prog = ["ptft", "pretrain", *overrides, f"train.run_dir={run_dir}", "train.max_steps=24", "train.log_every=2"]
    cmd = [LAUNCH, "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--", *prog]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=900, cwd=run_dir.parent)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def _wait(paths: list[Path], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"the 2-host run ended early or hung (status {proc.poll()}): {tail}")
        time.sleep(0.1)


def _two_host_run(hosts: TwoHosts, overrides: list[str], work: Path) -> list[dict]:
    """Both ranks take STEPS timed steps per rate; the link is reshaped between phases."""
    hostfile = work / "hostfile"
    hostfile.write_text("hosta slots=1\nhostb slots=1\n")
    pause, out = work / "pause", work / "out"
    prog = ["python", str(REPO / "tests/plan/plan_job.py"), "--out", str(out), "--steps", str(STEPS),
            "--phases", str(len(RATES)), "--pause-file", str(pause), "--warmup", "2", *overrides,
            f"train.run_dir={work / 'run2'}", "train.max_steps=100"]
    argv = [LAUNCH, "deepspeed", "--hostfile", str(hostfile), "--", *prog]
    log = work / "two-host.log"
    with open(log, "w") as sink:  # a file, not a pipe: the launcher's output must never block it
        proc = subprocess.Popen(hosts.command_on(0, argv, cwd=work), env=hosts.env(), stdout=sink,
                                stderr=subprocess.STDOUT, text=True)
        try:
            for k, rate in enumerate(RATES):
                _wait([Path(f"{pause}.{k}.ready.{r}") for r in (0, 1)], proc, log, timeout=600 if k == 0 else 240)
                shape_link(hosts, rate)
                Path(f"{pause}.{k}.go").write_text(rate)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()  # SIGKILL: the pdsh runner must not be interrupted (tests/netns_hosts.py)
                proc.wait(30)
            shape_link(hosts, None)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _predicted_step_s(overrides: list[str], rate: str, run_dir: Path) -> float:
    from ptft_dist.config import load_config
    from ptft_dist.plan.planner import PlanRequest, make_plan

    req = PlanRequest(nodes=2, gpus_per_node=1, gpu="cpu", interconnect=rate, calibrate=str(run_dir))
    return make_plan(load_config(None, overrides), req)["configured"]["step_s"]


@pytest.mark.slow
@pytest.mark.distributed
def test_step_time_over_rate_limited_links(two_hosts: TwoHosts, tmp_path: Path):
    require_system([] if shutil.which("tc") else ["tc (iproute2)"], "the planner's network step-time check")
    make_corpus(tmp_path / "corpus", shard_docs=(30, 30), val_docs=(4,), sentences=(20, 40), n_words=(8, 16))
    overrides = [*MODEL, f"data.corpus={tmp_path / 'corpus'}", f"data.cache_dir={tmp_path / 'cache'}"]
    _calibration_run(overrides, tmp_path / "run1")
    ranks = _two_host_run(two_hosts, overrides, tmp_path)
    assert sorted(r["host"] for r in ranks) == ["hosta", "hostb"]
    rows = []
    for k, rate in enumerate(RATES):
        # a step ends when the slower rank ends it
        measured = statistics.median(max(r["phases_s"][k][i] for r in ranks) for i in range(STEPS))
        predicted = _predicted_step_s(overrides, rate, tmp_path / "run1")
        rows.append((rate, measured, predicted))
        print(f"{rate:>8}: measured {measured:.3f} s/step, predicted {predicted:.3f} s ({predicted / measured - 1:+.1%})")
    for _rate, measured, predicted in rows:
        assert abs(predicted / measured - 1) <= TOLERANCE, rows
    assert rows[0][1] > 2.5 * rows[-1][1], rows  # communication matters: 50 Mbit is far slower than 200 Mbit
