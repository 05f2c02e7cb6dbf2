"""``finetune.task_type=token_classification``: CoNLL/JSONL reading and its refusals, tag schemes,
word-piece alignment, seqeval metrics, and ``ptft finetune / evaluate / predict`` end to end on a
synthetic NER set (tests/finetune/task_factory.py) with a real WordPiece tokenizer and a tiny
random BERT. A model that learned nothing tags every word ``O``: entity F1 0.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from ptft_dist.config import FinetuneConfig, load_config
from ptft_dist.corpus.inputs import InputError
from ptft_dist.finetune.token_classification import encode_words, entities, piece_labels, token_metrics
from ptft_dist.finetune.token_data import TokenSplit, check_sentence, load_token_splits, read_conll
from tests.bad_inputs.refusal import refused
from tests.finetune.task_factory import write_conll, write_ner_jsonl
from tests.finetune.test_finetune import run_finetune, tiny_model

N_TRAIN, N_VAL, N_TEST = 320, 63, 64  # 63: the last eval batch of a 2-rank run is padded by repetition


@pytest.fixture(scope="module")
def ner(tmp_path_factory) -> Path:
    from tests.finetune.task_factory import train_tokenizer

    root = tmp_path_factory.mktemp("ner")
    train_tokenizer(root / "tok")
    tiny_model(root / "model", root / "tok", len(AutoTokenizer.from_pretrained(str(root / "tok"))))
    for split, n, seed in (("train", N_TRAIN, 1), ("validation", N_VAL, 2), ("test", N_TEST, 3)):
        write_conll(root / f"{split}.conll", n, seed)
        write_ner_jsonl(root / f"{split}.jsonl", n, seed, scheme="IOBES")
    return root


def ner_config(root: Path, name: str, ext: str = "conll", **finetune) -> Path:
    ft = {"model": str(root / "model"), "task_type": "token_classification",
          **{f"{s}_file": str(root / f"{s}.{ext}") for s in ("train", "validation", "test")},
          "max_seq_len": 32, "epochs": 3, "lr": 2.0e-3, "batch_size": 16, "output_dir": str(root / name)}
    ft.update(finetune)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"finetune": ft, "train": {"backend": "deepspeed", "zero_stage": 2, "seed": 7,
                                                             "log_every": 5}}))
    return path


# --------------------------------------------------------------------------- reading and refusals


def test_conll_columns_docstart_and_sentence_breaks(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("-DOCSTART- -X- O\n\nJohn NNP B-PER\nlives VBZ O\n\n\n-DOCSTART- -X- O\nParis NNP B-LOC\n. . O\n")
    raw = read_conll(str(p), 0, -1)
    assert raw.tokens == [["John", "lives"], ["Paris", "."]] and raw.tags == [["B-PER", "O"], ["B-LOC", "O"]]
    assert raw.lines == [[3, 4], [8, 9]]
    assert read_conll(str(p), 0, 1).tags == [["NNP", "VBZ"], ["NNP", "."]]  # POS from the second column


@pytest.mark.parametrize("text, needle", [
    ("a NN O\nb B-PER\n", "a.conll:2: 2 column(s), but the file's first word line has 3"),
    ("a O\nb I-PER\n", "a.conll:2: tag 'I-PER' after 'O': an IOB2 entity starts with B-PER"),
    ("a O\nb X-PER\n", "a.conll:2: tag 'X-PER' is not an IOB2 tag"),
    ("a\n", "a.conll:1: a CoNLL line needs a word column and a different tag column"),
])
def test_malformed_conll_is_named_by_file_and_line(tmp_path, text, needle):
    (tmp_path / "a.conll").write_text(text)
    ok = tmp_path / "ok.conll"
    ok.write_text("x O\ny B-PER\n")
    cfg = FinetuneConfig(task_type="token_classification", train_file=str(tmp_path / "a.conll"),
                         validation_file=str(ok), test_file=str(ok))
    with pytest.raises(InputError) as err:
        load_token_splits(cfg)
    assert needle in str(err.value)


def test_iobes_transitions_and_unseen_tags(tmp_path):
    where = [f"f:{i}" for i in range(1, 5)]
    check_sentence(["S-PER", "O", "B-LOC", "E-LOC"], "IOBES", where)
    with pytest.raises(InputError, match="f:3: tag 'O' after 'B-LOC': an IOBES entity ends with E-LOC"):
        check_sentence(["S-PER", "B-LOC", "O", "O"], "IOBES", where)
    with pytest.raises(InputError, match="f:2: the sentence ends inside an entity"):
        check_sentence(["O", "B-LOC"], "IOBES", where)
    with pytest.raises(InputError, match="'E-LOC' after 'B-PER'"):
        check_sentence(["B-PER", "E-LOC"], "IOBES", where)
    write_ner_jsonl(tmp_path / "t.jsonl", 30, 1)
    (tmp_path / "v.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "B-MISC"]}) + "\n")
    cfg = FinetuneConfig(task_type="token_classification", train_file=str(tmp_path / "t.jsonl"),
                         validation_file=str(tmp_path / "v.jsonl"), test_file=str(tmp_path / "t.jsonl"))
    with pytest.raises(InputError, match=r"v.jsonl:1: tag 'B-MISC' never appears in the train split"):
        load_token_splits(cfg)
    (tmp_path / "v.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(InputError, match=r"v.jsonl:1: 2 tokens but 1 tags"):
        load_token_splits(cfg)


def test_scheme_is_detected_and_ids_put_o_first(ner):
    cfg = FinetuneConfig(task_type="token_classification", train_file=str(ner / "train.jsonl"),
                         validation_file=str(ner / "validation.jsonl"), test_file=str(ner / "test.jsonl"))
    splits, names, scheme = load_token_splits(cfg)
    assert scheme == "IOBES" and names[0] == "O" and {"S-PER", "E-LOC", "B-ORG"} <= set(names)
    assert len(splits["train"]) == N_TRAIN and all(len(t) == len(g) for t, g in zip(splits["train"].tokens, splits["train"].tags))


# --------------------------------------------------------------------------- alignment, decoding, metrics


def test_first_and_all_piece_alignment(ner):
    tok = AutoTokenizer.from_pretrained(str(ner / "tok"))
    names = ["O", "B-PER", "I-PER"]
    split = TokenSplit([["ada", "xylophonic", "met"]], [np.array([1, 1, 0])], [[1, 1, 1]], "x")
    pieces = tok.tokenize("xylophonic")
    assert len(pieces) > 2  # the word is split: the case alignment is about
    first = encode_words(tok, split, 32, "first", names)
    n = len(pieces)
    assert first.targets["labels"][0] == [-100, 1, 1] + [-100] * (n - 1) + [0, -100]
    every = encode_words(tok, split, 32, "all", names)
    assert every.targets["labels"][0] == [-100, 1, 1] + [2] * (n - 1) + [0, -100]  # inside pieces: I-PER
    assert piece_labels([None, 0, 0, None], np.array([0]), "all", ["O"]) == [-100, 0, 0, -100]


def test_entities_decode_like_seqeval():
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4)]
    assert entities(["S-PER", "B-ORG", "I-ORG", "E-ORG", "O"]) == [("PER", 0, 0), ("ORG", 1, 3)]
    assert entities(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]  # conlleval: an I- after O starts an entity


def test_word_level_metrics_by_hand():
    """Gold PER(0-1) LOC(3) LOC(5); predicted PER(0-1) and a wrong MISC(4): P 1/2, R 1/3, F1 0.4; the
    truncated word 5 counts as predicted O; accuracy over words."""
    names = ["O", "B-PER", "I-PER", "B-LOC", "B-MISC"]
    gold = np.array([1, 2, 0, 3, 0, 3])
    split = TokenSplit([list("abcdef")], [gold], [[1] * 6], "x")
    word_ids = [None, 0, 1, 1, 2, 3, 4, None]  # word 1 has two pieces; word 5 was cut off
    pred_piece = [0, 1, 2, 1, 0, 0, 4, 0]  # the second piece of word 1 says B-PER: ignored (first piece rules)
    logits = np.eye(len(names), dtype=np.float32)[pred_piece] * 5
    enc = type("E", (), {"word_ids": [word_ids]})()
    m = token_metrics(split, enc, [logits], names)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(3 / 6) and m["words_truncated"] == 1
    from seqeval.metrics import f1_score

    assert m["f1"] == pytest.approx(f1_score([["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC"]],
                                             [["B-PER", "I-PER", "O", "O", "B-MISC", "O"]]))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def full_ner(ner) -> dict:
    return run_finetune(ner_config(ner, "full"))


def test_full_ner_learns_entities(full_ner, ner):
    r = full_ner
    assert r["task"]["task_type"] == "token_classification" and r["task"]["tag_scheme"] == "IOB2"
    assert r["validation"]["f1"] >= 0.8 and r["test"]["f1"] >= 0.8  # all-O (learned nothing): F1 0
    assert r["test"]["accuracy"] > 0.9 and r["steps"] == 3 * N_TRAIN // 16
    meta = json.loads((ner / "full" / "best" / "ptft_finetune.json").read_text())
    assert meta["task_type"] == "token_classification" and meta["label_names"][0] == "O"
    assert json.loads((ner / "full" / "best" / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]


def test_lora_iobes_jsonl_all_pieces_zero3_learns(ner):
    r = run_finetune(ner_config(ner, "lora", ext="jsonl", method="lora", lr=5.0e-3, label_subwords="all",
                                export="both"), "train.zero_stage=3")
    assert r["zero_stage"] == 3 and r["task"]["tag_scheme"] == "IOBES" and r["test"]["f1"] >= 0.7
    assert r["parameters"]["trainable"] < r["parameters"]["total"] / 2
    acfg = json.loads((ner / "lora" / "best" / "adapter" / "adapter_config.json").read_text())
    assert acfg["task_type"] == "TOKEN_CLS" and "classifier" in acfg["modules_to_save"]
    from ptft_dist.finetune.evaluate import evaluate_model

    cfg = load_config(ner / "lora.yaml").finetune
    merged, adapter = (evaluate_model(d, cfg, "validation", device=torch.device("cpu"))
                       for d in (ner / "lora" / "best", ner / "lora" / "best" / "adapter"))
    assert adapter["kind"] == "adapter" and adapter["f1"] == merged["f1"] == r["validation"]["f1"]
    assert adapter["loss"] == pytest.approx(merged["loss"], abs=1e-5)
    assert not any("classifier" in t for t in acfg["target_modules"])


def test_evaluate_and_predict_through_the_cli(full_ner, ner, monkeypatch, capsys):
    from ptft_dist.cli import main

    best = ner / "full" / "best"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(best), "--config", str(ner / "full.yaml"), "--split", "test"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["f1"] == full_ner["test"]["f1"] and m["loss"] == pytest.approx(full_ner["test"]["loss"], abs=1e-6)
    text = "the team met alan turing in berlin with globex"
    monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n\n"))
    assert main(["predict", "--model", str(best)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[1]["entities"] == []
    found = {(e["type"], e["text"]) for e in rows[0]["entities"]}
    assert found == {("PER", "alan turing"), ("LOC", "berlin"), ("ORG", "globex")}
    for e in rows[0]["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1


@pytest.mark.parametrize("case", ["conll_columns", "task_mismatch", "scheme"])
def test_bad_input_is_one_line(case, ner, tmp_path, capsys):
    bad = tmp_path / "bad.conll"
    if case == "conll_columns":
        bad.write_text("a NN O\nb NN B-PER\nc B-PER\n")
        cfg, expect = ner_config(ner, "bad1", train_file=str(bad)), f"{bad}:3: 2 column(s)"
    elif case == "scheme":
        bad.write_text("a NN O\nb NN B-PER\nc NN E-PER\n")
        cfg, expect = ner_config(ner, "bad2", train_file=str(bad), tag_scheme="IOB2"), "tag 'E-PER' is not an IOB2 tag"
    else:
        cfg = ner_config(ner, "bad3", ext="jsonl", task_type="classification")
        expect = "set finetune.task_type=token_classification"
    data = yaml.safe_load(cfg.read_text())
    data["finetune"]["output_dir"] = str(tmp_path / "out")
    cfg.write_text(yaml.safe_dump(data))
    assert expect in refused(capsys, "finetune", "--config", cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_two_rank_metrics_equal_one_rank_evaluation_of_the_checkpoint(ner):
    """2 ranks, ZeRO-2, 63 validation sentences (the last batch padded by repetition): the gathered
    validation metrics equal a 1-process evaluation of the exported best epoch."""
    from ptft_dist.finetune.evaluate import evaluate_model

    cfg_path = ner_config(ner, "two", batch_size=8, epochs=2)
    r = run_finetune(cfg_path, nproc=2, launcher="deepspeed")
    assert r["world_size"] == 2 and r["validation"]["f1"] > 0.5
    m = evaluate_model(ner / "two" / "best", load_config(cfg_path).finetune, "validation", device=torch.device("cpu"))
    for key in ("f1", "precision", "recall", "accuracy"):
        assert m[key] == r["validation"][key], key
    assert m["loss"] == pytest.approx(r["validation"]["loss"], abs=1e-5)
