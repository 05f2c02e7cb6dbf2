"""Remote shards (ptft_dist/stream/shard_cache.py): fsspec memory:// and a local HTTP server give
byte-identical batches; LRU cache limit; shared cache between processes; checksums, truncation,
missing shards and retries."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ptft_dist.config import DataConfig
from ptft_dist.corpus.format import CorpusError, load_manifest
from ptft_dist.stream import shard_cache as sc
from ptft_dist.stream.dataset import PretrainingStream
from tests.corpus_factory import copy_to_memory_fs, flip_byte, make_corpus
from tests.remote_servers import RangeHTTPServer, serve_http

SHARD_DOCS = (6, 2, 9, 4, 5, 3)


@pytest.fixture
def http_server(tmp_path):
    with serve_http(tmp_path / "www") as srv:
        yield srv


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-corpus")
    make_corpus(root, shard_docs=SHARD_DOCS, val_docs=(2,), sentences=(2, 8), n_words=(3, 10), seed=3)
    return root


def _publish(local: Path, srv: RangeHTTPServer, name: str = "corpus") -> str:
    shutil.copytree(local, srv.root / name, ignore=shutil.ignore_patterns("cache"))
    return f"{srv.url}/{name}"


def _cfg(corpus: str, cache: Path, **kw) -> DataConfig:
    kw.setdefault("max_seq_len", 48)
    kw.setdefault("shuffle_window_shards", 2)
    kw.setdefault("fetch_backoff_s", 0.01)
    return DataConfig(corpus=corpus, cache_dir=str(cache), **kw)


def _epoch_batches(corpus: str, cache: Path, W: int = 2, mb: int = 3, **kw) -> list[dict]:
    out = []
    for r in range(W):
        ds = PretrainingStream(cfg=_cfg(corpus, cache, **kw), micro_batch_size=mb, world_size=W, rank=r)
        out += list(ds.iter_numpy())
        ds.cache.close()
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            if isinstance(x[k], np.ndarray):
                assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k
            else:
                assert x[k] == y[k]


def _ids(batches) -> list[int]:
    return sorted(i for b in batches for i in b["sample_ids"].tolist() if i >= 0)


# --------------------------------------------------------------------------- identical data


def test_memory_fs_gives_identical_batches(local_corpus, tmp_path):
    ref = _epoch_batches(str(local_corpus), tmp_path / "c0")
    url = copy_to_memory_fs(local_corpus, "memory://ptft-test-corpus")
    got = _epoch_batches(url, tmp_path / "c1")
    _assert_same(ref, got)


def test_http_gives_identical_batches_and_plans_from_index_only(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    cache = tmp_path / "cache"
    ds = PretrainingStream(cfg=_cfg(url, cache), micro_batch_size=3, world_size=2, rank=0)
    n = ds.num_samples(0)
    assert n == PretrainingStream(cfg=_cfg(str(local_corpus), tmp_path / "c0"), micro_batch_size=3).num_samples(0)
    # planning fetched only index prefixes, with range requests, and downloaded no whole shard
    assert ds.cache.stats["downloads"] == 0
    assert not list(cache.glob("*.bin")) and len(list(cache.glob("*.idx"))) == len(SHARD_DOCS)
    shard_gets = [h for h in http_server.log if h[0] == "GET" and h[1].endswith(".bin")]
    assert shard_gets and all(h[2] is not None for h in shard_gets)
    ds.cache.close()
    _assert_same(_epoch_batches(str(local_corpus), tmp_path / "c0"), _epoch_batches(url, cache))


def test_small_cache_evicts_and_still_delivers_everything(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    sizes = sorted(s.bytes for s in load_manifest(local_corpus).shards("train"))
    limit = sizes[-1] + sizes[-2] + 1000  # room for about two shards
    cache = tmp_path / "cache"
    ds = PretrainingStream(cfg=_cfg(url, cache, shuffle_window_shards=1, prefetch_shards=1,
                                    cache_limit_gb=limit / (1 << 30)), micro_batch_size=4)
    got = [b for e in (0, 1) for b in (ds.set_position(e, 0) or list(ds.iter_numpy()))]
    ref = [b for e in (0, 1) for b in _epoch_local(local_corpus, tmp_path / "c0", e)]
    _assert_same(ref, got)
    assert ds.cache.stats["evictions"] > 0
    assert ds.cache.cached_bytes() <= limit + sizes[-1]
    ds.cache.close()
    # a limit below one shard still works (the shard being added is always kept)
    tiny = PretrainingStream(cfg=_cfg(url, tmp_path / "tiny", cache_limit_gb=1e-9), micro_batch_size=4)
    assert _ids(tiny.iter_numpy()) == list(range(tiny.num_samples(0)))
    tiny.cache.close()


def _epoch_local(local: Path, cache: Path, epoch: int) -> list[dict]:
    ds = PretrainingStream(cfg=_cfg(str(local), cache, shuffle_window_shards=1, prefetch_shards=1),
                           micro_batch_size=4)
    ds.set_position(epoch, 0)
    return list(ds.iter_numpy())


# --------------------------------------------------------------------------- shared cache between processes


def _rank_proc(url: str, cache: str, limit: float, rank: int, q) -> None:
    try:
        ds = PretrainingStream(cfg=_cfg(url, Path(cache), shuffle_window_shards=1, prefetch_shards=2,
                                        cache_limit_gb=limit), micro_batch_size=2, world_size=2, rank=rank)
        out = []
        for e in (0, 1):
            ds.set_position(e, 0)
            for b in ds.iter_numpy():
                out.append((e, b["sample_ids"].tolist(), hashlib.sha256(b["input_ids"].tobytes()).hexdigest()))
        q.put((rank, "ok", out))
    except BaseException as exc:  # report, never hang the parent
        q.put((rank, "error", repr(exc)))


@pytest.mark.timeout(180)
def test_two_ranks_share_one_cache_without_partial_reads(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    http_server.delay = 0.002
    http_server.chunk = 256  # slow, chunked downloads so that the two processes overlap
    cache = tmp_path / "shared"
    shas = {s.sha256: s for s in load_manifest(local_corpus).shards("train")}
    limit = 2.5 * max(s.bytes for s in shas.values()) / (1 << 30)
    bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every file under a final name must be complete and correct
        while not stop.is_set():
            for p in list(cache.glob("*.bin")):
                try:
                    data = p.read_bytes()
                except FileNotFoundError:
                    continue
                if hashlib.sha256(data).hexdigest() != p.stem:
                    bad.append(f"{p.name}: {len(data)} bytes")
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_proc, args=(url, str(cache), limit, r, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict()
    for _ in procs:
        rank, status, payload = q.get(timeout=150)
        assert status == "ok", payload
        results[rank] = payload
    for p in procs:
        p.join(timeout=30)
    stop.set()
    watcher.join()
    assert not bad, f"a reader could have seen a partial file: {bad[:3]}"
    # each process delivered exactly what the same rank delivers from the local corpus
    for r in range(2):
        ref = []
        ds = PretrainingStream(cfg=_cfg(str(local_corpus), tmp_path / "c0", shuffle_window_shards=1),
                               micro_batch_size=2, world_size=2, rank=r)
        for e in (0, 1):
            ds.set_position(e, 0)
            ref += [(e, b["sample_ids"].tolist(), hashlib.sha256(b["input_ids"].tobytes()).hexdigest())
                    for b in ds.iter_numpy()]
        assert results[r] == ref
    assert not list((cache / "tmp").glob("*.part")), "temporary files left behind"


def test_download_appears_atomically(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    http_server.delay = 0.01
    http_server.chunk = 1024
    cache = sc.ShardCache(url, cache_dir=str(tmp_path / "c"), verify=True, backoff_s=0.01)
    info = load_manifest(local_corpus).shards("train")[2]
    final = cache.local_file(info)
    t = threading.Thread(target=cache.ensure, args=(info,))
    t.start()
    seen_part = False
    while t.is_alive():
        assert not final.exists() or hashlib.sha256(final.read_bytes()).hexdigest() == info.sha256
        seen_part |= bool(list((tmp_path / "c" / "tmp").glob("*.part")))
        time.sleep(0.005)
    t.join()
    assert seen_part and final.exists()
    assert hashlib.sha256(final.read_bytes()).hexdigest() == info.sha256
    # a second cache object (another local rank) finds it and does not download again
    other = sc.ShardCache(url, cache_dir=str(tmp_path / "c"))
    other.open(info)
    assert other.stats["downloads"] == 0 and other.stats["hits"] >= 1


# --------------------------------------------------------------------------- failures


def test_corrupt_remote_shard_is_named_after_bounded_retries(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    flip_byte(http_server.root / "corpus" / "train" / "shard-00000-00003.bin", 2)
    for r in range(2):  # every rank fails the same way
        ds = PretrainingStream(cfg=_cfg(url, tmp_path / f"c{r}", shuffle_window_shards=6, fetch_retries=2),
                               micro_batch_size=2, world_size=2, rank=r)
        with pytest.raises(CorpusError, match=r"shard-00000-00003\.bin: checksum mismatch.*after 3 attempts"):
            list(ds.iter_numpy())
        assert not list((tmp_path / f"c{r}").glob("*.bin")) or all(
            hashlib.sha256(p.read_bytes()).hexdigest() == p.stem for p in (tmp_path / f"c{r}").glob("*.bin"))
        ds.cache.close()


def test_missing_remote_shard_fails_after_bounded_retries(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    os.unlink(http_server.root / "corpus" / "train" / "shard-00000-00001.bin")
    t0 = time.time()
    with pytest.raises(CorpusError, match=r"shard-00000-00001\.bin: cannot .* after 4 attempts: not found"):
        PretrainingStream(cfg=_cfg(url, tmp_path / "c", fetch_retries=3), micro_batch_size=2).num_samples(0)
    assert time.time() - t0 < 30
    tries = [h for h in http_server.log if h[1].endswith("shard-00000-00001.bin") and h[0] == "GET"]
    assert 4 <= len(tries) <= 8


def test_truncated_remote_shard(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    p = http_server.root / "corpus" / "train" / "shard-00000-00004.bin"
    p.write_bytes(p.read_bytes()[:-7])
    ds = PretrainingStream(cfg=_cfg(url, tmp_path / "c", shuffle_window_shards=6, fetch_retries=1),
                           micro_batch_size=4)
    with pytest.raises(CorpusError, match=r"shard-00000-00004\.bin: truncated"):
        list(ds.iter_numpy())
    ds.cache.close()


def test_transient_errors_are_retried(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    for s in load_manifest(local_corpus).shards("train"):
        http_server.fail_next[f"corpus/{s.path}"] = 1
    got = _epoch_batches(url, tmp_path / "c", W=1, mb=4)
    _assert_same(_epoch_batches(str(local_corpus), tmp_path / "c0", W=1, mb=4), got)


def test_local_checksum_verified_once_per_file_version(local_corpus, tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    shutil.copytree(local_corpus, root, ignore=shutil.ignore_patterns("cache"))
    calls = []
    real = sc.sha256_file
    monkeypatch.setattr(sc, "sha256_file", lambda p: calls.append(p) or real(p))
    cache = sc.ShardCache(str(root), cache_dir=str(tmp_path / "c"))
    info = load_manifest(root).shards("train")[0]
    cache.open(info)
    cache.open(info)
    assert len(calls) == 1
    flip_byte(root / info.path)
    st = (root / info.path).stat()
    os.utime(root / info.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(CorpusError, match=r"shard-00000-00000\.bin: checksum mismatch"):
        cache.open(info)


def test_background_prefetch_fetches_upcoming_shards(local_corpus, tmp_path, http_server):
    url = _publish(local_corpus, http_server)
    cache = tmp_path / "c"
    ds = PretrainingStream(cfg=_cfg(url, cache, shuffle_window_shards=1, prefetch_shards=2), micro_batch_size=2)
    next(ds.iter_numpy())  # opens window 0 → prefetches the shards of windows 1 and 2
    plan = ds.plan(0)
    want = {ds.shards[int(plan.windows[w][0])].sha256 for w in (1, 2)}
    deadline = time.time() + 20
    while time.time() < deadline and not want <= {p.stem for p in cache.glob("*.bin")}:
        time.sleep(0.05)
    assert want <= {p.stem for p in cache.glob("*.bin")}
    ds.cache.close()
