"""Raw inputs: resolve what the user named into concrete sources, and stream documents from them.

Local paths and fsspec URLs (``s3://``, ``https://``, ``memory://``, ...) go through the same
code; ``hf:NAME[:CONFIG][:SPLIT]`` streams a Hugging Face dataset. Readers are generators, so
memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import fsspec

from ptft_dist.config import PrepareConfig
from ptft_dist.corpus.output import InputScreen
from ptft_dist.corpus.storage import StorageError, is_remote, url_to_fs
from ptft_dist.errors import UserError
from ptft_dist.log import get_logger

log = get_logger("prepare")

SourceKind = Literal["txt", "jsonl", "json", "parquet", "hf"]

_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
_EXT_KIND = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
             ".parquet": "parquet", ".pq": "parquet"}


class InputError(UserError, ValueError):
    """Bad input named by file (and line): reported as one line, the run stops."""


@dataclass(frozen=True)
class Source:
    """One readable unit of input: a file (local or remote) or a Hugging Face dataset."""

    url: str
    kind: SourceKind
    size: int = 0  # bytes, when known (used to balance tasks and for throughput figures)
    start: int = 0  # byte range of a part of a big JSONL file: lines that START in [start, end)
    end: int = -1  # -1: to the end of the file

    def where(self, lineno: int) -> str:
        """``file:line`` for error messages (line counted within the part for later parts)."""
        return f"{self.url}:{lineno}" if self.start == 0 else f"{self.url}@{self.start}+{lineno}"

    @property
    def is_hf(self) -> bool:
        return self.kind == "hf"


def _kind_of(path: str) -> SourceKind | None:
    name = path.lower()
    for comp in _COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    return _EXT_KIND.get(Path(name).suffix)  # type: ignore[return-value]


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def resolve_sources(specs: list[str], storage_options: Optional[dict] = None,
                    output: Optional[Path] = None) -> list[Source]:
    """Expand files, folders, globs and URLs; fail on anything missing, empty or unreadable.
    ``storage_options`` (``prepare.storage_options``): fsspec options for the remote ones.
    ``output``: the corpus being written; no input may lie in it, and no file of it, of another
    prepared corpus or of a ptft work directory is read from a folder or pattern (output.InputScreen)."""
    screen = InputScreen(output)
    sources: list[Source] = []
    for spec in specs:
        if spec.startswith("hf:"):
            parse_hf_spec(spec)  # validates
            sources.append(Source(spec, "hf"))
        else:
            sources += _file_sources(spec, storage_options, screen)
    if not sources:
        raise InputError("no input given")
    return sources


def _file_sources(spec: str, storage_options: Optional[dict] = None,
                  screen: Optional[InputScreen] = None) -> list[Source]:
    """The files one local or fsspec spec names, each with its kind and size."""
    try:
        fs, path = url_to_fs(spec, storage_options if is_remote(spec) else None)
    except StorageError as exc:
        raise InputError(str(exc)) from None
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    unstrip = (lambda p: p) if protocol in ("file", "local") else fs.unstrip_protocol
    sources = []
    paths, in_folder = _expand(fs, path, spec, protocol)
    if screen is not None and protocol in ("file", "local"):
        paths = screen.keep(spec, Path(_fixed_prefix(path)), paths)
    if in_folder:
        paths = _readable_of_folder(spec, paths)
    for p in paths:
        kind = _kind_of(p)
        if kind is None:
            raise InputError(f"{unstrip(p)}: unsupported file type "
                             "(use .txt, .jsonl, .json, .parquet, optionally .gz/.zst)")
        try:
            size = int(fs.size(p) or 0)
        except Exception:  # some HTTP servers do not report sizes
            size = 0
        sources.append(Source(unstrip(p), kind, size))
    return sources


def _fixed_prefix(path: str) -> str:
    """Where a pattern starts: its path up to the folder holding the first wildcard (or the path)."""
    if not _has_glob(path):
        return path
    head = path[: min(path.index(c) for c in "*?[" if c in path)]
    return head if head.endswith("/") else str(Path(head).parent)


def _readable_of_folder(spec: str, paths: list[str]) -> list[str]:
    """The files of a folder input that prepare reads; the others are named in the log, not ignored silently."""
    kept = [p for p in paths if _kind_of(p)]
    skipped = [p for p in paths if not _kind_of(p)]
    if not kept:
        raise InputError(f"{spec}: folder holds no .txt/.jsonl/.json/.parquet files"
                         + (f" ({len(skipped)} other file(s), e.g. {Path(skipped[0]).name})" if skipped else ""))
    if skipped:
        shown = ", ".join(Path(p).name for p in skipped[:5])
        log.info(f"{spec}: skipped {len(skipped)} file(s) that are not .txt/.jsonl/.json/.parquet "
                 f"(optionally .gz/.zst/.bz2/.xz): {shown}{' ...' if len(skipped) > 5 else ''}")
    return kept


def _expand(fs, path: str, spec: str, protocol: str) -> tuple[list[str], bool]:
    """A glob's matches, a folder's files, or the file itself (never an empty list); and whether
    they are a folder's (whose unreadable kinds are skipped rather than refused)."""
    in_folder = False
    try:
        if _has_glob(path):
            paths = sorted(fs.glob(path))
            if not paths:
                raise InputError(f"{spec}: the pattern matches no files")
        elif fs.isdir(path):
            paths, in_folder = sorted(fs.find(path)), True
            if not paths:
                raise InputError(f"{spec}: folder is empty")
        elif fs.isfile(path) or (protocol in ("http", "https") and fs.exists(path)):
            paths = [path]
        else:
            raise InputError(f"{spec}: no such file or directory")
    except InputError:
        raise
    except (FileNotFoundError, OSError) as exc:
        raise InputError(f"{spec}: cannot read ({exc})") from None
    except Exception as exc:  # remote stores raise their own classes (botocore's NoCredentialsError, ...)
        raise InputError(f"{spec}: cannot read ({type(exc).__name__}: {exc}; check prepare.storage_options)") from None
    return paths, in_folder


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` → (name, config, split). NAME may be a local folder."""
    parts = spec[3:].split(":")
    if not parts[0]:
        raise InputError(f"{spec}: expected hf:NAME[:CONFIG][:SPLIT]")
    if len(parts) > 3:
        raise InputError(f"{spec}: too many ':' parts; expected hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


# --------------------------------------------------------------------------- reading


@dataclass
class ReadCounters:
    """What reading saw besides documents: repaired bytes, skipped lines."""

    decode_replaced: int = 0  # lines/records whose bytes were not valid UTF-8 (replaced with U+FFFD)
    bad_json_skipped: int = 0
    null_skipped: int = 0  # records whose text field is null
    empty_skipped: int = 0  # records whose text field is ""

    def keep(self, text: str | None) -> bool:
        """Whether a record's text is a document; a null or empty one is counted, never dropped silently."""
        if text is None:
            self.null_skipped += 1
        elif not text:
            self.empty_skipped += 1
        return bool(text)


def _decode(raw: bytes, where: str, cfg: PrepareConfig, counters: ReadCounters) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cfg.on_decode_error == "error":
            raise InputError(
                f"{where}: invalid UTF-8 at byte {exc.start} (set prepare.on_decode_error=replace to repair)"
            ) from None
        counters.decode_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _open(url: str, cfg: PrepareConfig):
    return fsspec.open(url, "rb", compression="infer", **(cfg.storage_options if is_remote(url) else {}))


def _lines(f) -> Iterator[bytes]:
    """Byte lines of an open file; zstd readers stream bytes but cannot iterate lines themselves."""
    try:
        yield from f
    except io.UnsupportedOperation:
        yield from io.BufferedReader(f)


def read_txt(src: Source, cfg: PrepareConfig, counters: ReadCounters) -> Iterator[str]:
    with _open(src.url, cfg) as f:
        if cfg.txt_doc_boundary == "file":
            text = _decode(f.read(), src.url, cfg, counters)
            if text.strip():
                yield text
            return
        block: list[str] = []
        for lineno, raw in enumerate(_lines(f), 1):
            line = _decode(raw, f"{src.url}:{lineno}", cfg, counters)
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
        if block:
            yield "".join(block)


def _lines_in_range(f, start: int, end: int) -> Iterator[bytes]:
    """Lines that start within [start, end): each line of a split file is read by exactly one part."""
    if start == 0 and end < 0:
        yield from _lines(f)
        return
    pos = start
    if start > 0:
        f.seek(start - 1)
        pos = start - 1 + len(f.readline())  # finish the line that straddles `start`
    for raw in _lines(f):
        if 0 <= end <= pos:
            return
        yield raw
        pos += len(raw)


def _text_of(record: object, where: str, field: str) -> str | None:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(list(record)[:8])
        raise InputError(f"{where}: no field '{field}' (fields: {fields}); set prepare.text_field")
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}' is {type(value).__name__}, not text")
    return value


def read_jsonl(src: Source, cfg: PrepareConfig, counters: ReadCounters) -> Iterator[str]:
    with _open(src.url, cfg) as f:
        if src.kind == "json" and f.read(4096).lstrip()[:1] == b"[":  # a JSON array, not JSON lines
            f.seek(0)
            try:
                records = json.loads(_decode(f.read(), src.url, cfg, counters))
            except ValueError as exc:
                raise InputError(f"{src.url}: malformed JSON: {exc}") from None
            if not isinstance(records, list):
                raise InputError(f"{src.url}: expected a JSON array of objects, or JSON lines")
            for i, rec in enumerate(records):
                text = _text_of(rec, f"{src.url}[{i}]", cfg.text_field)
                if counters.keep(text):
                    yield text
            return
        f.seek(0)
        for lineno, raw in enumerate(_lines_in_range(f, src.start, src.end), 1):
            if not raw.strip():
                continue
            where = src.where(lineno)
            line = _decode(raw, where, cfg, counters)
            try:
                record = json.loads(line)
            except ValueError as exc:
                if cfg.on_bad_json == "skip":
                    counters.bad_json_skipped += 1
                    continue
                raise InputError(
                    f"{where}: malformed JSON ({exc}); set prepare.on_bad_json=skip to skip such lines"
                ) from None
            text = _text_of(record, where, cfg.text_field)
            if counters.keep(text):
                yield text


def read_parquet(src: Source, cfg: PrepareConfig, counters: ReadCounters) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _open(src.url, cfg) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            raise InputError(f"{src.url}: not a readable Parquet file ({exc})") from None
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            raise InputError(f"{src.url}: no column '{cfg.text_field}' (columns: {', '.join(names[:8])}); "
                             "set prepare.text_field")
        for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise InputError(f"{src.url}: column '{cfg.text_field}' holds {type(text).__name__}, not text")
                if counters.keep(text):
                    yield text


def read_hf(src: Source, cfg: PrepareConfig, counters: ReadCounters, rank: int, world_size: int) -> Iterator[str]:
    """Stream a HF dataset; this task takes every world_size-th example (or shard)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    name, config, split = parse_hf_spec(src.url)
    try:
        saved = Path(name)
        if saved.is_dir() and ((saved / "state.json").exists() or (saved / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        raise InputError(f"{src.url}: cannot load dataset ({type(exc).__name__}: {exc})") from None
    columns = ds.column_names or []
    if columns and cfg.text_field not in columns:
        raise InputError(f"{src.url}: no column '{cfg.text_field}' (columns: {', '.join(columns[:8])}); "
                         "set prepare.text_field")
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    for i, record in enumerate(ds):
        text = _text_of(record, f"{src.url}[{i}]", cfg.text_field)
        if counters.keep(text):
            yield text


def read_source(src: Source, cfg: PrepareConfig, counters: ReadCounters) -> Iterator[str]:
    """Documents (raw text) of one file source, in file order."""
    if src.kind == "txt":
        return read_txt(src, cfg, counters)
    if src.kind in ("jsonl", "json"):
        return read_jsonl(src, cfg, counters)
    if src.kind == "parquet":
        return read_parquet(src, cfg, counters)
    raise InputError(f"{src.url}: cannot read kind {src.kind} as a file")


def split_sources(
    sources: list[Source], world_size: int, min_part: int = 8 << 20, max_part: int = 256 << 20
) -> list[Source]:
    """Cut big uncompressed JSONL files into byte ranges, so one huge file still feeds every task."""
    total = sum(s.size for s in sources)
    part = min(max(total // (world_size * 4), min_part), max_part)
    out: list[Source] = []
    for src in sources:
        if src.kind != "jsonl" or not src.size or src.size <= part or _compression(src.url):
            out.append(src)
            continue
        n = -(-src.size // part)
        bounds = [src.size * i // n for i in range(n + 1)]
        out += [Source(src.url, src.kind, b - a, a, b if b < src.size else -1) for a, b in zip(bounds, bounds[1:])]
    return out


def _compression(url: str) -> bool:
    return url.lower().endswith(_COMPRESSIONS)


def assign_sources(sources: list[Source], rank: int, world_size: int) -> list[Source]:
    """This task's files (or parts): largest first, greedily to the least-loaded task (deterministic)."""
    loads = [0] * world_size
    mine = []
    parts = (s for s in split_sources(sources, world_size) if not s.is_hf)
    files = sorted(parts, key=lambda s: (-s.size, s.url, s.start))
    for src in files:
        task = min(range(world_size), key=lambda t: (loads[t], t))
        loads[task] += max(src.size, 1)
        if task == rank:
            mine.append(src)
    return mine
