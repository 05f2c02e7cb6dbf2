"""``ptft pretrain`` → ``ptft convert`` on a corpus served from remote storage: moto's S3 server
(reachable only through ``data.storage_options``) and a plain HTTP server, 2 CPU ranks under the
real ``deepspeed`` launcher. A remote run must be the local run: same losses (train and eval),
bitwise the same weights, the corpus tokenizer in the export. And ``data.expected_tokenizer``
pins the tokenizer: a corpus made with another one is refused with both hashes named.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ptft_dist.config import load_config
from ptft_dist.corpus.format import CorpusError, load_manifest, tokenizer_hash
from ptft_dist.pretrain.loop import _corpus_manifest
from tests.corpus_factory import make_corpus, train_tokenizer
from tests.pretrain.test_pretrain import PY, ROOT, _env, assert_same_weights, command, losses
from tests.remote_servers import MotoS3, isolate_aws_env, serve_http

STEPS = 4
SHORT = [f"train.max_steps={STEPS}", "checkpoint.every=4", "train.eval_every=2", "data.whole_word_mask=true",
         "train.zero_stage=2", "train.log_sample_ids=false"]


def _pretrain(corpus: str, run_dir: Path, *overrides: str, nproc: int = 2, expect: int = 0) -> str:
    """The real CLI (2 ranks: the deepspeed launcher) with no AWS credentials in its environment."""
    proc = subprocess.run(command(corpus, run_dir, *SHORT, *overrides, nproc=nproc), env=isolate_aws_env(_env()),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc.stderr


def _eval_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "eval"}


def _convert(run_dir: Path, out: Path) -> dict:
    proc = subprocess.run([PY, "-m", "ptft_dist.cli", "convert", str(run_dir), "-o", str(out)], env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "ptft_export.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote_corpus")
    make_corpus(root, shard_docs=(20, 12, 25), val_docs=(8,), sentences=(2, 10), n_words=(4, 14))
    return root


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local_run")
    _pretrain(str(corpus), run_dir)
    return run_dir


def _assert_same_run(run_dir: Path, reference: Path, corpus: Path, tmp_path: Path) -> None:
    ref = losses(reference)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert losses(run_dir) == ref
    assert _eval_losses(run_dir) == _eval_losses(reference) and len(_eval_losses(reference)) == 2
    assert_same_weights(run_dir, reference)
    report = _convert(run_dir, tmp_path / "hf")
    assert report["verified"] and report["step"] == STEPS
    assert report["tokenizer_hash"] == load_manifest(corpus).tokenizer_hash
    for name in ("tokenizer.json", "vocab.txt"):
        assert (tmp_path / "hf" / name).read_bytes() == (corpus / "tokenizer" / name).read_bytes()


@pytest.mark.distributed
@pytest.mark.slow
def test_s3_corpus_trains_like_the_local_one_and_converts(corpus, local_run, tmp_path):
    with MotoS3() as s3:
        url = s3.upload(corpus, "corpora/tiny")
        opts = [f"data.storage_options.{k}={v}" for k, v in s3.storage_options.items()]
        run_dir = tmp_path / "run"
        _pretrain(url, run_dir, *opts, f"data.cache_dir={tmp_path / 'cache'}")
    assert {p.name for p in (tmp_path / "cache").glob("*.bin")} == {
        f"{s['sha256']}.bin" for split in ("train", "validation") for s in load_manifest(corpus).splits[split]}
    _assert_same_run(run_dir, local_run, corpus, tmp_path)
    # the credentials stay out of what the run keeps (resolved config, TensorBoard); the endpoint is there
    assert s3.endpoint in (run_dir / "resolved_config.yaml").read_text()
    for f in [run_dir / "resolved_config.yaml", *(run_dir / "tb").rglob("*")]:
        assert not f.is_file() or s3.SECRET.encode() not in f.read_bytes(), f


@pytest.mark.distributed
@pytest.mark.slow
def test_http_corpus_trains_like_the_local_one_and_converts(corpus, local_run, tmp_path):
    with serve_http(tmp_path / "www") as srv:
        shutil.copytree(corpus, srv.root / "tiny")
        run_dir = tmp_path / "run"
        _pretrain(f"{srv.url}/tiny", run_dir, f"data.cache_dir={tmp_path / 'cache'}")
        assert not [p for m, p, _ in srv.log if m == "GET" and p.endswith("/")]  # no listing needed
    _assert_same_run(run_dir, local_run, corpus, tmp_path)


# --------------------------------------------------------------------------- data.expected_tokenizer


def test_a_run_pinned_to_another_tokenizer_is_refused_before_it_starts(corpus, tmp_path):
    other = train_tokenizer(vocab_size=300)
    ours, theirs = load_manifest(corpus).tokenizer_hash, tokenizer_hash(other)
    for pin in (theirs, str(other)):
        run_dir = tmp_path / f"run-{len(pin)}"
        err = _pretrain(str(corpus), run_dir, f"data.expected_tokenizer={pin}", nproc=1, expect=2)
        errors = [line for line in err.splitlines() if line.startswith("ptft: error:")]
        assert len(errors) == 1, err[-2000:]
        assert f"tokenized with tokenizer {ours}" in errors[0] and f"expects tokenizer {theirs}" in errors[0]
        assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing written


def test_a_run_pinned_to_its_corpus_tokenizer_starts(corpus):
    for pin in (load_manifest(corpus).tokenizer_hash, str(corpus / "tokenizer"), str(corpus)):
        cfg = load_config(None, [f"data.corpus={corpus}", f"data.expected_tokenizer={pin}"])
        assert _corpus_manifest(cfg).tokenizer_hash == load_manifest(corpus).tokenizer_hash
    cfg = load_config(None, [f"data.corpus={corpus}", f"data.expected_tokenizer={'0' * 16}"])
    with pytest.raises(CorpusError, match="expects tokenizer 0000000000000000"):
        _corpus_manifest(cfg)
