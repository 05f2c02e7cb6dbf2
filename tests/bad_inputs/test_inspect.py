"""``ptft verify`` / ``ptft inspect`` on what is not a corpus, or with options that cannot mean anything
(docs/refusals.md)."""

from __future__ import annotations

import pytest

from tests.bad_inputs.refusal import refused
from tests.corpus_factory import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("inspect") / "c").root


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_folder_or_file_that_is_not_a_corpus(tmp_path, capsys, command):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "in.jsonl").write_text('{"text": "x"}\n')
    assert "raw: not a corpus (no manifest.json" in refused(capsys, command, tmp_path / "raw")
    assert "cannot read manifest" in refused(capsys, command, tmp_path / "raw" / "in.jsonl")


@pytest.mark.parametrize("options, needle", [
    (["--samples", "2", "--world-size", "0"], "--world-size must be >= 1, got 0"),
    (["--samples", "2", "--world-size", "2", "--rank", "2"], "--rank must be in [0, 2), got 2"),
    (["--ids", "--world-size", "2", "--rank", "-1"], "--rank must be in [0, 2), got -1"),
    (["--samples", "2", "--epoch", "-1"], "--epoch must be >= 0, got -1"),
    (["--samples", "-3"], "--samples must be >= 0, got -3"),
    (["--docs", "-1"], "--docs must be >= 0, got -1"),
    (["--samples", "1", "--seed", "-5"], "--seed must be >= 0, got -5"),
])
def test_inspect_options_out_of_range(corpus, capsys, options, needle):
    assert refused(capsys, "inspect", corpus, *options) == f"ptft: error: {needle}"
