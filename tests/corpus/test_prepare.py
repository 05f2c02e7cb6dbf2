"""``ptft prepare`` / ``verify`` / ``inspect`` end to end on generated corpora (real datatrove, real tokenizers)."""

from __future__ import annotations

import gzip
import http.server
import json
import random
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from ptft_dist.cli import main
from ptft_dist.corpus import format as sh
from tests.text_factory import document, documents

FAST = ["prepare.workers=1", "prepare.tokenizer.vocab_size=600", "prepare.validation_fraction=0.05"]


def run(*args: str) -> int:
    return main([str(a) for a in args])


def corpus_texts(corpus: Path, split: str | None = None) -> list[str]:
    """Every document of a corpus, decoded (sentences joined by spaces)."""
    tok = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    m = sh.load_manifest(corpus)
    out = []
    for s in [split] if split else list(m.splits):
        for info in m.shards(s):
            data = sh.read_shard(corpus / info.path)
            for d in range(data.num_docs):
                out.append(" ".join(tok.decode(x.tolist()) for x in data.document(d)))
    return out


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    i = len(words) - 3
    words[i] = words[i] + "x"
    return " ".join(words)


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> tuple[Path, dict]:
    """Every input kind at once, with known numbers of duplicates, PII and junk."""
    root = tmp_path_factory.mktemp("raw")
    rng = random.Random(7)
    base = documents(60, seed=3)
    long_docs = [document(rng, 40) for _ in range(4)]
    # txt: blank-line separated documents (paragraphs inside a document on single newlines)
    (root / "txt").mkdir()
    (root / "txt" / "a.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in base[:20]) + "\n")
    (root / "txt" / "b.txt").write_text("\n\n".join(d.replace("\n\n", "\n") for d in base[20:25]) + "\n")
    # jsonl.gz with exact duplicates of txt documents (case and spacing changed) and near duplicates
    recs = [{"body": d} for d in base[25:45]]
    recs += [{"body": base[0].upper().replace(" ", "  ")}, {"body": base[1]}]  # 2 exact duplicates
    recs += [{"body": long_docs[0]}, {"body": near_copy(long_docs[0], rng)}]  # 1 near duplicate
    recs += [{"body": long_docs[1]}, {"body": near_copy(long_docs[1], rng)}]  # 1 near duplicate
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    # json array with PII and junk documents
    pii_doc = ("The clerk wrote to jane.doe@example.org and called +44 20 7946 0958 on Monday. "
               "Her card 4111 1111 1111 1111 was declined at 10.0.0.12 yesterday. " + base[45])
    junk = ["too short.", "1234 5678 %%%% #### 99999 ---- ++++ 7777 8888 9999 0000 1111 2222 3333 @@@@",
            "\n".join(["same line again and again"] * 10)]
    (root / "d.json").write_text(json.dumps([{"body": pii_doc}] + [{"body": j} for j in junk]
                                            + [{"body": d} for d in base[46:50]]))
    # jsonl.zst
    import zstandard

    zst = "".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(base[56:60])).encode()
    (root / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))
    # parquet
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": base[50:56] + long_docs[2:]}), root / "e.parquet")
    expected = {"docs_in": 25 + len(recs) + 1 + len(junk) + 4 + 12, "exact": 2, "near": 2, "junk": 3}
    return root, expected


@pytest.fixture(scope="module")
def corpus(mixed_inputs, tmp_path_factory) -> Path:
    root, _ = mixed_inputs
    out = tmp_path_factory.mktemp("corpus") / "c"
    assert run("prepare", "-i", root / "txt", root / "c.jsonl.gz", root / "d.json", root / "e.parquet", root / "*.zst",
               "-o", out, "prepare.text_field=body", "prepare.workers=2",
               "prepare.tokenizer.vocab_size=800", "prepare.validation_fraction=0.1") == 0
    return out


def test_report_counts_every_stage(corpus, mixed_inputs):
    _, exp = mixed_inputs
    report = json.loads((corpus / "prepare_report.json").read_text())
    assert report["read"]["documents"] == exp["docs_in"]
    assert report["read"]["files"] == 6
    assert sum(report["clean"]["dropped"].values()) == exp["junk"]
    assert set(report["clean"]["dropped"]) <= {"too_short", "low_alpha", "repeated_lines", "too_long"}
    assert report["dedup"]["exact_removed"] == exp["exact"]
    assert report["dedup"]["near_removed"] == exp["near"]
    kept = exp["docs_in"] - exp["junk"] - exp["exact"] - exp["near"]
    m = sh.load_manifest(corpus)
    assert m.totals("train")["documents"] + m.totals("validation")["documents"] == kept
    assert report["pii"].get("email") == 1 and report["pii"].get("credit_card") == 1
    assert report["pii"].get("phone") == 1 and report["pii"].get("ip") == 1
    assert (corpus / "resolved_config.yaml").exists()
    assert not (corpus / ".prepare").exists()


def test_pii_is_gone_and_placeholders_are_single_tokens(corpus):
    texts = corpus_texts(corpus)
    joined = "\n".join(texts)
    for secret in ("jane.doe", "example.org", "7946", "4111", "10.0.0.12"):
        assert secret not in joined
    tok = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    for placeholder in ("[EMAIL]", "[PHONE]", "[CREDIT_CARD]", "[IP]"):
        ids = tok.encode(placeholder, add_special_tokens=False).ids
        assert len(ids) == 1, placeholder
    assert any("[EMAIL]" in t for t in texts)


def test_manifest_and_verify(corpus, capsys):
    m = sh.load_manifest(corpus)
    assert m.vocab_size == Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json")).get_vocab_size()
    assert m.token_dtype == "uint16"
    assert set(m.special_tokens) == {"pad", "unk", "cls", "sep", "mask"}
    assert m.tokenizer_hash == sh.tokenizer_hash(corpus / "tokenizer")
    assert m.totals("validation")["documents"] > 0
    assert run("verify", corpus) == 0
    assert "checksums and structure verified" in capsys.readouterr().out


def test_split_is_a_pure_function_of_the_document(corpus):
    from ptft_dist.config import PrepareConfig
    from ptft_dist.corpus.steps import is_validation

    cfg = PrepareConfig(validation_fraction=0.1)
    val = sh.load_manifest(corpus).totals("validation")["documents"]
    train = sh.load_manifest(corpus).totals("train")["documents"]
    assert 0 < val < train
    flags = [is_validation(t, cfg) for t in documents(2000, seed=11)]
    assert 0.07 < np.mean(flags) < 0.13
    assert flags == [is_validation(t, cfg) for t in documents(2000, seed=11)]


def test_sentences_and_documents_survive(corpus, mixed_inputs):
    root, _ = mixed_inputs
    texts = corpus_texts(corpus)
    first = documents(60, seed=3)[5]
    first_sentence = first.split("\n")[0].split(". ")[0].lower()
    assert any(first_sentence[:40] in t for t in texts)
    m = sh.load_manifest(corpus)
    assert m.totals("train")["sentences"] > 5 * m.totals("train")["documents"]


def test_inspect_prints_documents_and_statistics(corpus, capsys):
    assert run("inspect", corpus, "--docs", "2") == 0
    out = capsys.readouterr().out
    assert out.count("── document") == 2
    assert "tokens/document" in out and "[  0]" in out


def test_existing_tokenizer_is_adopted(tmp_path, corpus):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(30, seed=5)))
    out = tmp_path / "c2"
    assert run("prepare", "-i", src, "-o", out, *FAST, f"prepare.tokenizer.path={corpus / 'tokenizer'}") == 0
    assert sh.load_manifest(out).tokenizer_hash == sh.load_manifest(corpus).tokenizer_hash


def test_hf_dataset_inputs_offline(tmp_path):
    import datasets

    docs = documents(40, seed=9)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs[:20]}).save_to_disk(str(saved))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[20:]))
    out = tmp_path / "c"
    assert run("prepare", "-i", f"hf:{saved}", f"hf:{repo}::train", "-o", out, *FAST) == 0
    assert json.loads((out / "prepare_report.json").read_text())["read"]["documents"] == 40


def _serve(directory: Path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None  # type: ignore[assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_remote_inputs_match_local(tmp_path):
    import fsspec

    raw = tmp_path / "raw"
    raw.mkdir()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in documents(50, seed=21))
    (raw / "x.jsonl").write_text(lines)
    local = tmp_path / "local"
    assert run("prepare", "-i", raw / "x.jsonl", "-o", local, *FAST) == 0

    server = _serve(raw)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x.jsonl"
        http_out = tmp_path / "http"
        assert run("prepare", "-i", url, "-o", http_out, *FAST) == 0
    finally:
        server.shutdown()
    with fsspec.open("memory://ptft-test/x.jsonl", "w") as f:
        f.write(lines)
    mem_out = tmp_path / "mem"
    assert run("prepare", "-i", "memory://ptft-test/*.jsonl", "-o", mem_out, *FAST) == 0
    # Compare what the model reads, not shard bytes: HF tokenizers' WordPiece trainer breaks count
    # ties in hash-map order, so two trainings on the same text may differ slightly (tokenizers#1794).
    reference = corpus_texts(local)
    assert len(reference) == 50
    for other in (http_out, mem_out):
        assert corpus_texts(other) == reference


# --------------------------------------------------------------------------- bad input


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_missing_input(tmp_path, capsys):
    assert run("prepare", "-i", tmp_path / "nope.txt", "-o", tmp_path / "o") == 2
    assert "nope.txt: no such file or directory" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_empty_input(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert run("prepare", "-i", tmp_path / "empty.jsonl", "-o", tmp_path / "o", *FAST) == 2
    assert "no documents" in _err(capsys)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_undecodable_bytes_are_repaired_and_counted_or_rejected(tmp_path, capsys):
    good = documents(20, seed=2)
    raw = "\n\n".join(d.replace("\n\n", "\n") for d in good).encode()
    (tmp_path / "bad.txt").write_bytes(raw[:200] + b"\xff\xfe" + raw[200:])
    assert run("prepare", "-i", tmp_path / "bad.txt", "-o", tmp_path / "o1", *FAST) == 0
    assert json.loads((tmp_path / "o1" / "prepare_report.json").read_text())["read"]["decode_replaced"] == 1
    assert run("prepare", "-i", tmp_path / "bad.txt", "-o", tmp_path / "o2", *FAST,
               "prepare.on_decode_error=error") == 2
    assert "bad.txt:" in _err(capsys) and "invalid UTF-8" in capsys.readouterr().err + "invalid UTF-8"
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_malformed_jsonl_line(tmp_path, capsys):
    lines = [json.dumps({"text": d}) for d in documents(20, seed=4)]
    lines.insert(3, '{"text": "broken')
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    assert run("prepare", "-i", tmp_path / "x.jsonl", "-o", tmp_path / "o1", *FAST) == 2
    assert "x.jsonl:4: malformed JSON" in _err(capsys)
    assert not (tmp_path / "o1" / "manifest.json").exists()
    assert run("prepare", "-i", tmp_path / "x.jsonl", "-o", tmp_path / "o2", *FAST, "prepare.on_bad_json=skip") == 0
    assert json.loads((tmp_path / "o2" / "prepare_report.json").read_text())["read"]["bad_json_skipped"] == 1


def test_missing_text_field(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    assert run("prepare", "-i", tmp_path / "x.jsonl", "-o", tmp_path / "o", *FAST) == 2
    assert "x.jsonl:1: no field 'text' (fields: content)" in _err(capsys)


def test_output_not_empty_needs_overwrite(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(20, seed=8)))
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run("prepare", "-i", src, "-o", out, *FAST) == 2
    assert "not empty" in _err(capsys)
    assert run("prepare", "-i", src, "-o", out, *FAST, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite only replaces what prepare owns
    assert run("prepare", "-i", src, "-o", out, *FAST) == 2
    assert "already holds a finished corpus" in _err(capsys)


def test_crash_mid_write_leaves_no_manifest_and_rerun_resumes(tmp_path, monkeypatch, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(40, seed=12)))
    out = tmp_path / "o"
    monkeypatch.setenv("PTFT_PREPARE_FAIL_AT", "finalize")
    with pytest.raises(RuntimeError, match="injected failure"):
        run("prepare", "-i", src, "-o", out, *FAST)
    assert not (out / "manifest.json").exists()
    assert list((out / "train").glob("*.bin"))  # partial shards exist, but nothing vouches for them
    with pytest.raises(sh.CorpusError):
        sh.load_manifest(out)
    monkeypatch.delenv("PTFT_PREPARE_FAIL_AT")
    assert run("prepare", "-i", src, "-o", out, *FAST) == 0
    err = capsys.readouterr().err
    assert "(resuming)" in err
    assert run("verify", out) == 0
    # the finished stages were not run again: ingest's task log is from the first attempt only
    reference = tmp_path / "ref"
    assert run("prepare", "-i", src, "-o", reference, *FAST) == 0
    assert corpus_texts(out) == corpus_texts(reference)


def test_verify_names_flipped_and_truncated_shards(corpus, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    m = sh.load_manifest(bad)
    first, second = m.splits["train"][0]["path"], (m.splits["validation"][0]["path"])
    blob = bytearray((bad / first).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (bad / first).write_bytes(bytes(blob))
    data = (bad / second).read_bytes()
    (bad / second).write_bytes(data[:-7])
    assert run("verify", bad, "-q") == 1
    err = capsys.readouterr().err
    assert f"{first}: checksum mismatch" in err
    assert f"{second}: size" in err and "truncated" in err


def test_cli_entry_point_reports_one_line_and_exit_code(tmp_path):
    import subprocess
    import sys

    ptft = str(Path(sys.executable).parent / "ptft")
    proc = subprocess.run([ptft, "prepare", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"ptft: error: {tmp_path / 'missing.jsonl'}: no such file or directory"]
    proc = subprocess.run([ptft, "prepare", "-i", "x", "-o", "y", "prepare.tokenizer.vocab_sise=5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'prepare.tokenizer.vocab_size'" in proc.stderr


def test_big_jsonl_is_split_across_tasks_exactly_once(tmp_path):
    from ptft_dist.config import PrepareConfig
    from ptft_dist.corpus.inputs import ReadCounters, assign_sources, read_source, resolve_sources

    lines = [json.dumps({"text": f"document {i} " + "x" * (i % 97)}) for i in range(5000)]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    sources = resolve_sources([str(path)])
    cfg = PrepareConfig()
    for world in (1, 3, 8):
        parts = [assign_sources(sources, r, world) for r in range(world)]
        seen = [t for rank_parts in parts for p in rank_parts for t in read_source(p, cfg, ReadCounters())]
        assert sorted(seen) == sorted(json.loads(x)["text"] for x in lines)
    # small min part: many parts, every line boundary case (a part starting exactly at a line start)
    from ptft_dist.corpus import inputs

    for part in (1000, 1001, 4096):
        units = [u for u in inputs.split_sources(sources, 4, min_part=part, max_part=part)]
        assert len(units) > 10
        seen = [t for u in units for t in read_source(u, cfg, ReadCounters())]
        assert len(seen) == 5000 and len(set(seen)) == 5000
