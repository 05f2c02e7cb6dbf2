"""``ptft pretrain`` on input that cannot work: refused with one line, nothing of the run's written
or lost; a diverging run stops instead of saving NaN weights (docs/refusals.md, "pretrain").

One CPU process, a 32-wide 2-layer BERT, 4 steps: each run takes seconds of compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ptft_dist.checkpoint.manager import COMPLETE
from ptft_dist.corpus.format import TOKENIZER_DIR, tokenizer_hash
from tests.bad_inputs import pretrain_runs as runs
from tests.bad_inputs.cli_runs import ok, pretrain, ptft, refused_proc
from tests.bad_inputs.refusal import snapshot
from tests.corpus_factory import make_corpus

# --------------------------------------------------------------------------- checks before any write


def test_engine_config_refusal_writes_no_run_dir(corpus_a, tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    run_dir = tmp_path / "run"
    msg = refused_proc(pretrain(corpus_a, run_dir, f"train.deepspeed_config={ds_json}"))
    assert "train_micro_batch_size_per_gpu" in msg
    assert not run_dir.exists()


def test_refused_resume_leaves_every_run_file_as_it_was(corpus_a, trained, tmp_path):
    run_dir = runs.copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    msg = refused_proc(pretrain(tmp_path / "nothing", run_dir))  # no corpus there
    assert "not a corpus" in msg
    msg = refused_proc(pretrain(corpus_a, run_dir, "model.hidden_size=64", "train.max_steps=6"))
    assert "cannot resume" in msg and "hidden_size=32" in msg and "hidden_size=64" in msg
    msg = refused_proc(pretrain(corpus_a, run_dir, "train.max_steps=2"))  # the run is at step 4: nothing to do
    assert "train.max_steps=2" in msg and "step 4" in msg
    assert snapshot(run_dir) == before  # resolved_config.yaml, metrics, TensorBoard, tokenizer: all unchanged


def test_vocab_difference_names_data_corpus(trained, tmp_path):
    other = tmp_path / "corpus_300"
    make_corpus(other, **runs.CORPUS_SHAPE, vocab_size=300)
    run_dir = runs.copy_run(trained, tmp_path / "run")
    msg = refused_proc(pretrain(other, run_dir, "train.max_steps=6"))
    assert "vocab_size" in msg and "data.corpus" in msg and "model.*" not in msg


@pytest.mark.parametrize("damage", ["no_complete", "no_complete_truncated"])
def test_resume_from_an_incomplete_checkpoint_is_refused(corpus_a, trained, tmp_path, damage):
    """What a kill during a save leaves (a step dir without COMPLETE), named by --resume."""
    run_dir = runs.copy_run(trained, tmp_path / "run")
    step = run_dir / "checkpoints" / "step_4"
    (step / COMPLETE).unlink()
    if damage == "no_complete_truncated":
        victim = next(step.glob("*optim_states.pt"))
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = snapshot(run_dir)
    msg = refused_proc(pretrain(corpus_a, tmp_path / "new_run", "--resume", step, "train.max_steps=6"))
    assert str(step) in msg and "incomplete" in msg
    assert snapshot(run_dir) == before and not (tmp_path / "new_run").exists()


def test_run_dir_inside_the_corpus_is_refused(corpus_a, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_a, corpus)
    before = snapshot(corpus)
    for run_dir in (corpus, corpus / "runs" / "r1"):
        msg = refused_proc(pretrain(corpus, run_dir))
        assert "train.run_dir" in msg and "data.corpus" in msg
    assert snapshot(corpus) == before


# --------------------------------------------------------------------------- the run's tokenizer


def test_reused_run_dir_gets_the_tokenizer_of_its_corpus(corpus_a, corpus_b, tmp_path):
    """A run on corpus A stopped before its first checkpoint; the run dir is reused for corpus B:
    the run (and so its export) must carry B's tokenizer, not A's."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(corpus_a / TOKENIZER_DIR, run_dir / TOKENIZER_DIR)  # what the stopped run left
    ok(pretrain(corpus_b, run_dir, "train.max_steps=2"))
    b_hash = tokenizer_hash(corpus_b / TOKENIZER_DIR)
    assert tokenizer_hash(run_dir / TOKENIZER_DIR) == b_hash != tokenizer_hash(corpus_a / TOKENIZER_DIR)
    export = tmp_path / "hf"
    ok(ptft("convert", run_dir, "-o", export))
    report = json.loads((export / "ptft_export.json").read_text())
    assert report["tokenizer_hash"] == b_hash
    assert (export / "vocab.txt").read_bytes() == (corpus_b / TOKENIZER_DIR / "vocab.txt").read_bytes()


def test_run_with_checkpoints_on_another_tokenizer_is_refused(corpus_b, trained, tmp_path):
    run_dir = runs.copy_run(trained, tmp_path / "run")
    before = snapshot(run_dir)
    msg = refused_proc(pretrain(corpus_b, run_dir, "train.max_steps=6"))  # auto-resume of its latest
    assert "tokenizer" in msg and "data.corpus" in msg
    # --resume of a checkpoint trained on B's tokenizer (made so by its manifest) into this run dir,
    # whose own checkpoints are A's: the run would end up with two vocabularies
    other = runs.copy_run(trained, tmp_path / "other")
    manifest_path = other / "checkpoints" / "step_4" / COMPLETE
    manifest = json.loads(manifest_path.read_text())
    manifest["client"]["tokenizer_hash"] = tokenizer_hash(corpus_b / TOKENIZER_DIR)
    manifest_path.write_text(json.dumps(manifest))
    msg = refused_proc(pretrain(corpus_b, run_dir, "--resume", other / "checkpoints" / "step_4",
                                "train.max_steps=6"))
    assert "holds checkpoints trained with another tokenizer" in msg and "step_2" in msg
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- divergence


def _nan_init_model(corpus: Path, out: Path) -> Path:
    """An HF BERT of the tiny shape whose NSP head holds a NaN: every loss is NaN from step 1."""
    from transformers import BertConfig, BertForPreTraining

    vocab = json.loads((corpus / "manifest.json").read_text())["vocab_size"]
    model = BertForPreTraining(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
    with torch.no_grad():
        model.cls.seq_relationship.weight[0, 0] = float("nan")
    model.save_pretrained(out)
    return out


def test_non_finite_loss_stops_the_run_and_saves_nothing(corpus_a, tmp_path):
    init = _nan_init_model(corpus_a, tmp_path / "nan_init")
    run_dir = tmp_path / "run"
    msg = refused_proc(pretrain(corpus_a, run_dir, f"model.init_from={init}", "checkpoint.every=1"))
    assert "non-finite" in msg and "step 1" in msg
    assert not (run_dir / "checkpoints" / "latest").exists() and not list(run_dir.glob("checkpoints/step_*"))


@pytest.mark.distributed
def test_non_finite_loss_stops_every_rank(corpus_a, tmp_path):
    """Two ranks under the deepspeed launcher agree to stop (nobody waits in a collective forever)."""
    import subprocess

    from tests.bad_inputs.cli_runs import ROOT, TINY_PRETRAIN, env
    from tests.pretrain.test_pretrain import DEEPSPEED, _port

    init = _nan_init_model(corpus_a, tmp_path / "nan_init")
    run_dir = tmp_path / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(_port()), str(ROOT / "ptft_dist" / "cli.py"),
           "pretrain", "--corpus", str(corpus_a), "--run-dir", str(run_dir), *TINY_PRETRAIN,
           f"model.init_from={init}", "checkpoint.every=1"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "non-finite loss at step 1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.distributed
def test_run_files_failing_on_rank0_stop_every_rank(corpus_a, tmp_path):
    """Rank 0 cannot write the run files (here: ``ds_config.json`` is a directory): both ranks stop
    with that one error instead of rank 1 waiting forever in the first step's all-reduce."""
    import subprocess

    from tests.bad_inputs.cli_runs import ROOT, TINY_PRETRAIN, env
    from tests.pretrain.test_pretrain import DEEPSPEED, _port

    run_dir = tmp_path / "run"
    (run_dir / "ds_config.json").mkdir(parents=True)
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(_port()), str(ROOT / "ptft_dist" / "cli.py"),
           "pretrain", "--corpus", str(corpus_a), "--run-dir", str(run_dir), *TINY_PRETRAIN]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "cannot write the run files" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "latest").exists()


def test_weights_check_catches_nan_before_a_save():
    """The save-time check sees a NaN parameter even when the step's loss was finite (a huge
    update makes the weights non-finite only after the last forward)."""
    from ptft_dist.pretrain.guard import non_finite_parameters

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    assert non_finite_parameters(model) == []
    with torch.no_grad():
        model[1].weight[0, 1] = float("inf")
    assert non_finite_parameters(model) == ["1.weight"]
