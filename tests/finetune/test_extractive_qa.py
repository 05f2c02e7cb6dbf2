"""``finetune.task_type=extractive_qa``: SQuAD JSON / JSONL reading and its refusals, windows with a
document stride, span search across windows, SQuAD normalisation / EM / F1, the v2 no-answer
threshold, and ``ptft finetune / evaluate / predict`` end to end on a synthetic set whose answer
follows "the code is" (tests/finetune/task_factory.py), with a real WordPiece tokenizer and a tiny
random BERT. Baselines a model that learned nothing cannot beat: answering "" scores the share of
unanswerable questions (v2) or 0 (v1).
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from ptft_dist.config import FinetuneConfig, load_config
from ptft_dist.corpus.inputs import InputError
from ptft_dist.finetune.batches import Encoded
from ptft_dist.finetune.qa_data import QASplit, encode_qa, load_qa_splits, read_qa_file
from ptft_dist.finetune.qa_postprocess import answers, qa_metrics, tune_null_threshold
from ptft_dist.finetune.squad_metric import best_over_golds, exact_match, f1, normalize_answer
from tests.bad_inputs.refusal import refused
from tests.finetune.task_factory import qa_examples, train_tokenizer, write_qa_jsonl, write_squad_json
from tests.finetune.test_finetune import run_finetune, tiny_model

N_TRAIN, N_VAL, N_TEST = 240, 47, 48  # 47: uneven over 2 ranks


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    train_tokenizer(root / "tok")
    tiny_model(root / "model", root / "tok", len(AutoTokenizer.from_pretrained(str(root / "tok"))))
    for split, n, seed in (("train", N_TRAIN, 1), ("validation", N_VAL, 2), ("test", N_TEST, 3)):
        write_squad_json(root / f"{split}.json", qa_examples(n, seed, unanswerable=0.25))
        write_qa_jsonl(root / f"{split}.jsonl", qa_examples(n, seed + 10))
    return root


def qa_config(root: Path, name: str, ext: str = "json", **finetune) -> Path:
    ft = {"model": str(root / "model"), "task_type": "extractive_qa",
          **{f"{s}_file": str(root / f"{s}.{ext}") for s in ("train", "validation", "test")},
          "max_seq_len": 48, "doc_stride": 16, "epochs": 2, "lr": 2.0e-3, "batch_size": 16,
          "output_dir": str(root / name)}
    ft.update(finetune)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"finetune": ft, "train": {"backend": "deepspeed", "zero_stage": 2, "seed": 7,
                                                             "log_every": 5}}))
    return path


# --------------------------------------------------------------------------- SQuAD metric


def test_squad_normalisation_em_and_f1_known_cases():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("a, an; THE") == ""
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert f1("paris", "london") == 0.0 and f1("", "") == 1.0 and f1("x", "") == 0.0
    assert best_over_golds("denver broncos", ["Broncos", "Denver Broncos"]) == (1.0, 1.0)
    assert best_over_golds("", []) == (1.0, 1.0)  # unanswerable, answered ""


def test_null_threshold_maximises_f1():
    # diffs (null - best span): q0, q1 answerable (span F1 1, 0.5), q2, q3 unanswerable
    diffs, span_f1, unans = [-3.0, -1.0, 2.0, -2.0], [1.0, 0.5, 0.0, 0.0], [False, False, True, True]
    t = tune_null_threshold(diffs, span_f1, unans)
    # answering q0 only (t in [-3, -2)) scores 1 + 0 + 1 + 1 = 3; nothing better
    assert t == -3.0
    assert tune_null_threshold([1.0, 2.0], [0.0, 0.0], [True, True]) < 1.0  # all unanswerable: answer none
    assert tune_null_threshold([-1.0, math.inf], [1.0, 0.0], [False, True]) == -1.0  # inf: no span found at all


# --------------------------------------------------------------------------- reading and windows


def test_squad_json_and_jsonl_read_alike(tmp_path):
    ex = qa_examples(5, 4, unanswerable=0.4)
    a = read_qa_file(str(write_squad_json(tmp_path / "a.json", ex)), "fail")
    b = read_qa_file(str(write_qa_jsonl(tmp_path / "b.jsonl", ex)), "fail")
    assert a.ids == b.ids and a.contexts == b.contexts and a.answers == b.answers
    assert any(not x for x in a.answers) and any(x for x in a.answers)


def test_bad_answer_start_fails_or_is_counted(tmp_path):
    ex = qa_examples(6, 5)
    ex[2]["answers"]["answer_start"][0] += 3
    p = write_qa_jsonl(tmp_path / "a.jsonl", ex)
    with pytest.raises(InputError, match=r"a.jsonl:3 \(id q5-2\): answer_start=\d+ does not point at the answer"):
        read_qa_file(str(p), "fail")
    sp = read_qa_file(str(p), "skip")
    assert len(sp) == 5 and sp.answers_skipped == 1 and sp.examples_skipped == 1 and "q5-2" not in sp.ids


def test_windows_cover_long_contexts_and_answers_map_back(qa):
    tok = AutoTokenizer.from_pretrained(str(qa / "tok"))
    cfg = FinetuneConfig(task_type="extractive_qa", **{f"{s}_file": str(qa / f"{s}.json") for s in ("train", "validation", "test")})
    splits, info = load_qa_splits(cfg)
    assert info["no_answer"] is True
    sp = splits["train"]
    enc = encode_qa(tok, sp, 48, 16, train=True)
    assert len(enc) > len(sp) and max(len(x) for x in enc.input_ids) <= 48  # long contexts: several windows
    hits = 0
    for f, e in enumerate(enc.example_of):
        s, t = enc.targets["start_positions"][f], enc.targets["end_positions"][f]
        if (s, t) != (0, 0):
            a, b = enc.offsets[f][s][0], enc.offsets[f][t][1]
            assert sp.contexts[e][a:b] == sp.answers[e][0][0]
            hits += 1
        else:
            assert not sp.answers[e] or sp.answers[e][0][0] not in tok.decode(enc.input_ids[f])
    assert hits >= sum(1 for a in sp.answers if a)  # every answer lies whole in at least one window
    long_q = QASplit(["x"], ["what " * 40], ["a b c"], [[]], "q.jsonl")
    with pytest.raises(InputError, match="q.jsonl: question id x is 40 tokens"):
        encode_qa(tok, long_q, 48, 16)


def test_an_answer_in_no_window_is_counted_and_trains_as_cls(qa):
    from ptft_dist.finetune.qa_data import answers_outside_windows

    tok = AutoTokenizer.from_pretrained(str(qa / "tok"))
    long_answer = " ".join(["river birds sang"] * 12)
    context = f"it was quiet. {long_answer}. the sun rose."
    sp = QASplit(["a", "b"], ["what is the code?"] * 2, [context, "the code is red."],
                 [[(long_answer, context.index(long_answer))], [("red", 12)]], "x")
    enc = encode_qa(tok, sp, 32, 8, train=True)
    assert answers_outside_windows(sp, enc) == 1  # the 36-word answer fits no 32-token window
    first = [f for f, e in enumerate(enc.example_of) if e == 0]
    assert len(first) > 1 and all(enc.targets["start_positions"][f] == 0 for f in first)
    (f_b,) = [f for f, e in enumerate(enc.example_of) if e == 1]
    s, t = enc.targets["start_positions"][f_b], enc.targets["end_positions"][f_b]
    assert sp.contexts[1][enc.offsets[f_b][s][0]:enc.offsets[f_b][t][1]] == "red"


def test_best_span_across_windows_respects_context_and_length():
    """Two windows of one question: the best valid span is in the second; a higher-scoring pair in
    the question (no offsets) or longer than max_answer_length is never picked."""
    context = "aa bb cc dd ee"
    offsets = [[None, None, (0, 2), (3, 5), (6, 8), None], [None, None, (6, 8), (9, 11), (12, 14), None]]
    enc = Encoded([[0] * 6, [0] * 6], [[0] * 6] * 2, offsets=offsets, example_of=np.array([0, 0]))
    w0 = np.zeros((6, 2), np.float32)
    w0[1] = [9, 9]  # question token: not a span
    w0[2, 0], w0[4, 1] = 5, 5  # "aa bb cc": 3 tokens, longer than max_answer_length=2
    w1 = np.zeros((6, 2), np.float32)
    w1[3, 0], w1[4, 1] = 4, 3  # "dd ee"
    w1[0] = [-1, -1]
    sp = QASplit(["q"], ["?"], [context], [[("dd ee", 9)]], "x")
    (a,) = answers(sp, enc, [w0, w1], n_best=5, max_len=2)
    assert (a.text, a.start, a.end, a.score) == ("dd ee", 9, 14, 7.0) and a.null_score == -2.0
    m = qa_metrics(sp, enc, [w0, w1], 5, 2, no_answer=False)
    assert m == {"f1": 1.0, "exact_match": 1.0}
    m2 = qa_metrics(sp, enc, [w0, w1], 5, 2, no_answer=True, null_threshold=-20.0)  # null - span = -9 > -20: ""
    assert m2["f1"] == 0.0 and m2["has_answer_f1"] == 0.0


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def full_qa(qa) -> dict:
    return run_finetune(qa_config(qa, "full"))


def test_full_squad_v2_learns_answers_and_no_answers(full_qa, qa):
    r = full_qa
    unanswerable = sum(1 for a in read_qa_file(str(qa / "test.json"), "fail").answers if not a) / N_TEST
    assert r["task"]["no_answer"] is True and r["task"]["features"]["train"] > N_TRAIN
    assert r["test"]["f1"] >= unanswerable + 0.4 and r["test"]["exact_match"] >= unanswerable + 0.4
    assert r["test"]["has_answer_f1"] >= 0.5 and r["test"]["no_answer_accuracy"] >= 0.5
    meta = json.loads((qa / "full" / "best" / "ptft_finetune.json").read_text())
    assert meta["extra"]["null_threshold"] == r["validation"]["null_threshold"]
    assert meta["extra"]["doc_stride"] == 16
    assert r["test"]["null_threshold"] == r["validation"]["null_threshold"]  # test uses validation's


def test_lora_squad_v1_jsonl_learns(qa):
    r = run_finetune(qa_config(qa, "lora", ext="jsonl", method="lora", lr=5.0e-3, export="both"))
    assert r["task"]["no_answer"] is False and "null_threshold" not in r["test"]
    assert r["test"]["exact_match"] >= 0.6  # answering "" (or a random span) scores ~0
    acfg = json.loads((qa / "lora" / "best" / "adapter" / "adapter_config.json").read_text())
    assert acfg["task_type"] == "QUESTION_ANS" and "qa_outputs" in acfg["modules_to_save"]


def test_evaluate_and_predict_through_the_cli(full_qa, qa, monkeypatch, capsys):
    from ptft_dist.cli import main

    best = qa / "full" / "best"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(best), "--config", str(qa / "full.yaml"), "--split", "test"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["f1"] == full_qa["test"]["f1"] and m["exact_match"] == full_qa["test"]["exact_match"]
    ctx = "it was quiet morning. people walked by river. the code is violet. birds sang over hills."
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"what is the code?\t{ctx}\n"))
    assert main(["predict", "--model", str(best)]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert row["answer"] == "violet" and ctx[row["start"]:row["end"]] == "violet" and not row["no_answer"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is the code?\n"))
    assert main(["predict", "--model", str(best)]) == 2
    assert "question<TAB>context" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["answer_start", "stride", "mismatch"])
def test_bad_input_is_one_line(case, qa, tmp_path, capsys):
    if case == "answer_start":
        ex = qa_examples(20, 9)
        ex[4]["answers"]["answer_start"][0] = 0
        cfg = qa_config(qa, "bad1", validation_file=str(write_qa_jsonl(tmp_path / "v.jsonl", ex)))
        expect = "v.jsonl:5 (id q9-4): answer_start=0 does not point at the answer"
    elif case == "stride":
        cfg, expect = qa_config(qa, "bad2", doc_stride=46), "finetune.doc_stride=46 must be below"
    else:
        cfg, expect = qa_config(qa, "bad3", task_type="token_classification", ext="jsonl"), "needs 'tokens' and 'tags'"
    data = yaml.safe_load(cfg.read_text())
    data["finetune"]["output_dir"] = str(tmp_path / "out")
    cfg.write_text(yaml.safe_dump(data))
    assert expect in refused(capsys, "finetune", "--config", cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_two_rank_metrics_equal_one_rank_evaluation_of_the_checkpoint(qa):
    """2 ranks, ZeRO-2, 47 validation questions (uneven windows per rank, the last batch padded by
    repetition): the gathered validation metrics, threshold included, equal a 1-process evaluation
    of the exported best epoch."""
    from ptft_dist.finetune.evaluate import evaluate_model

    cfg_path = qa_config(qa, "two", batch_size=8, epochs=1)
    r = run_finetune(cfg_path, nproc=2, launcher="deepspeed")
    assert r["world_size"] == 2
    m = evaluate_model(qa / "two" / "best", load_config(cfg_path).finetune, "validation", device=torch.device("cpu"))
    for key in ("f1", "exact_match", "has_answer_f1", "no_answer_accuracy"):
        assert m[key] == r["validation"][key], key
    assert m["null_threshold"] == pytest.approx(r["validation"]["null_threshold"], abs=1e-4)
