"""Corpora and inputs on remote storage (ptft_dist/corpus/storage.py and every reader that uses it):
an S3 endpoint (moto's server on 127.0.0.1, read through s3fs) reachable only with
``storage_options``, a plain HTTP server without directory listings, and ``gs://`` routed to gcsfs.

A real GCS endpoint cannot run here (no network; the usual fake, fake-gcs-server, is a Go binary
that no package registry ships): for gs:// the tests check that the URL goes to gcsfs with the
storage options and that gcsfs then talks to the configured endpoint, nothing more.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ptft_dist.cli import main
from ptft_dist.config import DataConfig, config_hash, load_config
from ptft_dist.corpus.format import CorpusError, load_manifest, tokenizer_hash
from ptft_dist.corpus.storage import StorageError, url_to_fs
from ptft_dist.corpus.tokenizer import check_tokenizer, copy_tokenizer, load_tokenizer, load_vocab
from ptft_dist.inspection import corpus_statistics, print_documents, print_samples
from ptft_dist.stream.loader import build_train_loader, build_validation_loader
from tests.corpus.test_prepare import FAST, corpus_texts
from tests.corpus_factory import make_corpus, train_tokenizer
from tests.remote_servers import MotoS3, isolate_aws_env, serve_http
from tests.text_factory import documents

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("storage-corpus")
    make_corpus(root, shard_docs=(7, 3, 9), val_docs=(4,), sentences=(2, 8), n_words=(3, 10), seed=5)
    return root


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server; this process can reach it only through ``s3.storage_options``."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in isolate_aws_env({}).items():
        monkeypatch.setenv(name, value)
    with MotoS3() as server:
        yield server


def _cfg(corpus: str, cache: Path, storage_options: dict, **kw) -> DataConfig:
    return DataConfig(corpus=corpus, cache_dir=str(cache), max_seq_len=48, shuffle_window_shards=2,
                      whole_word_mask=True, fetch_retries=0, storage_options=storage_options, **kw)


def _batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.numpy().copy() if hasattr(v, "numpy") else v for k, v in batch.items()})
        if n is not None and len(out) == n:
            break
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(np.asarray(x[k]), np.asarray(y[k])), k


def _samples_text(corpus: str, cfg: DataConfig, split: str = "train") -> list[str]:
    out = io.StringIO()
    print_samples(corpus, cfg, 6, 0, 2, 1, ids_only=False, split=split, out=out)
    return out.getvalue().splitlines()[1:]  # the first line names the corpus


def test_every_read_of_an_s3_corpus_uses_storage_options(local_corpus, s3, tmp_path, capsys):
    url = s3.upload(local_corpus, "corpora/c1")
    opts = s3.storage_options
    # without the options nothing can be read (no credentials, no endpoint): the isolation works
    with pytest.raises(CorpusError, match="cannot read manifest"):
        load_manifest(url)
    with pytest.raises(CorpusError, match="cannot copy the corpus tokenizer"):
        copy_tokenizer(url, tmp_path / "no_tok", {})
    assert not (tmp_path / "no_tok").exists()

    local = str(local_corpus)
    assert load_manifest(url, opts) == load_manifest(local)
    assert load_vocab(url, opts) == load_vocab(local)
    assert load_tokenizer(url, opts).to_str() == load_tokenizer(local).to_str()
    tok = copy_tokenizer(url, tmp_path / "tok", opts, expected_hash=load_manifest(local).tokenizer_hash)
    assert sorted(p.name for p in tok.iterdir()) == sorted(p.name for p in (local_corpus / "tokenizer").iterdir())
    for p in tok.iterdir():
        assert p.read_bytes() == (local_corpus / "tokenizer" / p.name).read_bytes()

    # shards, both splits, whole-word masking (reads the vocabulary); a forked loader worker too
    remote_cfg, local_cfg = _cfg(url, tmp_path / "cache", opts), _cfg(local, tmp_path / "unused", {})
    remote = _batches(build_train_loader(remote_cfg, 3, 2, 1, num_workers=1))
    _assert_same(remote, _batches(build_train_loader(local_cfg, 3, 2, 1, num_workers=0)))
    _assert_same(_batches(build_validation_loader(remote_cfg, 3, 2, 1)),
                 _batches(build_validation_loader(local_cfg, 3, 2, 1)))
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 4  # every shard came through the cache

    # ptft inspect: samples, documents and statistics
    assert _samples_text(url, remote_cfg) == _samples_text(local, local_cfg)
    assert _samples_text(url, remote_cfg, "validation") == _samples_text(local, local_cfg, "validation")
    for split in ("train", "validation"):
        assert corpus_statistics(url, split, remote_cfg) == corpus_statistics(local, split)
    capsys.readouterr()
    print_documents(url, 5, "train", remote_cfg)
    remote_docs = capsys.readouterr().out
    print_documents(local, 5, "train")
    assert remote_docs == capsys.readouterr().out and remote_docs.count("── document") == 5


def test_inspect_cli_reads_s3_with_options_from_overrides(local_corpus, s3, tmp_path, capsys):
    url = s3.upload(local_corpus, "corpora/c2")
    opts = [f"data.storage_options.{k}={v}" for k, v in s3.storage_options.items()]
    opts.append(f"data.cache_dir={tmp_path / 'cache'}")
    assert main(["inspect", url, "--docs", "2", *opts]) == 0
    remote = capsys.readouterr().out
    assert main(["inspect", str(local_corpus), "--docs", "2"]) == 0
    assert remote == capsys.readouterr().out and "── train:" in remote
    assert main(["inspect", url, "--docs", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ptft: error: ")


def test_tokenizer_copies_from_http_without_directory_listing(local_corpus, tmp_path):
    import shutil

    with serve_http(tmp_path / "www") as srv:
        shutil.copytree(local_corpus, srv.root / "c")
        url = f"{srv.url}/c"
        want = load_manifest(local_corpus).tokenizer_hash
        tok = copy_tokenizer(url, tmp_path / "tok", expected_hash=want)
        names = sorted(p.name for p in (local_corpus / "tokenizer").iterdir())
        assert sorted(p.name for p in tok.iterdir()) == names
        # a tokenizer/ replaced after prepare: refused, nothing left behind
        other = train_tokenizer(vocab_size=300)
        shutil.copy(other / "tokenizer.json", srv.root / "c" / "tokenizer" / "tokenizer.json")
        with pytest.raises(CorpusError, match=f"says {want}"):
            copy_tokenizer(url, tmp_path / "tok2", expected_hash=want)
        assert not (tmp_path / "tok2").exists() and not list(tmp_path.glob(".tok2*"))


def test_gs_urls_go_to_gcsfs_with_the_storage_options(tmp_path):
    from gcsfs.core import GCSFileSystem

    fs, path = url_to_fs("gs://ptft-bucket/corpora/c", {"token": "anon", "endpoint_url": "http://127.0.0.1:9"})
    assert isinstance(fs, GCSFileSystem) and path == "ptft-bucket/corpora/c"
    assert fs.storage_options == {"token": "anon", "endpoint_url": "http://127.0.0.1:9"}
    # the manifest read goes to the configured endpoint, as the GCS JSON API (a 404 there: "not a
    # corpus"). gcsfs's experimental gRPC bucket probing is switched off: it needs a real GCS.
    with serve_http(tmp_path / "www") as srv:
        code = ("import sys; from ptft_dist.corpus.format import load_manifest\n"
                "try:\n    load_manifest('gs://ptft-bucket/corpora/c', {'token': 'anon', 'endpoint_url': sys.argv[1]})\n"
                "except Exception as e:\n    print(type(e).__name__, e)\n")
        env = {**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", code, srv.url], env=env, capture_output=True, text=True,
                              timeout=120)
        assert "CorpusError gs://ptft-bucket/corpora/c: not a corpus" in proc.stdout, proc.stdout + proc.stderr
        paths = [p for method, p, _ in srv.log if method == "GET"]
        assert any("b/ptft-bucket/o/corpora/c/manifest.json" in p for p in paths), srv.log


def test_a_missing_protocol_package_names_the_extra(monkeypatch):
    import fsspec

    def no_s3fs(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")  # what fsspec says when s3fs is not installed

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3fs)
    with pytest.raises(StorageError, match=r"Install s3fs to access S3; pip install 'ptft-dist\[s3\]'"):
        url_to_fs("s3://bucket/corpus")


# --------------------------------------------------------------------------- prepare from s3


def test_prepare_reads_s3_inputs_with_storage_options(s3, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = documents(40, seed=31)
    (raw / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:25]))
    (raw / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[25:]))
    url = s3.upload(raw, "raw")
    opts = [f"prepare.storage_options.{k}={v}" for k, v in s3.storage_options.items()]

    assert main(["prepare", "-i", f"{url}/*.jsonl", "-o", str(tmp_path / "none"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ptft: error: ") and "prepare.storage_options" in err
    assert not (tmp_path / "none" / "manifest.json").exists()

    assert main(["prepare", "-i", str(raw), "-o", str(tmp_path / "local"), *FAST]) == 0
    assert main(["prepare", "-i", f"{url}/*.jsonl", "-o", str(tmp_path / "remote"), *FAST, *opts]) == 0
    reference = corpus_texts(tmp_path / "local")
    assert len(reference) == 40 and corpus_texts(tmp_path / "remote") == reference
    # the secret stays out of what the corpus keeps; the endpoint is recorded
    saved = yaml.safe_load((tmp_path / "remote" / "resolved_config.yaml").read_text())
    assert saved["prepare"]["storage_options"] == {**s3.storage_options, "key": "<redacted>", "secret": "<redacted>"}
    assert s3.SECRET not in (tmp_path / "remote" / "resolved_config.yaml").read_text()


# --------------------------------------------------------------------------- config


def test_storage_options_overrides_nest_parse_and_stay_out_of_hashes():
    cfg = load_config(None, ["data.storage_options.client_kwargs.region_name=eu-west-1",
                             "data.storage_options.anon=false", "data.storage_options.secret=s"])
    assert cfg.data.storage_options == {"client_kwargs": {"region_name": "eu-west-1"}, "anon": False, "secret": "s"}
    assert config_hash(cfg) == config_hash(load_config(None, []))


# --------------------------------------------------------------------------- data.expected_tokenizer


def test_expected_tokenizer_as_hash_or_directory(local_corpus, tmp_path):
    manifest = load_manifest(local_corpus)
    ours = manifest.tokenizer_hash
    other_dir = train_tokenizer(vocab_size=300)
    other = tokenizer_hash(other_dir)
    assert other != ours
    for accepted in (ours, str(local_corpus), str(local_corpus / "tokenizer"), None, ""):
        check_tokenizer(manifest, accepted, str(local_corpus))
    for pinned in (other, str(other_dir)):
        with pytest.raises(CorpusError) as err:
            check_tokenizer(manifest, pinned, str(local_corpus))
        assert f"tokenized with tokenizer {ours}" in str(err.value) and f"expects tokenizer {other}" in str(err.value)
    with pytest.raises(CorpusError, match="neither a tokenizer directory nor a tokenizer hash"):
        check_tokenizer(manifest, "/no/such/tokenizer", str(local_corpus))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no tokenizer.json"):
        check_tokenizer(manifest, str(tmp_path / "empty"), str(local_corpus))


def test_verify_refuses_a_remote_corpus_with_one_line(capsys):
    assert main(["verify", "s3://ptft-bucket/corpus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptft: error: s3://ptft-bucket/corpus: `ptft verify` checks a local")
