"""``ptft finetune / evaluate / predict`` on input that cannot give meaningful numbers: refused with
one line (or, where the run is still useful, a loud warning recorded in results.json), and never a
deletion of what finetune did not write (docs/refusals.md, "finetune, evaluate, predict")."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.bad_inputs.cli_runs import ok, ptft
from tests.bad_inputs.refusal import refused, snapshot
from tests.finetune.test_finetune import sentence, tiny_model, write_tsv


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from ptft_dist.config import TokenizerConfig
    from ptft_dist.corpus.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("ft_bad")
    write_tsv(root / "train.tsv", 64, 1)
    write_tsv(root / "validation.tsv", 16, 2)
    write_tsv(root / "test.tsv", 16, 3)
    rng = random.Random(0)
    train_wordpiece([sentence(rng, lab) for lab in ["pos", "neg"] * 200], root / "tok",
                    TokenizerConfig(vocab_size=200, min_frequency=1))
    vocab = len(AutoTokenizer.from_pretrained(str(root / "tok")))
    tiny_model(root / "model", root / "tok", vocab)  # the layout of a `ptft convert` export
    (root / "model" / "ptft_export.json").write_text(json.dumps({"verified": True, "step": 4}))
    tiny_model(root / "minilm", root / "tok", vocab, arch="model")  # the layout of MiniLM: BertModel, no heads
    return root


def write_config(root: Path, name: str, **finetune) -> Path:
    ft = {"model": str(root / "model"), "train_file": str(root / "train.tsv"),
          "validation_file": str(root / "validation.tsv"), "test_file": str(root / "test.tsv"),
          "max_seq_len": 32, "epochs": 1, "lr": 2.0e-3, "batch_size": 16, "output_dir": str(root / name)}
    ft.update(finetune)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"finetune": ft, "train": {"backend": "deepspeed", "zero_stage": 2, "seed": 7,
                                                             "log_every": 1}}))
    return path


def _tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    return path


# --------------------------------------------------------------------------- predict / evaluate need a trained head


@pytest.mark.parametrize("kind", ["model", "minilm"])
def test_predict_and_evaluate_refuse_a_model_without_a_trained_head(assets, kind, capsys):
    texts = assets / "texts.txt"
    texts.write_text("the movie was great\nan awful plot\n")
    msg = refused(capsys, "predict", "--model", assets / kind, "--input", texts)
    assert "no trained classification head" in msg and "ptft finetune" in msg and str(assets / kind) in msg
    msg = refused(capsys, "evaluate", "--model", assets / kind, "--config", write_config(assets, "ev"))
    assert "no trained classification head" in msg


def test_predict_accepts_a_plain_hf_classifier_with_its_head(assets, tmp_path, capsys):
    """Evidence of a trained head without ptft's meta: a *ForSequenceClassification whose weights hold
    the classifier. Two runs give the same labels (nothing is drawn at random)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(assets / "model")
    cfg.num_labels, cfg.id2label, cfg.label2id = 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    torch.manual_seed(1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    for f in (assets / "tok").iterdir():
        shutil.copy2(f, tmp_path / "clf" / f.name)
    texts = tmp_path / "texts.txt"
    texts.write_text("the movie was great\nan awful plot\n")
    from ptft_dist.cli import main

    outputs = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["predict", "--model", str(tmp_path / "clf"), "--input", str(texts)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 2


# --------------------------------------------------------------------------- empty and one-class splits


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_of_empty_texts_is_refused(assets, tmp_path, split, capsys):
    empty = _tsv(tmp_path / f"{split}.tsv", [("", "pos"), ("  ", "neg"), ("", "pos"), ("", "neg")])
    cfg = write_config(assets, f"empty-{split}", output_dir=str(tmp_path / "out"), **{f"{split}_file": str(empty)})
    msg = refused(capsys, "finetune", "--config", cfg)
    assert str(empty) in msg and f"{split} split" in msg and "no non-empty text" in msg
    assert not (tmp_path / "out").exists()
    if split == "test":
        msg = refused(capsys, "evaluate", "--model", assets / "model", "--config", cfg, "--split", "test")
        assert str(empty) in msg and "no non-empty text" in msg


def test_a_split_without_examples_is_refused(assets, tmp_path, capsys):
    header_only = tmp_path / "validation.tsv"
    header_only.write_text("text\tlabel\n")
    cfg = write_config(assets, "no-val", output_dir=str(tmp_path / "out"), validation_file=str(header_only))
    msg = refused(capsys, "finetune", "--config", cfg)
    assert "validation split" in msg and ("no examples" in msg or "no non-empty text" in msg)
    assert not (tmp_path / "out").exists()


def test_a_one_class_train_split_is_refused(assets, tmp_path, capsys):
    one = write_tsv(tmp_path / "train.tsv", 20, 1, labels=("pos",))
    cfg = write_config(assets, "one-class", output_dir=str(tmp_path / "out"), train_file=str(one))
    msg = refused(capsys, "finetune", "--config", cfg)
    assert str(one) in msg and "train split" in msg and "pos" in msg


@pytest.fixture(scope="module")
def warned_run(assets) -> tuple[Path, subprocess.CompletedProcess]:
    """A run with 3 empty train texts and a validation split of one class: it trains, says so."""
    rows = [tuple(line.split("\t")) for line in (assets / "train.tsv").read_text().splitlines()[1:]]
    rows[5] = ("", rows[5][1])
    rows[17] = ("   ", rows[17][1])
    rows.append(("", "neg"))
    _tsv(assets / "train_some_empty.tsv", rows)
    write_tsv(assets / "validation_pos.tsv", 12, 2, labels=("pos",))
    cfg = write_config(assets, "warned", train_file=str(assets / "train_some_empty.tsv"),
                       validation_file=str(assets / "validation_pos.tsv"))
    return assets / "warned", ok(ptft("finetune", "--config", cfg))


def test_empty_texts_are_counted_and_one_class_validation_is_flagged(warned_run):
    out, proc = warned_run
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["empty_texts_skipped"] == {"train": 3}
    assert results["task"]["examples"]["train"] == 62  # 65 rows, 3 skipped
    assert any("validation" in w and "one class" in w for w in results["warnings"])
    assert "3 empty text(s) skipped" in proc.stderr
    assert "one class" in proc.stderr and "WARNING" in proc.stderr.upper()


# --------------------------------------------------------------------------- the output directory


def test_output_dir_that_overlaps_the_model_is_refused(assets, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    before = snapshot(model)
    for out in (model, model / "ft"):
        msg = refused(capsys, "finetune", "--config", write_config(assets, "overlap", model=str(model),
                                                                   output_dir=str(out)))
        assert "finetune.output_dir" in msg and "finetune.model" in msg
    assert snapshot(model) == before


def test_output_dir_of_another_owner_is_not_emptied(assets, tmp_path, capsys):
    user = tmp_path / "experiments"
    (user / "tb").mkdir(parents=True)
    (user / "tb" / "events.out.tfevents.1.host").write_bytes(b"my old runs")
    (user / "results.json").write_text('{"mine": true}')
    before = snapshot(user)
    msg = refused(capsys, "finetune", "--config", write_config(assets, "other", output_dir=str(user)))
    assert "finetune.output_dir" in msg and "not written by ptft finetune" in msg
    assert snapshot(user) == before


def test_rerun_into_a_finetune_output_keeps_what_finetune_did_not_write(assets, warned_run, capsys):
    out, _ = warned_run
    (out / "notes.md").write_text("baseline numbers")
    # fine-tuning again from the model this output holds would delete that model first: refused
    msg = refused(capsys, "finetune", "--config", write_config(assets, "from-best", model=str(out / "best"),
                                                               output_dir=str(out)))
    assert "finetune.model" in msg and str(out / "best") in msg
    assert (out / "best" / "model.safetensors").is_file()
    ok(ptft("finetune", "--config", write_config(assets, "warned")))  # same output dir, clean data
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["empty_texts_skipped"] == {} and results["warnings"] == []
    assert (out / "notes.md").read_text() == "baseline numbers"
