"""The slurm/*.sbatch templates on a real 2-node SLURM cluster (n1, n2 on this host).

Jobs are submitted from a scratch directory (the templates find the checkout from their own path),
with the CPU overrides of the GPU defaults in their #SBATCH lines. Numbers are compared, not only
exit codes: steps per rank, checkpoint tags, final weights bitwise against an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.corpus_factory import make_corpus
from tests.pretrain.test_pretrain import TINY, assert_same_weights, losses, sample_ids
from tests.slurm_cluster import SlurmCluster, free_ports

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
PY = sys.executable
STEPS = 60  # ~80 ms a step here: long enough to signal mid-run, short next to the ~20 s start-up
# optim.betas=[0.5,0.5]: DeepSpeed's CPU Adam keeps beta^t as a float32 running product but restarts
# it with pow(beta, t) after a resume, so with betas 0.9/0.999 a run resumed after step 2, 5, 11, 13,
# 15, 18, 19-46, 50-59 differs from an uninterrupted one in the last bits (GPU FusedAdam computes it
# from the step every time). Powers of 0.5 are exact in float32: any stop step compares bitwise.
PRETRAIN = [*TINY, f"train.max_steps={STEPS}", "train.eval_every=20", "train.zero_stage=2", "optim.betas=[0.5,0.5]"]
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the templates' #SBATCH lines ask for GPUs
TWO_NODES = ["-N", "2", "--ntasks-per-node=1", *CPU]


# --------------------------------------------------------------------------- helpers


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    env = cluster.env
    env.update(
        PTFT_PYTHON=PY,
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
        # other sessions' test clusters number their jobs from 1 too: never the job-id port
        PTFT_MASTER_PORT=str(free_ports(1)[0]),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def submit(cluster: SlurmCluster, script: str, sbatch_args: list[str], script_args: list[str], *,
           env: dict[str, str], cwd: Path) -> int:
    """``sbatch SBATCH_ARGS slurm/<script> SCRIPT_ARGS`` from ``cwd`` (outside the checkout); the job id."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = cluster.run(["sbatch", "--parsable", *sbatch_args, str(SLURM_DIR / script), *script_args],
                       env=env, cwd=cwd)
    return int(proc.stdout.strip().split(";")[0])


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def train_steps(run_dir: Path) -> list[int]:
    m = run_dir / "metrics.jsonl"
    if not m.exists():
        return []
    out = []
    for line in m.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if rec.get("split") == "train":
            out.append(rec["step"])
    return out


def rank_steps(run_dir: Path) -> dict[int, list[int]]:
    """Rank → the steps it logged in sample_ids/rank{R}.jsonl (in order)."""
    out = {}
    for f in sorted((run_dir / "sample_ids").glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]
    return out


def pretrain_env(cluster: SlurmCluster, corpus: Path, run_dir: Path, **extra: str) -> dict[str, str]:
    return job_env(cluster, PTFT_CONFIG="configs/pretrain/tiny-cpu.yaml", PTFT_CORPUS=str(corpus),
                   PTFT_RUN_DIR=str(run_dir), **extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_jobs_corpus")
    make_corpus(root, shard_docs=(40, 25, 50, 30), val_docs=(12,), sentences=(2, 10), n_words=(4, 14))
    return root


@pytest.fixture(scope="module")
def reference(slurm_cluster, corpus, tmp_path_factory) -> tuple[int, Path]:
    """An uninterrupted `sbatch -N 2 slurm/pretrain.sbatch` run (one rank per node)."""
    base = tmp_path_factory.mktemp("pretrain_ref")
    run_dir = base / "run"
    job = submit(slurm_cluster, "pretrain.sbatch", TWO_NODES, PRETRAIN,
                 env=pretrain_env(slurm_cluster, corpus, run_dir), cwd=base / "submit")
    state = slurm_cluster.wait(job, timeout=300)
    assert state == "COMPLETED", text(run_dir / "slurm" / str(job) / "job.log")[-4000:]
    return job, run_dir


# --------------------------------------------------------------------------- pretrain


def test_two_node_pretrain_job(slurm_cluster, reference):
    job, run_dir = reference
    log_dir = run_dir / "slurm" / str(job)
    log = text(log_dir / "job.log")
    # one rank per node, on both nodes
    assert "2 ranks on" in log and "n1: rank 0" in log and "n2: rank 1" in log, log[-3000:]
    # every global step ran once, on both ranks
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    per_rank = rank_steps(run_dir)
    assert sorted(per_rank) == [0, 1]
    assert per_rank[0] == per_rank[1] == list(range(1, STEPS + 1))
    ids = sample_ids(run_dir)
    # 2 ranks x micro-batch 4 = 8 distinct samples a step (fewer only where an epoch ends)
    assert all(len(set(v)) == len(v) <= 8 for v in ids.values())
    assert sum(len(v) == 8 for v in ids.values()) >= STEPS - 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    # the per-job record
    rec = log_dir / "restart-0"
    for name in ("env.txt", "git.txt", "pip-freeze.txt", "job.txt", "launch.txt", "resolved_config.yaml"):
        assert (rec / name).is_file() and (rec / name).stat().st_size, name
    assert re.search(r"^revision: [0-9a-f]{40}$", text(rec / "git.txt"), re.M)
    assert re.search(r"^torch==", text(rec / "pip-freeze.txt"), re.M | re.I)
    assert "SLURM_JOB_ID=" in text(rec / "env.txt")
    assert re.search(r"^srun --kill-on-bad-exit=1 --mpi none --label \S+python\S* -u -m ptft_dist.cli pretrain ",
                     text(rec / "launch.txt"), re.M), text(rec / "launch.txt")
    events = text(log_dir / "events.log")
    assert "restart=0" in events and f"step exit=0 latest=step_{STEPS}" in events and "finished" in events
    assert "restart=1" not in events
    assert slurm_cluster.job_info(job)["Restarts"] == "0"
    # the --output file only points at the log dir
    out = text(run_dir.parent / "submit" / f"ptft-pretrain-{job}.out")
    assert f"logging to {log_dir}/job.log" in out


def test_usr1_checkpoints_requeues_and_resumes_bitwise(slurm_cluster, corpus, reference, tmp_path):
    _, ref_dir = reference
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, "pretrain.sbatch", TWO_NODES, PRETRAIN,
                 env=pretrain_env(slurm_cluster, corpus, run_dir), cwd=tmp_path / "submit")
    log_dir = run_dir / "slurm" / str(job)
    deadline = time.monotonic() + 300
    while len(train_steps(run_dir)) < 3:
        assert time.monotonic() < deadline, "no training steps in time\n" + text(log_dir / "job.log")[-3000:]
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING"), text(log_dir / "job.log")[-3000:]
        time.sleep(0.05)
    signalled_at = train_steps(run_dir)[-1]
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    # the batch shell forwards USR1 to the ranks, they save and exit 124, the shell requeues
    slurm_cluster.wait_state(job, {"PENDING"}, timeout=120, poll=0.2)
    events = text(log_dir / "events.log")
    # the step's status is 124, or 143 when srun's --kill-on-bad-exit ended the slower rank after the
    # first one exited 124 (the template then goes by srun's per-task report)
    m = re.search(r"restart=0 .*step exit=(124|143) latest=step_(\d+)", events)
    assert m, events + text(log_dir / "job.log")[-3000:]
    saved = int(m.group(2))
    if m.group(1) == "143":
        assert "the first task to fail exited 124 (srun then ended the rest): using 124" in events
    assert signalled_at <= saved < STEPS
    assert "signal USR1" in events and "requeue (next restart=1 resumes from step_" in events
    # held ~2 min after a requeue: release it now, but not within the second of the requeue: slurmd
    # refuses a job whose credential it revoked in that same second ("Job credential revoked")
    time.sleep(2)
    slurm_cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    state = slurm_cluster.wait(job, timeout=300)
    log = text(log_dir / "job.log")
    assert state == "COMPLETED", log[-4000:]
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    events = text(log_dir / "events.log")
    assert re.search(r"restart=1 host=\S+ start ", events), events  # the rerun saw SLURM_RESTART_COUNT=1
    assert re.search(rf"restart=1 .*step exit=0 latest=step_{STEPS}", events), events
    assert (log_dir / "restart-1" / "env.txt").is_file()
    assert "SLURM_RESTART_COUNT=1" in text(log_dir / "restart-1" / "env.txt")
    assert f"saved step {saved}, exiting with 124" in log
    assert f"resumed from {run_dir}/checkpoints/step_{saved} at step {saved}" in log
    # the same run as if nothing had happened
    assert_same_weights(run_dir, ref_dir)
    assert losses(run_dir) == losses(ref_dir)
    assert sample_ids(run_dir) == sample_ids(ref_dir)
    per_rank = rank_steps(run_dir)  # both ranks redid nothing and skipped nothing
    assert per_rank[0] == per_rank[1] == list(range(1, STEPS + 1))


def test_deepspeed_launcher_template_one_task_per_node(slurm_cluster, corpus, reference, tmp_path):
    _, ref_dir = reference
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, "pretrain_deepspeed.sbatch", ["-N", "2", *CPU], PRETRAIN,
                 env=pretrain_env(slurm_cluster, corpus, run_dir, PTFT_NPROC_PER_NODE="1"), cwd=tmp_path / "submit")
    state = slurm_cluster.wait(job, timeout=300)
    log_dir = run_dir / "slurm" / str(job)
    log = text(log_dir / "job.log")
    assert state == "COMPLETED", log[-4000:]
    assert "--no_ssh" in text(log_dir / "restart-0" / "launch.txt")
    assert "launcher deepspeed" in log and "node_rank=1" in log
    assert rank_steps(run_dir) == {0: list(range(1, STEPS + 1)), 1: list(range(1, STEPS + 1))}
    assert_same_weights(run_dir, ref_dir)  # same world size and global batch as the srun run


def test_inconsistent_layout_fails_before_init(slurm_cluster, corpus, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, "pretrain.sbatch", ["-N", "2", "--ntasks=3", "--ntasks-per-node=2", *CPU], PRETRAIN,
                 env=pretrain_env(slurm_cluster, corpus, run_dir), cwd=tmp_path / "submit")
    state = slurm_cluster.wait(job, timeout=180)
    log_dir = run_dir / "slurm" / str(job)
    log = text(log_dir / "job.log")
    assert state == "FAILED", log
    # every rank stops at dist.py's layout check, before any connection
    assert "ptft: error: inconsistent SLURM layout: 3 tasks != 2 nodes x 2 tasks per node" in log, log
    assert "ranks on" not in log and "DeepSpeed" not in log  # nothing connected, no engine built
    assert not (run_dir / "checkpoints").exists()
    events = text(log_dir / "events.log")
    assert "failed exit=2" in events and "requeue" not in events
    assert slurm_cluster.job_info(job)["ExitCode"].startswith("2:")


# --------------------------------------------------------------------------- finetune grid

STAND_IN = textwrap.dedent(
    """\
    # Stand-in for `ptft finetune`: writes results.json shaped like the real one.
    import json, sys
    from pathlib import Path

    args = sys.argv[1:]
    config = args[args.index("--config") + 1]
    kv = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    if "fail" in config:
        sys.exit("stand-in: this row fails on purpose")
    out = Path(kv["finetune.output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    acc = 0.5 + int(kv["train.seed"]) / 100 + float(kv["finetune.lr"]) * 1000
    results = {"method": "full", "validation": {"accuracy": acc},
               "test": {"accuracy": acc - 0.01, "macro_f1": acc - 0.02}}
    (out / "results.json").write_text(json.dumps(results))
    print("stand-in", Path(config).name, kv["train.seed"], kv["finetune.lr"], kv.get("finetune.epochs"))
    """
)


def test_finetune_array_and_summary(slurm_cluster, tmp_path):
    stand_in = tmp_path / "finetune_standin.py"
    stand_in.write_text(STAND_IN)
    grid = tmp_path / "grid.tsv"
    grid.write_text(
        "config\tseed\tlr\tfinetune.epochs\tnote\n"
        "# a comment line, then a blank one\n\n"
        "configs/sst2.yaml\t1\t2e-5\t3\tfirst\n"
        "configs/sst2.yaml\t2\t2e-5\t\t\n"
        "configs/fail.yaml\t1\t3e-5\t2\tbroken on purpose\n"
    )
    out = tmp_path / "out"
    env = job_env(slurm_cluster, PTFT_GRID=str(grid), PTFT_OUT=str(out), PTFT_FINETUNE_CMD=f"python {stand_in}")
    # `bash slurm/finetune.sbatch` submits itself as an array (one task per row) plus a summary job
    proc = slurm_cluster.run(["bash", str(SLURM_DIR / "finetune.sbatch"), "--gpus-per-task=0", "--cpus-per-task=1",
                              "--", "extra.flag=1"], env=env, cwd=tmp_path)
    array = int(re.search(r"submitted array job (\d+)", proc.stdout).group(1))
    summary = int(re.search(r"submitted summary job (\d+)", proc.stdout).group(1))
    assert "3 rows" in proc.stdout
    assert slurm_cluster.wait(summary, timeout=180) == "COMPLETED", text(out / f"summary-{summary}.log")
    rows = {p.parent.name: json.loads(p.read_text()) for p in (out / "slurm").glob("row-*/row.json")}
    assert sorted(rows) == ["row-000", "row-001", "row-002"]
    assert [rows[r]["state"] for r in sorted(rows)] == ["completed", "completed", "failed"]
    assert rows["row-000"]["array_job_id"] == str(array)
    assert rows["row-000"]["overrides"] == ["train.seed=1", "finetune.lr=2e-5", "finetune.epochs=3"]
    assert rows["row-001"]["overrides"] == ["train.seed=2", "finetune.lr=2e-5"]  # empty cell: not passed
    log0 = text(out / "slurm" / "row-000" / "job.log")
    assert "stand-in sst2.yaml 1 2e-5 3" in log0
    assert "extra.flag=1" in text(out / "slurm" / "row-000" / "command.txt")
    assert "this row fails on purpose" in text(out / "slurm" / "row-002" / "job.log")
    md = text(out / "summary.md")
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in md.splitlines()
             if ln.startswith("| row-")}
    header = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| row |")).split("|")[1:-1]]
    assert header == ["row", "config", "seed", "lr", "method", "state", "validation.accuracy", "test.accuracy",
                      "test.macro_f1"]
    assert lines["row-000"] == ["row-000", "configs/sst2.yaml", "1", "2e-5", "full", "ok", "0.5300", "0.5200", "0.5100"]
    assert lines["row-001"] == ["row-001", "configs/sst2.yaml", "2", "2e-5", "full", "ok", "0.5400", "0.5300", "0.5200"]
    assert lines["row-002"][5] == "failed (exit 1)"
    assert "| configs/sst2.yaml | 2e-5 | full | 2 | 0.5350 ± 0.0071 |" in md  # mean ± std over the two seeds
    tsv = text(out / "summary.tsv").splitlines()
    assert tsv[0].split("\t")[:4] == ["row", "config", "seed", "lr"] and len(tsv) == 4


def _finetune_assets(root: Path) -> Path:
    """A tiny BERT, a separable two-label task and a config (the ones tests/finetune/ use)."""
    import random

    import yaml
    from transformers import AutoTokenizer

    from ptft_dist.config import TokenizerConfig
    from ptft_dist.corpus.tokenizer import train_wordpiece
    from tests.finetune.test_finetune import sentence, tiny_model, write_tsv

    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 320, 1), ("validation", 64, 2), ("test", 64, 3)):
        write_tsv(root / f"{split}.tsv", n, seed)
    rng = random.Random(0)
    train_wordpiece([sentence(rng, lab) for lab in ["pos", "neg"] * 200], root / "tok",
                    TokenizerConfig(vocab_size=200, min_frequency=1))
    tiny_model(root / "model", root / "tok", len(AutoTokenizer.from_pretrained(str(root / "tok"))))
    config = {"finetune": {"model": str(root / "model"), "train_file": str(root / "train.tsv"),
                           "validation_file": str(root / "validation.tsv"), "test_file": str(root / "test.tsv"),
                           "max_seq_len": 32, "batch_size": 16},
              # betas 0.5: bitwise resume under DeepSpeed's CPU Adam (see PRETRAIN above)
              "train": {"backend": "deepspeed", "zero_stage": 2, "log_every": 1}, "optim": {"betas": [0.5, 0.5]}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root / "tiny.yaml"


def test_real_finetune_grid_with_a_preempted_row(slurm_cluster, tmp_path):
    """`ptft finetune` itself, two identical rows: row 1 gets USR1 mid-run, saves, exits 124, is requeued
    and resumes; it ends with row 0's numbers and best/ bitwise, and the summary shows both."""
    from safetensors.torch import load_file

    config = _finetune_assets(tmp_path / "assets")
    grid = tmp_path / "grid.tsv"
    grid.write_text("config\tseed\tlr\tfinetune.epochs\tnote\n"
                    f"{config}\t7\t2e-3\t3\tuninterrupted\n{config}\t7\t2e-3\t3\tpreempted\n")
    out = tmp_path / "out"
    env = job_env(slurm_cluster, PTFT_GRID=str(grid), PTFT_OUT=str(out))
    proc = slurm_cluster.run(["bash", str(SLURM_DIR / "finetune.sbatch"), "--gpus-per-task=0", "--cpus-per-task=1"],
                             env=env, cwd=tmp_path)
    array = int(re.search(r"submitted array job (\d+)", proc.stdout).group(1))
    summary = int(re.search(r"submitted summary job (\d+)", proc.stdout).group(1))
    task, rec = f"{array}_1", out / "slurm" / "row-001"
    deadline = time.monotonic() + 300
    while len(train_steps(out / "row-001")) < 3:
        assert time.monotonic() < deadline, "no training steps in time\n" + text(rec / "job.log")[-3000:]
        assert slurm_cluster.job_state(task) in ("PENDING", "RUNNING"), text(rec / "job.log")[-3000:]
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", task])
    slurm_cluster.wait_state(task, {"PENDING"}, timeout=180, poll=0.2)
    events = text(rec / "events.log")
    m = re.search(r"end row-001 exit=124 latest=step_(\d+)", events)
    assert m and "signal USR1" in events, events + text(rec / "job.log")[-3000:]
    saved = int(m.group(1))
    assert f"requeue {task} (next restart=1 resumes from step_{saved})" in events  # this task, not the array
    assert 3 <= saved < 60
    row = json.loads((rec / "row.json").read_text())
    assert (row["state"], row["exit_code"]) == ("requeued", 124)
    time.sleep(2)  # not within the second of the requeue (see test_usr1_checkpoints_requeues_and_resumes_bitwise)
    slurm_cluster.run(["scontrol", "update", f"JobId={task}", "StartTime=now"])
    assert slurm_cluster.wait(summary, timeout=400) == "COMPLETED", text(out / f"summary-{summary}.log")
    log = text(rec / "job.log")
    assert slurm_cluster.job_state(task) == "COMPLETED" and slurm_cluster.job_info(task)["Restarts"] == "1", log[-3000:]
    assert f"saved step {saved}, exiting with 124 for requeue" in log
    assert f"resumed from {out}/row-001/checkpoints/step_{saved} at step {saved}" in log
    assert "finetune.resume=auto" in text(rec / "command.txt")
    # the other row never saw the signal nor the requeue
    assert slurm_cluster.job_info(f"{array}_0")["Restarts"] == "0"
    assert "restart=1" not in text(out / "slurm" / "row-000" / "events.log")
    # the preempted row ends exactly where the uninterrupted one did
    r0, r1 = (json.loads((out / r / "results.json").read_text()) for r in ("row-000", "row-001"))
    for key in ("validation", "test", "history", "best_epoch", "steps"):
        assert r1[key] == r0[key], key
    assert r0["validation"]["accuracy"] >= 0.9 and r0["steps"] == 60
    w0, w1 = (load_file(str(out / r / "best" / "model.safetensors")) for r in ("row-000", "row-001"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not (out / "row-001" / "checkpoints").exists()
    # the summary table holds each run's results.json numbers
    md = text(out / "summary.md")
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in md.splitlines()
             if ln.startswith("| row-")}
    header = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| row |")).split("|")[1:-1]]
    for name, r in (("row-000", r0), ("row-001", r1)):
        got = dict(zip(header, cells[name]))
        assert got["state"] == "ok" and got["method"] == "full" and got["seed"] == "7"
        for split in ("validation", "test"):
            for metric, value in r[split].items():
                assert got[f"{split}.{metric}"] == f"{value:.4f}", (name, split, metric)
    tsv = [line.split("\t") for line in text(out / "summary.tsv").splitlines()]
    row0 = dict(zip(tsv[0], next(t for t in tsv if t[0] == "row-000")))
    assert float(row0["test.accuracy"]) == r0["test"]["accuracy"] and float(row0["test.loss"]) == r0["test"]["loss"]
    assert f"| {config} | 2e-3 | full | 2 | {r0['validation']['accuracy']:.4f} ± 0.0000 |" in md


# --------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("mode", ["local", "slurm"])
def test_prepare_job_makes_a_verified_corpus(slurm_cluster, tmp_path, mode):
    from ptft_dist.corpus import format as sh
    from tests.text_factory import documents

    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(60)))
    out = tmp_path / "corpus"
    env = job_env(slurm_cluster, PTFT_INPUT=str(src), PTFT_OUTPUT=str(out), PTFT_PREPARE_MODE=mode,
                  PTFT_POLL_SECONDS="1")
    extra = ["prepare.tokenizer.vocab_size=600", "prepare.validation_fraction=0.05"]
    if mode == "slurm":
        extra += ["prepare.workers=2", "prepare.slurm_mem_per_cpu_mb=100"]
        args = ["--cpus-per-task=1"]
    else:
        args = ["--cpus-per-task=2"]
    job = submit(slurm_cluster, "prepare.sbatch", args, extra, env=env, cwd=tmp_path / "submit")
    state = slurm_cluster.wait(job, timeout=240)
    log = text(Path(f"{out}.slurm") / str(job) / "job.log")
    assert state == "COMPLETED", log[-4000:]
    assert sh.verify_corpus(out) == []
    assert f"OK   {out}: " in log and "corpus ready" in log
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["read"]["documents"] == 60
    if mode == "slurm":
        assert "submitted 8 dependent SLURM jobs" in log and "the chain finished" in log
        assert list((out / ".prepare" / "slurm_logs" / "ingest").glob("*_1.out"))  # a real 2-task array
        # the chain of array jobs writes the corpus a local prepare writes (the same documents)
        from ptft_dist.cli import main
        from tests.corpus.test_prepare import corpus_texts

        local = tmp_path / "local"
        assert main(["prepare", "-i", str(src), "-o", str(local), "prepare.workers=1", *extra[:2]]) == 0
        assert sorted(corpus_texts(out)) == sorted(corpus_texts(local))
    else:
        assert "with 2 worker process(es)" in log
