"""Corpora and one finished tiny pretraining run, made once per test session and shared by the
pretrain and convert bad-input tests (each test copies what it damages)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.bad_inputs.cli_runs import ok, pretrain
from tests.corpus_factory import make_corpus, train_tokenizer

CORPUS_SHAPE = dict(shard_docs=(20, 10), val_docs=(6,), sentences=(2, 8), n_words=(4, 12))
_MADE: dict[str, Path] = {}


def corpus_a(factory) -> Path:
    if "a" not in _MADE:
        root = factory.mktemp("corpus_a")
        make_corpus(root, **CORPUS_SHAPE)
        _MADE["a"] = root
    return _MADE["a"]


def corpus_b(factory) -> Path:
    """Same vocabulary size as corpus A, another tokenizer: only the tokenizer hash tells them apart."""
    if "b" not in _MADE:
        root = factory.mktemp("corpus_b")
        make_corpus(root, **CORPUS_SHAPE, tokenizer_dir=train_tokenizer(400, seed=1))
        _MADE["b"] = root
    return _MADE["b"]


def trained_run(factory) -> Path:
    """A finished 1-process run on corpus A: checkpoints step_2 and step_4 (latest)."""
    if "run" not in _MADE:
        run_dir = factory.mktemp("trained") / "run"
        ok(pretrain(corpus_a(factory), run_dir))
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_4"
        _MADE["run"] = run_dir
    return _MADE["run"]


def copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    return dst
