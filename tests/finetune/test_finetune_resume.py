"""``ptft finetune`` survives preemption like pretraining (finetune/resume.py; docs/design.md, guarantee 6).

Real signals to a real 2-rank run (deepspeed launcher, ZeRO-2 over gloo), on a tiny BERT with
dropout (so the RNG states matter): a save that fails after a signal still exits with the requeue
code and leaves the previous checkpoint ``latest``; SIGTERM saves and exits 124; the resumed runs
end with the same results.json metrics, metrics.jsonl losses and ``best/`` weights (bitwise) as an
uninterrupted run. Bad resumes fail with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.finetune.test_finetune import N_TRAIN, _env, _port, sentence, write_tsv

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = N_TRAIN // 16  # 2 ranks x batch 8
EPOCHS = 3
EVERY = 10  # checkpoints at steps 10 (inside epoch 1), 20 (epoch 1's end, after its validation), 30, 40
# DeepSpeed's CPU Adam restarts beta^t as pow(beta, t) after a resume (tests/pretrain/test_pretrain.py,
# TINY): powers of 0.5 are exact in float32, so a resumed run compares bitwise wherever it stopped.
BETAS = "optim.betas=[0.5,0.5]"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    import random

    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    from ptft_dist.config import TokenizerConfig
    from ptft_dist.corpus.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("ft_resume")
    write_tsv(root / "train.tsv", N_TRAIN, 1)
    write_tsv(root / "validation.tsv", 64, 2)
    write_tsv(root / "test.tsv", 64, 3)
    rng = random.Random(0)
    train_wordpiece([sentence(rng, lab) for lab in ["pos", "neg"] * 200], root / "tok",
                    TokenizerConfig(vocab_size=200, min_frequency=1))
    cfg = BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(str(root / "tok"))), hidden_size=64,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.1)
    torch.manual_seed(0)
    BertForPreTraining(cfg).save_pretrained(str(root / "model"))
    for f in (root / "tok").iterdir():
        (root / "model" / f.name).write_bytes(f.read_bytes())
    config = {"finetune": {"model": str(root / "model"), "train_file": str(root / "train.tsv"),
                           "validation_file": str(root / "validation.tsv"), "test_file": str(root / "test.tsv"),
                           "max_seq_len": 32, "epochs": EPOCHS, "lr": 2.0e-3, "batch_size": 8},
              "train": {"backend": "deepspeed", "zero_stage": 2, "seed": 7, "log_every": 1}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def command(assets: Path, out: Path, *overrides: str, nproc: int = 2) -> list[str]:
    args = ["-m", "ptft_dist.cli", "finetune", "--config", str(assets / "config.yaml"),
            f"finetune.output_dir={out}", BETAS, *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    # the deepspeed launcher exits with its ranks' status (torchrun turns every failure into 1)
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port", str(_port()),
            "--module", *args[1:]]


def run(assets: Path, out: Path, *overrides: str, expect: int = 0, nproc: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(assets, out, *overrides, nproc=nproc), env=_env(), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def train_losses(out: Path) -> dict[int, float]:
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in steps if r["split"] == "train"]
    assert len(train) == len(dict(train)), "a step was logged twice"
    return dict(train)


def best_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "best" / "model.safetensors"))


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(assets) -> Path:
    """The uninterrupted 2-rank run (no checkpoints: the default finetune.checkpoint_every=0)."""
    out = assets / "reference"
    run(assets, out)
    assert not (out / "checkpoints").exists()
    return out


def _ranks(launcher: subprocess.Popen) -> dict[int, int]:
    """Rank → pid of the launcher's ranks."""
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            r = child.environ().get("RANK")
            if r is not None and "ptft_dist.cli" in " ".join(child.cmdline()):
                found[int(r)] = child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def interrupt(assets: Path, out: Path, at_step: int, sig: int, ranks: tuple[int, ...], *overrides: str,
              env: dict | None = None) -> str:
    """Start a 2-rank run, send ``sig`` to ``ranks`` once step ``at_step`` is logged; the run's stderr."""
    log_path = out.parent / f"{out.name}-{at_step}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(assets, out, *overrides), env={**_env(), **(env or {})}, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 900  # start-up alone takes minutes on a busy host
    while not (metrics.exists() and any(json.loads(x)["step"] >= at_step for x in metrics.read_text().splitlines()
                                        if x.endswith("}"))):
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    pids = _ranks(proc)
    for r in ranks:
        os.kill(pids[r], sig)
    assert proc.wait(timeout=180) == 124, log_path.read_text()[-3000:]
    return log_path.read_text()


@pytest.mark.timeout(1800)  # 4 two-rank runs: ~4 min on 2 idle cores, far more on a shared machine
def test_preempted_twice_then_resumed_equals_the_uninterrupted_run(assets, reference, tmp_path, capsys):
    out = tmp_path / "run"
    # 1. SIGUSR1 to rank 1 only, and the save after it fails on rank 1: still exit 124, latest untouched
    log = interrupt(assets, out, EVERY + 2, signal.SIGUSR1, (1,), f"finetune.checkpoint_every={EVERY}",
                    env={"PTFT_FAIL_PREEMPTION_SAVE": "1"})
    kept = latest(out)
    assert kept in ("step_10", "step_20"), log[-2000:]
    line = next(x for x in log.splitlines() if "signal received; could not save step" in x)
    stopped = int(line.split("could not save step ")[1].split()[0])
    assert stopped > int(kept[5:]) and f"(latest is still {kept}), exiting with 124 for requeue" in line
    assert "injected failure (PTFT_FAIL_PREEMPTION_SAVE)" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) <= ["step_10", "step_20"]
    assert not (out / "results.json").exists()

    # 2. the requeued run resumes from that checkpoint; SIGTERM to both ranks inside epoch 2: saved, exit 124
    log = interrupt(assets, out, STEPS_PER_EPOCH + 5, signal.SIGTERM, (0, 1), f"finetune.checkpoint_every={EVERY}")
    assert f"resumed from {out / 'checkpoints' / kept} at step {kept[5:]}" in log
    saved = latest(out)
    assert f"signal received; saved step {saved[5:]}, exiting with 124 for requeue" in log
    assert STEPS_PER_EPOCH < int(saved[5:]) < EPOCHS * STEPS_PER_EPOCH
    # the best export so far travels with the checkpoint (hard-linked, listed in its manifest)
    manifest = json.loads((out / "checkpoints" / saved / "COMPLETE").read_text())
    assert "best/model.safetensors" in manifest["files"] and manifest["client"]["progress"]["best_epoch"] == 1
    assert torch.equal(best_weights(out)["classifier.weight"],
                       best_weights(out / "checkpoints" / saved)["classifier.weight"])

    # (a resume that cannot continue this run is refused with one line, and touches nothing)
    environ = dict(os.environ)
    try:
        bad_resumes_fail_with_one_line(assets, out, tmp_path, capsys)
    finally:  # an in-process run sets launcher variables (LOCAL_WORLD_SIZE...) the next launch must not see
        os.environ.clear()
        os.environ.update(environ)

    # 3. the last resume runs to the end: the same numbers and the same best/ as if nothing had happened
    proc = run(assets, out)  # no checkpoint_every: a requeued run may change how often it saves
    assert f"resumed from {out / 'checkpoints' / saved}" in proc.stderr
    ref, got = (json.loads((d / "results.json").read_text()) for d in (reference, out))
    for key in ("validation", "test", "history", "best_epoch", "best_metric", "epochs_run", "steps"):
        assert got[key] == ref[key], key
    assert train_losses(out) == train_losses(reference)
    assert sorted(train_losses(out)) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    wa, wb = best_weights(out), best_weights(reference)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (out / "checkpoints").exists()  # removed once results.json was written


def bad_resumes_fail_with_one_line(assets: Path, out: Path, tmp_path: Path, capsys) -> None:
    from ptft_dist.cli import main

    cfg, before = str(assets / "config.yaml"), latest(out)
    capsys.readouterr()
    # one process instead of two: each rank's share of every step would change
    assert main(["finetune", "--config", cfg, f"finetune.output_dir={out}", BETAS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptft: error: cannot resume from") and "ranks 2 there, 1 here" in err[0]
    assert main(["finetune", "--config", cfg, f"finetune.output_dir={tmp_path / 'x'}", BETAS,
                 f"finetune.resume={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune.resume:" in err[0] and "no such checkpoint" in err[0], err
    assert not (tmp_path / "x").exists()
    assert main(["finetune", "--config", cfg, f"finetune.output_dir={out}", "checkpoint.every=5"]) == 2
    assert "checkpoint.every is not used by ptft finetune; set finetune.checkpoint_every" in capsys.readouterr().err
    assert latest(out) == before and (out / "checkpoints" / before / "COMPLETE").is_file()
