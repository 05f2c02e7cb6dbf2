"""``ptft convert`` on input that cannot work: it never deletes the run it reads or a folder it did
not write, never calls NaN "verified", never leaves a complete-looking temporary model behind, and
never exports one corpus's tokenizer with another's weights (docs/refusals.md, "convert")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ptft_dist.checkpoint.manager import COMPLETE
from ptft_dist.corpus.format import TOKENIZER_DIR
from tests.bad_inputs import pretrain_runs as runs
from tests.bad_inputs.cli_runs import PY, ROOT, env
from tests.bad_inputs.refusal import accepted, refused, snapshot


@pytest.fixture()
def run_copy(trained, tmp_path) -> Path:
    return runs.copy_run(trained, tmp_path / "run")


# --------------------------------------------------------------------------- where the export may go


def test_output_equal_to_inside_or_containing_the_run_is_refused(run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    step = run_copy / "checkpoints" / "step_4"
    for src, out in [(run_copy, run_copy), (run_copy, step), (run_copy, run_copy / "export"),
                     (step, step), (step, run_copy / "checkpoints"), (run_copy, tmp_path)]:
        msg = refused(capsys, "convert", src, "-o", out, "--overwrite")
        assert "-o" in msg and str(out) in msg and ("inside" in msg or "contains" in msg), msg
    assert snapshot(run_copy) == before  # checkpoints, latest, metrics, TensorBoard: all there
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_4"


def test_overwrite_replaces_only_a_previous_export(run_copy, tmp_path, capsys):
    user = tmp_path / "my_models"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "todo.txt").write_text("keep me")
    (user / "config.json").write_text("{}")
    before = snapshot(user)
    for overwrite in ([], ["--overwrite"]):
        msg = refused(capsys, "convert", run_copy, "-o", user, *overwrite)
        assert "ptft_export.json" in msg and "not written by ptft convert" in msg
    assert snapshot(user) == before

    export = tmp_path / "hf"
    accepted(capsys, "convert", run_copy, "-o", export)
    first = json.loads((export / "ptft_export.json").read_text())
    assert first["verified"] and first["step"] == 4
    msg = refused(capsys, "convert", run_copy / "checkpoints" / "step_2", "-o", export)
    assert "--overwrite" in msg  # a previous export: the hint is offered
    accepted(capsys, "convert", run_copy / "checkpoints" / "step_2", "-o", export, "--overwrite")
    assert json.loads((export / "ptft_export.json").read_text())["step"] == 2

    (export / "my_notes.md").write_text("results of experiment 7")  # the user added a file to an export
    msg = refused(capsys, "convert", run_copy, "-o", export, "--overwrite")
    assert "my_notes.md" in msg
    assert (export / "my_notes.md").read_text() == "results of experiment 7"


def test_output_inside_the_corpus_is_refused(corpus_a, trained, tmp_path, capsys):
    corpus = corpus_a
    before = snapshot(corpus)
    msg = refused(capsys, "convert", trained, "-o", corpus / "hf")
    assert "data.corpus" in msg and str(corpus) in msg
    assert snapshot(corpus) == before


def test_a_run_without_checkpoints_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    msg = refused(capsys, "convert", run_dir, "-o", tmp_path / "hf")
    assert "latest" in msg and not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- what gets exported


def test_run_tokenizer_that_is_not_the_checkpoints_is_refused(corpus_b, run_copy, tmp_path, capsys):
    """RUN/tokenizer replaced (or left from another corpus): exporting it with these weights would
    ship the wrong vocabulary under a report that names the checkpoint's tokenizer."""
    shutil.rmtree(run_copy / TOKENIZER_DIR)
    shutil.copytree(corpus_b / TOKENIZER_DIR, run_copy / TOKENIZER_DIR)
    msg = refused(capsys, "convert", run_copy, "-o", tmp_path / "hf")
    assert "tokenizer" in msg and str(run_copy / TOKENIZER_DIR) in msg
    assert not (tmp_path / "hf").exists()


def _poison(step_dir: Path) -> None:
    """A NaN in the fp32 master weights of a ZeRO checkpoint, its manifest updated (not 'damaged')."""
    opt = step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(opt, weights_only=False)
    state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].data[7] = float("nan")
    torch.save(state, opt)
    manifest = json.loads((step_dir / COMPLETE).read_text())
    manifest["files"][opt.name] = opt.stat().st_size
    (step_dir / COMPLETE).write_text(json.dumps(manifest))


def test_nan_weights_are_never_verified(run_copy, tmp_path, capsys):
    _poison(run_copy / "checkpoints" / "step_4")
    msg = refused(capsys, "convert", run_copy, "-o", tmp_path / "hf")
    assert "non-finite" in msg and "step_4" in msg
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


# --------------------------------------------------------------------------- interrupted


def _dead_pid() -> int:
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_leaves_no_temporary_model_and_stale_ones_are_removed(trained, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.Popen([PY, "-m", "ptft_dist.cli", "convert", str(trained), "-o", str(out)], env=env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.time() + 300
    while seen is None and proc.poll() is None and time.time() < deadline:
        seen = next(iter(tmp_path.glob(".hf.tmp-*")), None)
        time.sleep(0.005)
    assert seen is not None, "the conversion finished before its temporary directory was seen"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "SIGTERM" in err, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "temporary export left behind"

    # what a kill -9 leaves (no handler runs): removed by the next conversion to the same output
    stale = tmp_path / f".hf.tmp-{_dead_pid()}-0badf00d"
    shutil.copytree(trained / TOKENIZER_DIR, stale)
    (stale / "config.json").write_text("{}")
    proc = subprocess.run([PY, "-m", "ptft_dist.cli", "convert", str(trained), "-o", str(out)], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_stale_leftovers_of_dead_writers_only(tmp_path):
    """What replace_dir / temp_name / remove_tree leave when killed: a dead writer's are cleared (a
    previous export moved aside is put back when the output is missing); a live process's are kept."""
    from ptft_dist.fsutil import remove_stale_temps

    dead, out = _dead_pid(), tmp_path / "hf"
    aside = tmp_path / f".hf.old-{dead}"
    aside.mkdir()
    (aside / "ptft_export.json").write_text("{}")
    live = tmp_path / f".hf.tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    trash = tmp_path / f".trash-hf-{dead}-123"
    trash.mkdir()
    other = tmp_path / f".hfx.tmp-{dead}-abcd1234"  # another output's: not ours to judge
    other.mkdir()
    assert remove_stale_temps(out) == [trash]
    assert (out / "ptft_export.json").is_file() and not aside.exists()  # put back, not deleted
    assert live.is_dir() and other.is_dir()
    aside.mkdir()
    assert remove_stale_temps(out) == [aside] and out.is_dir()
