"""The Accelerate backend through the real loop: ``ptft pretrain train.backend=accelerate`` with 2 CPU
ranks under ``launch.sh accelerate`` (accelerate launch → torchrun, DDP over gloo).

kill -9 of one rank → auto-resume → weights, losses and sample ids bitwise equal to an
uninterrupted run; ``ptft convert`` of its checkpoint exports exactly the trained weights; ``ptft
finetune`` (Accelerate too, 2 ranks) of that export learns a task written in the corpus's words.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ptft_dist.pretrain.export import consolidated_state_dict, resolve_checkpoint
from tests.corpus_factory import make_corpus
from tests.pretrain.test_pretrain import STEPS, TINY, _env, assert_same_weights, losses, sample_ids

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LAUNCH = str(ROOT / "launch.sh")
ACCELERATE = ["train.backend=accelerate", "train.zero_stage=0"]


def _launch_env() -> dict:
    return {**_env(), "PTFT_PYTHON": sys.executable, "PTFT_NUM_GPUS": "0", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _port() -> str:
    from tests.pretrain.test_pretrain import _port as free

    return str(free())


def pretrain_cmd(corpus: Path, run_dir: Path) -> list[str]:
    return [LAUNCH, "accelerate", "--nproc", "2", "--main_process_port", _port(), "--", "ptft", "pretrain",
            "--corpus", str(corpus), "--run-dir", str(run_dir), *TINY, *ACCELERATE]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("acc_corpus")
    make_corpus(root, shard_docs=(40, 25, 50, 30), val_docs=(12,), sentences=(2, 10), n_words=(4, 14))
    return root


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("acc_ref") / "run"
    proc = run(pretrain_cmd(corpus, run_dir))
    assert "backend accelerate" in proc.stderr and "launcher torchrun" in proc.stderr
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "ptft_meta.json").read_text())
    assert meta["backend"] == "accelerate" and meta["world_size"] == 2
    return run_dir


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "ptft_dist.cli" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_kill9_of_one_rank_then_auto_resume_is_bitwise_equal(corpus, reference, tmp_path):
    kill_at = random.Random().randint(5, STEPS - 2)
    print(f"killing rank 1 at step >= {kill_at}")
    run_dir = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(pretrain_cmd(corpus, run_dir), env=_launch_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and any(json.loads(x)["step"] >= kill_at for x in metrics.read_text().splitlines()
                                        if x.endswith("}"))):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    pid = _rank_pid(proc, 1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=180) != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() in {"step_4", "step_8"}
    resumed = run(pretrain_cmd(corpus, run_dir))  # checkpoint.resume=auto
    assert "resumed from" in resumed.stderr
    assert_same_weights(run_dir, reference)
    assert losses(run_dir) == losses(reference)
    assert sample_ids(run_dir) == sample_ids(reference)


def _task(path: Path, vocab: Path, n: int, seed: int) -> None:
    """Sentences of the corpus's whole words; the label says which of two marker words is in it."""
    words = [w for w in vocab.read_text().split() if len(w) > 3 and not w.startswith(("##", "["))]
    pos, neg, fill = words[0], words[1], words[2:40]
    rng = random.Random(seed)
    rows = ["text\tlabel"]
    for i in range(n):
        text = [rng.choice(fill) for _ in range(rng.randint(3, 8))]
        text.insert(rng.randint(0, len(text)), pos if i % 2 else neg)
        rows.append(f"{' '.join(text)}\t{'pos' if i % 2 else 'neg'}")
    path.write_text("\n".join(rows) + "\n")


def test_convert_then_finetune_the_export(reference, tmp_path):
    from safetensors.torch import load_file

    export = tmp_path / "hf"
    run([sys.executable, "-m", "ptft_dist.cli", "convert", str(reference), "-o", str(export)])
    report = json.loads((export / "ptft_export.json").read_text())
    assert report["verified"] and report["step"] == STEPS
    assert report["backend"]["backend"] == "accelerate" and report["backend"]["world_size"] == 2
    # the export holds exactly the checkpoint's weights (safetensors drops the tied decoder copy)
    saved = consolidated_state_dict(resolve_checkpoint(reference).step_dir)
    exported = load_file(str(export / "model.safetensors"))
    assert set(saved) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(exported)
    assert all(torch.equal(exported[k], saved[k]) for k in saved if k in exported)

    for split, n, seed in (("train", 320, 1), ("validation", 64, 2), ("test", 64, 3)):
        _task(tmp_path / f"{split}.tsv", export / "vocab.txt", n, seed)
    out = tmp_path / "ft"
    proc = run([LAUNCH, "accelerate", "--nproc", "2", "--main_process_port", _port(), "--", "ptft", "finetune",
                f"finetune.model={export}", f"finetune.train_file={tmp_path / 'train.tsv'}",
                f"finetune.validation_file={tmp_path / 'validation.tsv'}", f"finetune.test_file={tmp_path / 'test.tsv'}",
                "finetune.max_seq_len=32", "finetune.epochs=3", "finetune.lr=5e-3", "finetune.batch_size=8",
                f"finetune.output_dir={out}", "train.backend=accelerate", "train.zero_stage=0"])
    r = json.loads((out / "results.json").read_text())
    assert r["backend"] == "accelerate" and r["world_size"] == 2 and r["model"] == str(export)
    assert r["test"]["accuracy"] >= 0.9, (r["history"], proc.stderr[-2000:])  # majority class: 0.5
    # the fine-tuned encoder started from the export: its word embeddings moved, yet each row still
    # points where the export's did (measured: mean cosine 0.96; a random init of the same shape: ~0)
    cos = torch.nn.functional.cosine_similarity
    start = exported["bert.embeddings.word_embeddings.weight"]
    tuned = load_file(str(out / "best" / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(tuned, start) and cos(tuned, start, dim=1).mean() > 0.8
    assert abs(cos(tuned, torch.randn_like(start), dim=1).mean()) < 0.2
    assert (out / "best" / "vocab.txt").read_text() == (export / "vocab.txt").read_text()
