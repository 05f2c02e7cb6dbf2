"""``ptft prepare`` mistakes: nothing of the user's deleted, its own output never read back, no traceback,
nothing dropped without a count (docs/refusals.md; docs/design.md, guarantee 9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ptft_dist.corpus import format as sh
from tests.bad_inputs.refusal import accepted, refused, snapshot
from tests.text_factory import documents

FAST = ["prepare.workers=1", "prepare.tokenizer.vocab_size=600", "prepare.validation_fraction=0.05"]


def _jsonl(path: Path, n: int = 20, seed: int = 1, extra: list[dict] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"text": d} for d in documents(n, seed=seed)] + (extra or [])
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _report(corpus: Path) -> dict:
    return json.loads((corpus / "prepare_report.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One real prepared corpus; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    from ptft_dist.cli import main

    assert main(["prepare", "-i", str(_jsonl(root / "raw" / "in.jsonl", 24, seed=3)), "-o", str(root / "corpus"),
                 *FAST]) == 0
    return root / "corpus"


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "corpus"
    shutil.copytree(finished, out)
    return out


# --------------------------------------------------------------------------- --overwrite


def test_prepare_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    src = _jsonl(tmp_path / "raw" / "in.jsonl")
    out = tmp_path / "mine"
    for rel, text in {"train/notes.txt": "my notes", "validation/part-0.bin": "x", "tokenizer/vocab.txt": "[PAD]\n",
                      "README.md": "my project"}.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = snapshot(out)
    err = refused(capsys, "prepare", "-i", src, "-o", out, "--overwrite", *FAST)
    assert "which no ptft prepare wrote" in err and "tokenizer/" in err and "train/" in err
    assert snapshot(out) == before
    err = refused(capsys, "prepare", "-i", src, "-o", out, *FAST)  # without --overwrite: no hint to use it
    assert "which no ptft prepare wrote" in err and "--overwrite" not in err
    assert snapshot(out) == before


def test_prepare_overwrite_keeps_the_input_it_is_about_to_read(tmp_path, capsys):
    out = tmp_path / "corpus"
    src = _jsonl(out / "train" / "in.jsonl")
    before = snapshot(out)
    err = refused(capsys, "prepare", "-i", src, "-o", out, "--overwrite", *FAST)
    assert f"will not read it as input: inside the output directory {out}" in err
    assert snapshot(out) == before


def test_prepare_overwrite_refuses_a_manifest_json_it_did_not_write(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"my": "inventory"}))
    err = refused(capsys, "prepare", "-i", src, "-o", out, *FAST)
    assert "which no ptft prepare wrote" in err and "finished corpus" not in err
    refused(capsys, "prepare", "-i", src, "-o", out, "--overwrite", *FAST)
    assert json.loads((out / "manifest.json").read_text()) == {"my": "inventory"}


def test_prepare_overwrite_removes_only_files_prepare_wrote(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "NOTES.md").write_text("how I made this corpus")
    (out / "train" / "keep-me.txt").write_text("mine")
    before = snapshot(out)
    err = refused(capsys, "prepare", "-i", _jsonl(tmp_path / "in.jsonl", seed=5), "-o", out, "--overwrite", *FAST)
    assert "train/keep-me.txt was not written by it: move it away first (nothing was removed)" in err
    assert snapshot(out) == before
    assert accepted(capsys, "verify", out, "-q") is not None  # the old corpus still verifies

    (out / "train" / "keep-me.txt").unlink()
    old_shards = {s["path"] for s in sh.load_manifest(out).splits["train"]}
    log = accepted(capsys, "prepare", "-i", tmp_path / "in.jsonl", "-o", out, "--overwrite", *FAST)
    assert "--overwrite: removed" in log
    assert (out / "NOTES.md").read_text() == "how I made this corpus"
    assert _report(out)["read"]["documents"] == 20  # the new input, not the old 24 documents
    assert old_shards >= {s["path"] for s in sh.load_manifest(out).splits["train"]}
    accepted(capsys, "verify", out, "-q")


def test_prepare_overwrite_interrupted_midway_is_still_recognised(finished, tmp_path, capsys, monkeypatch):
    """The new state file is written before anything is removed: a crash mid-overwrite leaves a
    folder that the next --overwrite (or a plain resume) still knows as prepare's."""
    out = _copy(finished, tmp_path)
    src = _jsonl(tmp_path / "in.jsonl", seed=6)
    monkeypatch.setenv("PTFT_PREPARE_FAIL_AT", "ingest")
    with pytest.raises(RuntimeError, match="injected failure"):
        accepted(capsys, "prepare", "-i", src, "-o", out, "--overwrite", *FAST)
    monkeypatch.delenv("PTFT_PREPARE_FAIL_AT")
    assert not (out / "manifest.json").exists() and (out / ".prepare" / "state.json").is_file()
    assert "(resuming)" in accepted(capsys, "prepare", "-i", src, "-o", out, *FAST)
    assert _report(out)["read"]["documents"] == 20
    accepted(capsys, "verify", out, "-q")


def test_prepare_resume_with_an_unreadable_state_file_is_one_line(finished, tmp_path, capsys):
    out = tmp_path / "o"
    (out / ".prepare").mkdir(parents=True)
    (out / ".prepare" / "state.json").write_text("{not json")
    err = refused(capsys, "prepare", "-i", _jsonl(tmp_path / "in.jsonl"), "-o", out, *FAST)
    assert "holds an unfinished prepare of other inputs or settings; pass --overwrite" in err


# --------------------------------------------------------------------------- output vs inputs


def test_prepare_never_reads_its_own_output_from_an_input_folder(tmp_path, capsys):
    data = tmp_path / "data"
    _jsonl(data / "in.jsonl", 20, seed=7)
    for attempt in range(2):  # the second run used to read the first one's .json files and fail
        log = accepted(capsys, "prepare", "-i", data, "-o", data / "corpus", *FAST, *(["--overwrite"] * attempt))
        assert _report(data / "corpus")["read"] == {**_report(data / "corpus")["read"], "files": 1, "documents": 20}
    assert "skipped" in log and "ptft's own output or prepared corpora" in log


def test_prepare_refuses_a_prepared_corpus_as_input(finished, tmp_path, capsys):
    err = refused(capsys, "prepare", "-i", finished, "-o", tmp_path / "again", *FAST)
    assert "a corpus made by ptft prepare (it reads raw text)" in err
    err = refused(capsys, "prepare", "-i", finished / "prepare_report.json", "-o", tmp_path / "again", *FAST)
    assert "will not read it as input: part of" in err
    assert not (tmp_path / "again").exists()


def test_prepare_refuses_an_output_that_is_its_input_folder(tmp_path, capsys):
    data = tmp_path / "data"
    _jsonl(data / "in.jsonl")
    before = snapshot(data)
    err = refused(capsys, "prepare", "-i", data, "-o", data, "--overwrite", *FAST)
    assert "inside the output directory" in err
    err = refused(capsys, "prepare", "-i", str(data / "*.jsonl"), "-o", data, "--overwrite", *FAST)
    assert "inside the output directory" in err
    assert snapshot(data) == before


def test_prepare_output_below_a_file_is_one_line(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl")
    err = refused(capsys, "prepare", "-i", src, "-o", src / "corpus", *FAST)
    assert err == f"ptft: error: {src / 'corpus'}: cannot be the output directory: {src} is a file"
    err = refused(capsys, "prepare", "-i", src, "-o", src, *FAST)
    assert "inside the output directory" in err or "is a file" in err
    assert src.read_text().count("\n") == 20


# --------------------------------------------------------------------------- counted, never silently dropped


def test_prepare_counts_null_texts_and_names_skipped_files(tmp_path, capsys):
    data = tmp_path / "data"
    _jsonl(data / "in.jsonl", 20, seed=9, extra=[{"text": None}] * 3 + [{"text": ""}] * 2)
    (data / "README.md").write_text("about this data")
    (data / "labels.csv").write_text("a,b\n")
    log = accepted(capsys, "prepare", "-i", data, "-o", tmp_path / "corpus", *FAST)
    read = _report(tmp_path / "corpus")["read"]
    assert (read["documents"], read["null_text_skipped"], read["empty_text_skipped"]) == (20, 3, 2)
    assert "3 null texts skipped, 2 empty texts skipped" in log
    assert "skipped 2 file(s) that are not .txt/.jsonl/.json/.parquet" in log
    assert "README.md" in log and "labels.csv" in log


def test_prepare_of_only_null_texts_says_so(tmp_path, capsys):
    src = tmp_path / "nulls.jsonl"
    src.write_text('{"text": null}\n{"text": null}\n{"text": ""}\n')
    err = refused(capsys, "prepare", "-i", src, "-o", tmp_path / "o", *FAST)
    assert "every record's text field is null (2) or empty (1)" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_prepare_of_a_folder_without_readable_files_names_what_it_saw(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.md").write_text("x")
    err = refused(capsys, "prepare", "-i", tmp_path / "data", "-o", tmp_path / "o", *FAST)
    assert "folder holds no .txt/.jsonl/.json/.parquet files (1 other file(s), e.g. notes.md)" in err
    assert not (tmp_path / "o").exists()


def test_prepare_of_a_number_column_is_refused(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    err = refused(capsys, "prepare", "-i", tmp_path / "n.parquet", "-o", tmp_path / "o", *FAST)
    assert "column 'text' holds int, not text" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("setting, needle", [
    ("prepare.min_sentence_chars=100000", "no document has a sentence of prepare.min_sentence_chars characters"),
    ("prepare.validation_fraction=0.999", "documents went to the validation split and none to train"),
])
def test_prepare_that_leaves_nothing_to_train_on_says_why(tmp_path, capsys, setting, needle):
    err = refused(capsys, "prepare", "-i", _jsonl(tmp_path / "in.jsonl"), "-o", tmp_path / "o", *FAST, setting)
    assert needle in err
    assert not (tmp_path / "o" / "manifest.json").exists() and not (tmp_path / "o" / "tokenizer").exists()
