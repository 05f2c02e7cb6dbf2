"""Shard access for the streaming loader: local files, or any fsspec URL through a node-local cache.

* **Local corpus** (a path or ``file://``): shards are memory-mapped in place. Each shard's
  size is checked against the manifest when its index is read and its sha256 is verified the
  first time a process opens it (remembered per (path, size, mtime)); upcoming shards are
  verified in a background thread, so the check costs no waiting.
* **Remote corpus** (``s3://``, ``gs://``, ``https://``, ``memory://``, ...): the index part of a
  shard (header + offsets, a few % of it) is fetched with one range read and cached as
  ``<sha256>.idx``; whole shards are downloaded into the cache as ``<sha256>.bin``, hashed while
  they stream in, written to a temporary name, fsync'ed and renamed into place only when size and
  checksum match. Several processes (local ranks, loader workers) may share one cache directory:
  per-shard ``flock`` locks make one of them download while the others wait, and a reader never
  sees a partial file (the final name appears atomically). The cache is bounded by
  ``limit_bytes``: least-recently-used files are evicted (a shard another process has already
  memory-mapped stays readable after eviction, POSIX semantics). Downloads are retried with
  exponential backoff; after the last attempt a :class:`CorpusError` names the URL and the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from ptft_dist.corpus.format import CorpusError, ShardData, ShardInfo, decode_shard, index_span, parse_header
from ptft_dist.fsutil import sha256_file

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

_HEAD_BYTES = 1 << 16
_CHUNK = 4 << 20
_STALE_TMP_S = 3600.0


def default_cache_dir() -> str:
    """``$PTFT_CACHE_DIR`` or a per-user folder in the node-local temp dir (shared by local ranks)."""
    env = os.environ.get("PTFT_CACHE_DIR")
    if env:
        return env
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return str(Path(tempfile.gettempdir()) / f"ptft-cache-{uid}")


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if needed). Yields False if non-blocking and busy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_memmap(path: Path) -> np.ndarray | bytes:
    return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""


class ShardCache:
    """Opens shards of one corpus split for reading; see the module docstring."""

    def __init__(
        self,
        corpus: str,
        cache_dir: Optional[str] = None,
        limit_bytes: int = 20 << 30,
        prefetch_threads: int = 2,
        retries: int = 3,
        backoff_s: float = 0.5,
        verify: bool = True,
        storage_options: Optional[dict] = None,
    ):
        import fsspec

        self.corpus = str(corpus).rstrip("/")
        self.storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(self.corpus, **self.storage_options)
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.is_remote = not ({"file", "local"} & set(protocols))
        self._root = root.rstrip("/")
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.limit_bytes = int(limit_bytes)
        self.prefetch_threads = max(1, int(prefetch_threads))
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.verify = verify
        self._verified: set[tuple[str, int, int]] = set()
        self._mutex = threading.Lock()
        self._pid = -1
        self._fs = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._inflight: dict[str, Future] = {}
        self.stats = {"downloads": 0, "download_bytes": 0, "evictions": 0, "hits": 0, "retries": 0}

    # ------------------------------------------------------------------ process-local state

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fs=None, _pool=None, _inflight={}, _pid=-1, _mutex=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._mutex = threading.Lock()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # after fork: threads, pools and fs sessions do not survive
            self._pid = os.getpid()
            self._fs = None
            self._pool = None
            self._inflight = {}
            self._mutex = threading.Lock()

    @property
    def fs(self):
        self._check_pid()
        if self._fs is None:
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.corpus, skip_instance_cache=True, **self.storage_options)
        return self._fs

    def _pool_(self) -> ThreadPoolExecutor:
        self._check_pid()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="ptft-shard")
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    # ------------------------------------------------------------------ naming

    def url(self, info: ShardInfo) -> str:
        return f"{self.corpus}/{info.path}"

    def _remote_path(self, info: ShardInfo) -> str:
        return f"{self._root}/{info.path}"

    def local_file(self, info: ShardInfo) -> Path:
        """Where the shard's bytes are on this node (the corpus itself, or the cache)."""
        if not self.is_remote:
            return Path(self._root) / info.path
        return self.cache_dir / f"{info.sha256}.bin"

    def _idx_file(self, info: ShardInfo) -> Path:
        return self.cache_dir / f"{info.sha256}.idx"

    def _lock_file(self, name: str) -> Path:
        return self.cache_dir / "locks" / f"{name}.lock"

    # ------------------------------------------------------------------ index (planning)

    def read_index(self, info: ShardInfo) -> ShardData:
        """The shard's offsets and doc ids (no tokens): a range read, cached, for planning."""
        if not self.is_remote:
            path = self.local_file(info)
            self._check_local_size(info, path)
            return decode_shard(_open_memmap(path), str(path), with_tokens=False)
        full = self.local_file(info)
        for path in (full, self._idx_file(info)):
            try:
                buf = _open_memmap(path)
            except FileNotFoundError:
                continue
            self._touch(path)
            return decode_shard(buf, self.url(info), with_tokens=False)
        blob = self._with_retries(info, "read index of", lambda: self._fetch_index(info))
        idx = self._idx_file(info)
        self._make_room(len(blob), keep=())
        tmp = self._tmp_name(idx)
        tmp.write_bytes(blob)
        os.replace(tmp, idx)
        return decode_shard(blob, self.url(info), with_tokens=False)

    def _fetch_index(self, info: ShardInfo) -> bytes:
        path = self._remote_path(info)
        head = self._cat(path, 0, min(_HEAD_BYTES, info.bytes))
        header = parse_header(head, self.url(info))
        span = index_span(header)
        if span > info.bytes:
            raise CorpusError(f"{self.url(info)}: index ends at byte {span}, beyond the shard size {info.bytes}")
        blob = head[:span] if span <= len(head) else head + self._cat(path, len(head), span)
        if len(blob) < span:
            raise CorpusError(f"{self.url(info)}: truncated shard ({len(blob)} bytes, expected at least {span})")
        return blob

    def _cat(self, path: str, start: int, end: int) -> bytes:
        out = self.fs.cat_file(path, start=start, end=end)
        if len(out) > end - start:  # a server that ignored the Range header sent the whole file
            out = out[start:end]
        return out

    def _check_local_size(self, info: ShardInfo, path: Path) -> int:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CorpusError(f"{path}: shard file missing (listed in the manifest)") from None
        if st.st_size != info.bytes:
            raise CorpusError(
                f"{path}: shard is {st.st_size} bytes, manifest says {info.bytes} (truncated or replaced)"
            )
        return st.st_mtime_ns

    # ------------------------------------------------------------------ whole shards

    def open(self, info: ShardInfo) -> ShardData:
        """Memory-map a verified shard (downloading it first if remote). Thread-safe."""
        path = self.ensure(info)
        if not self.is_remote:
            buf = _open_memmap(path)
        else:
            with file_lock(self._lock_file(info.sha256)):
                if not path.exists():  # evicted between ensure and open: fetch again
                    self._download(info)
                buf = _open_memmap(path)
                self._touch(path)
        data = decode_shard(buf, str(path) if not self.is_remote else self.url(info))
        counts = (data.num_docs, data.num_sentences, data.num_tokens)
        if counts != (info.documents, info.sentences, info.tokens):
            raise CorpusError(f"{self.url(info)}: counts {counts} disagree with the manifest")
        return data

    def ensure(self, info: ShardInfo) -> Path:
        """Make the shard present and verified on this node; return its local path."""
        self._check_pid()
        if not self.is_remote:
            path = self.local_file(info)
            mtime = self._check_local_size(info, path)
            key = (str(path), info.bytes, mtime)
            if self.verify and key not in self._verified:
                digest = sha256_file(path)
                if digest != info.sha256:
                    raise CorpusError(
                        f"{path}: checksum mismatch (sha256 {digest[:16]}..., manifest {info.sha256[:16]}...): "
                        "the shard is corrupted"
                    )
                with self._mutex:
                    self._verified.add(key)
            return path
        path = self.local_file(info)
        if path.exists():
            self.stats["hits"] += 1
            self._touch(path)
            return path
        with file_lock(self._lock_file(info.sha256)):
            if path.exists():  # another process finished it while we waited
                self.stats["hits"] += 1
                self._touch(path)
                return path
            self._download(info)
        return path

    def _download(self, info: ShardInfo) -> None:
        """Fetch into a temp file (hashing on the way), verify, rename into place. Caller holds the lock."""
        path = self.local_file(info)
        self._make_room(info.bytes, keep=(path.name,))

        def attempt() -> None:
            tmp = self._tmp_name(path)
            h = hashlib.sha256()
            n = 0
            try:
                with self.fs.open(self._remote_path(info), "rb") as src, open(tmp, "wb") as dst:
                    while block := src.read(_CHUNK):
                        h.update(block)
                        dst.write(block)
                        n += len(block)
                    dst.flush()
                    os.fsync(dst.fileno())
                if n != info.bytes:
                    raise CorpusError(
                        f"{self.url(info)}: truncated shard (received {n} bytes, manifest says {info.bytes})"
                    )
                if h.hexdigest() != info.sha256:
                    raise CorpusError(
                        f"{self.url(info)}: checksum mismatch (sha256 {h.hexdigest()[:16]}..., manifest "
                        f"{info.sha256[:16]}...): the shard is corrupted"
                    )
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            self.stats["downloads"] += 1
            self.stats["download_bytes"] += n

        self._with_retries(info, "download", attempt)

    def _with_retries(self, info: ShardInfo, what: str, fn):
        last: Optional[BaseException] = None
        for i in range(self.retries + 1):
            if i:
                self.stats["retries"] += 1
                time.sleep(self.backoff_s * (2 ** (i - 1)))
            try:
                return fn()
            except Exception as exc:  # remote filesystems raise many classes (aiohttp, botocore, ...)
                last = exc
        if isinstance(last, FileNotFoundError):
            why = "not found"
        elif isinstance(last, CorpusError):
            raise CorpusError(f"{last} (after {self.retries + 1} attempts)") from None
        else:
            why = f"{type(last).__name__}: {last}"
        raise CorpusError(f"{self.url(info)}: cannot {what} shard after {self.retries + 1} attempts: {why}") from None

    def _tmp_name(self, final: Path) -> Path:
        tmpdir = self.cache_dir / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        return tmpdir / f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"

    # ------------------------------------------------------------------ LRU

    @staticmethod
    def _touch(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)

    def cached_bytes(self) -> int:
        return sum(size for _, _, size in self._entries())

    def _entries(self) -> list[tuple[float, Path, int]]:
        out = []
        if not self.cache_dir.is_dir():
            return out
        for e in os.scandir(self.cache_dir):
            if e.is_file() and (e.name.endswith(".bin") or e.name.endswith(".idx")):
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat()
                    out.append((st.st_mtime, Path(e.path), st.st_size))
        return out

    def _make_room(self, need: int, keep: Iterable[str]) -> None:
        """Evict least-recently-used files until ``need`` more bytes fit under the limit."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        keep = set(keep)
        with file_lock(self._lock_file("_evict")):
            self._clean_stale_tmp()
            entries = sorted(self._entries())
            total = sum(e[2] for e in entries)
            for _, path, size in entries:
                if total + need <= self.limit_bytes:
                    break
                if path.name in keep:
                    continue
                sha = path.name.rsplit(".", 1)[0]
                with file_lock(self._lock_file(sha), blocking=False) as got:
                    if not got:  # being downloaded or opened right now
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        total -= size
                        self.stats["evictions"] += 1

    def _clean_stale_tmp(self) -> None:
        tmpdir = self.cache_dir / "tmp"
        if not tmpdir.is_dir():
            return
        now = time.time()
        for e in os.scandir(tmpdir):
            with contextlib.suppress(FileNotFoundError):
                if now - e.stat().st_mtime > _STALE_TMP_S:
                    os.unlink(e.path)

    # ------------------------------------------------------------------ background prefetch

    def prefetch(self, infos: Iterable[ShardInfo]) -> None:
        """Fetch (remote) or verify (local) shards in the background; errors resurface on ``open``."""
        pool = self._pool_()
        with self._mutex:
            for info in infos:
                fut = self._inflight.get(info.sha256)
                if fut is not None and not fut.done():
                    continue
                if self.is_remote and self.local_file(info).exists():
                    continue
                self._inflight[info.sha256] = pool.submit(self._quiet_ensure, info)

    def _quiet_ensure(self, info: ShardInfo) -> None:
        with contextlib.suppress(Exception):
            self.ensure(info)

    def open_many(self, infos: list[ShardInfo]) -> list[ShardData]:
        """Open several shards, fetching/verifying them in parallel."""
        if len(infos) <= 1:
            return [self.open(i) for i in infos]
        pool = self._pool_()
        futs = [pool.submit(self.ensure, i) for i in infos]
        errors = []
        for f in futs:
            try:
                f.result()
            except CorpusError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return [self.open(i) for i in infos]
