"""The corpora and the finished run the pretrain and convert bad-input tests share (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bad_inputs import pretrain_runs as runs


@pytest.fixture(scope="session")
def corpus_a(tmp_path_factory) -> Path:
    return runs.corpus_a(tmp_path_factory)


@pytest.fixture(scope="session")
def corpus_b(tmp_path_factory) -> Path:
    return runs.corpus_b(tmp_path_factory)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    return runs.trained_run(tmp_path_factory)
