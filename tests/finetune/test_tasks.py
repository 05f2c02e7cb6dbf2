"""Fine-tuning data loading: formats, column mapping, fixed-seed splits, label checks."""

import json

import numpy as np
import pytest

from ptft_dist.config import FinetuneConfig
from ptft_dist.corpus.inputs import InputError
from ptft_dist.finetune.tasks import load_task


def _write_tsv(path, rows, header=("text", "label")):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def test_given_splits_and_label_ids(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [("good movie", 1), ("bad movie", 0), ("fine", 1)])
    _write_tsv(tmp_path / "val.tsv", [("great", 1), ("awful", 0)])
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "meh", "label": 0}) + "\n")
    cfg = FinetuneConfig(train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "val.tsv"),
                         test_file=str(tmp_path / "test.jsonl"))
    task = load_task(cfg)
    assert task.label_names == ["0", "1"] and task.num_labels == 2
    assert task.splits["train"].texts == ["good movie", "bad movie", "fine"]
    assert task.splits["train"].labels.tolist() == [1, 0, 1]
    assert task.splits["test"].labels.tolist() == [0]


def test_sentence_pairs_and_string_labels_from_csv(tmp_path):
    (tmp_path / "t.csv").write_text("premise,hypothesis,gold\nA man runs,A person moves,entail\n"
                                    "A cat,A dog,contradict\nSky,Blue,neutral\n")
    cfg = FinetuneConfig(train_file=str(tmp_path / "t.csv"), validation_file=str(tmp_path / "t.csv"),
                         test_file=str(tmp_path / "t.csv"), text_column="premise",
                         text_pair_column="hypothesis", label_column="gold")
    task = load_task(cfg)
    assert task.label_names == ["contradict", "entail", "neutral"]
    assert task.splits["train"].pairs == ["A person moves", "A dog", "Blue"]


def test_fixed_seed_split_when_only_train_is_given(tmp_path):
    rows = [(f"sentence number {i}", i % 2) for i in range(1000)]
    _write_tsv(tmp_path / "all.tsv", rows)
    cfg = FinetuneConfig(train_file=str(tmp_path / "all.tsv"))
    a, b = load_task(cfg), load_task(cfg)
    sizes = {s: len(a.splits[s]) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 1000
    assert 740 < sizes["train"] < 860 and 60 < sizes["validation"] < 140 and 60 < sizes["test"] < 140
    assert a.splits["test"].texts == b.splits["test"].texts
    assert not set(a.splits["train"].texts) & set(a.splits["test"].texts)


def test_max_train_samples_takes_a_fixed_subset(tmp_path):
    _write_tsv(tmp_path / "all.tsv", [(f"s{i}", i % 2) for i in range(300)])
    cfg = FinetuneConfig(train_file=str(tmp_path / "all.tsv"), validation_file=str(tmp_path / "all.tsv"),
                         test_file=str(tmp_path / "all.tsv"), max_train_samples=50)
    a, b = load_task(cfg), load_task(cfg)
    assert len(a.splits["train"]) == 50 and a.splits["train"].texts == b.splits["train"].texts
    assert len(a.splits["test"]) == 300


def test_regression_labels(tmp_path):
    _write_tsv(tmp_path / "r.tsv", [("a", 0.5), ("b", 3.25), ("c", 1)])
    cfg = FinetuneConfig(train_file=str(tmp_path / "r.tsv"), validation_file=str(tmp_path / "r.tsv"),
                         test_file=str(tmp_path / "r.tsv"), task_type="regression")
    task = load_task(cfg)
    assert task.splits["train"].labels.dtype == np.float32
    assert task.splits["train"].labels.tolist() == [0.5, 3.25, 1.0]


def test_bad_inputs_are_named(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [("good", 1), ("bad", 0)])
    _write_tsv(tmp_path / "val.tsv", [("odd", 2)])
    cfg = FinetuneConfig(train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "val.tsv"),
                         test_file=str(tmp_path / "train.tsv"))
    with pytest.raises(InputError, match=r"val.tsv: label\(s\) \['2'\] never appear in the train split"):
        load_task(cfg)
    cfg = FinetuneConfig(train_file=str(tmp_path / "train.tsv"), label_column="sentiment")
    with pytest.raises(InputError, match="train.tsv: no column 'sentiment' \\(columns: text, label\\)"):
        load_task(cfg)
    with pytest.raises(InputError, match="no such file"):
        load_task(FinetuneConfig(train_file=str(tmp_path / "nope.tsv")))
