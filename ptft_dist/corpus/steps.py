"""The datatrove pipeline steps of ``ptft prepare`` (see prepare.py for how they are chained).

Steps are module-level classes so the executors can pickle them into worker processes or
SLURM jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

from ptft_dist.config import PrepareConfig
from ptft_dist.corpus.inputs import InputError, ReadCounters, Source, assign_sources, read_hf, read_source
from ptft_dist.fsutil import write_text_atomic


def doc_hash(text: str, seed: int = 0) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(text.encode("utf-8"), seed=seed)


def is_validation(text: str, cfg: PrepareConfig) -> bool:
    """Train/validation by a fixed-seed hash of the document: the same on any machine or task count."""
    return doc_hash(text, cfg.split_seed) < cfg.validation_fraction * 2**64


def text_for_exact_hash(doc: Document) -> str:
    """Exact duplicates are equal after case folding and whitespace collapsing."""
    return " ".join(doc.text.lower().split())


def record_error(error_dir: str, rank: int, message: str) -> None:
    """Leave the one-line cause where the parent finds it (exceptions lose it across process pools)."""
    os.makedirs(error_dir, exist_ok=True)
    Path(error_dir, f"{rank:05d}.txt").write_text(message)


class ProgressCounter:
    """Publishes a task's running count to ``progress/RANK`` every few seconds, for the parent's bar."""

    def __init__(self, folder: str | None, rank: int, every_s: float = 2.0):
        self.path = Path(folder, f"{rank:05d}") if folder else None
        self.count, self.every_s, self._last = 0, every_s, 0.0
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, n: int) -> None:
        self.count += n
        if self.path and time.monotonic() - self._last > self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self.count))
            tmp.replace(self.path)
            self._last = time.monotonic()


def _maybe_fail(stage: str, rank: int) -> None:
    """Test hook: PTFT_PREPARE_FAIL_AT=stage[:rank] raises inside that stage (crash-safety tests)."""
    spec = os.environ.get("PTFT_PREPARE_FAIL_AT", "")
    if spec and spec.split(":")[0] == stage and (":" not in spec or int(spec.split(":")[1]) == rank):
        raise RuntimeError(f"injected failure in stage {stage} rank {rank}")


class ReadSources(PipelineStep):
    """This task's share of the input files, plus its slice of every HF dataset."""

    name = "read"
    type = "📖 - READER"

    def __init__(self, sources: list[Source], cfg: PrepareConfig, error_dir: str, progress_dir: str | None = None):
        super().__init__()
        self.sources, self.cfg, self.error_dir, self.progress_dir = sources, cfg, error_dir, progress_dir

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        counters = ReadCounters()
        progress = ProgressCounter(self.progress_dir, rank)
        mine = assign_sources(self.sources, rank, world_size)
        streams = [(s.url, read_source(s, self.cfg, counters)) for s in mine]
        streams += [(s.url, read_hf(s, self.cfg, counters, rank, world_size)) for s in self.sources if s.is_hf]
        try:
            for src_i, (url, texts) in enumerate(streams):
                for doc_i, text in enumerate(texts):
                    nbytes = len(text.encode("utf-8"))
                    self.stat_update("input_docs")
                    self.stat_update("input_bytes", value=nbytes)
                    progress.add(nbytes)
                    yield Document(text=text, id=f"{rank}/{src_i}/{doc_i}", metadata={"source": url})
                self.stat_update("input_files")
        except InputError as exc:
            record_error(self.error_dir, rank, str(exc))
            raise
        progress.flush()
        self.stat_update("decode_replaced", value=counters.decode_replaced)
        self.stat_update("bad_json_skipped", value=counters.bad_json_skipped)
        self.stat_update("null_text_skipped", value=counters.null_skipped)
        self.stat_update("empty_text_skipped", value=counters.empty_skipped)


class CleanAndScrub(PipelineStep):
    """Normalise text, drop low-quality documents, replace PII with typed placeholders."""

    name = "clean+pii"
    type = "🧹 - CLEAN"

    def __init__(self, cfg: PrepareConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        from ptft_dist.corpus.clean import clean_document

        if self.cfg.pii.enabled:
            from ptft_dist.corpus.pii import scrub_pii
        for doc in data:
            text, reason = clean_document(doc.text, self.cfg.clean)
            if text is None:
                self.stat_update(f"dropped_{reason}")
                continue
            if self.cfg.pii.enabled:
                text, counts = scrub_pii(text, self.cfg.pii)
                for kind, n in counts.items():
                    self.stat_update(f"pii_{kind}", value=n)
            doc.text = text
            self.stat_update("clean_docs")
            yield doc
        _maybe_fail("ingest", rank)


class ExactSignaturePassThrough(ExactDedupSignature):
    """datatrove's exact-dedup signatures, computed while documents flow on to the writer."""

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        signatures = []
        for doc_idx, doc in enumerate(data):
            signatures.extend(self.get_hashes(doc, doc_idx))
            yield doc
        self.save_hashes(rank, signatures)


class MinhashSignaturePassThrough(MinhashDedupSignature):
    """datatrove's MinHash signatures, computed while documents flow on to the writer.

    Signatures are written as documents pass; the parent's run() then finds the complete files
    (``skip_existing_sigs``) and only sorts them.
    """

    _words = re.compile(r"\w+")

    def get_shingles(self, text: str) -> np.ndarray:
        """datatrove's shingles, with a regex word splitter: its spaCy tokenizer ran at ~0.4 MB/s."""
        from datatrove.utils.text import simplify_text

        words = self._words.findall(simplify_text(text, self.config.norm_config))
        n = self.config.n_grams
        return np.fromiter(
            (self._hash_func(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)), dtype=np.uint64
        ).reshape((-1, 1))

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        import struct

        fmt = f"<{self.config.hashes_per_bucket}{self.config.hash_config.struct_format}I"
        buckets = [
            self.output_folder.open(f"bucket_{bi:03d}/{rank:05d}.minhash.sig", mode="wb")
            for bi in range(self.config.num_buckets)
        ]
        for doc_idx, doc in enumerate(data):
            shingles = self.get_shingles(doc.text)
            if shingles.size:
                for bucket, bucket_sig in zip(buckets, self.get_signature(shingles)):
                    bucket.write(struct.pack(fmt, *bucket_sig, doc_idx))
            yield doc
        for f in buckets:
            f.close()
        self.skip_existing_sigs = True
        for _ in MinhashDedupSignature.run(self, iter(()), rank, world_size) or ():
            pass


class DropDuplicates(PipelineStep):
    """Drop the exact and near duplicates found across the corpus, in one pass over the cleaned docs.

    datatrove's own filters address documents by position in the stream they receive, so two of
    them in a row would misalign; this step reads both removal lists against the original positions.
    """

    name = "dedup"
    type = "🫂 - DEDUP"

    def __init__(self, exact_dir: str | None, near_dir: str | None):
        super().__init__()
        self.exact_dir, self.near_dir = exact_dir, near_dir

    def _indices(self, rank: int) -> tuple[set[int], set[int]]:
        exact: set[int] = set()
        if self.exact_dir:
            for f in Path(self.exact_dir).glob(f"*/{rank:05d}.c4_dup"):
                exact.update(np.fromfile(f, dtype="<u4").tolist())
        near: set[int] = set()
        if self.near_dir and (f := Path(self.near_dir, f"{rank:06d}.remove")).exists():
            near.update(np.fromfile(f, dtype="<u4").tolist())
        return exact, near

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        exact, near = self._indices(rank)
        for idx, doc in enumerate(data):
            if idx in exact:
                self.stat_update("exact_removed")
            elif idx in near:
                self.stat_update("near_removed")
            else:
                yield doc


class SplitSentences(PipelineStep):
    """Documents → sentences (blingfire), per paragraph; assign train/validation by document hash."""

    name = "sentences"
    type = "✂️ - SPLIT"

    def __init__(self, cfg: PrepareConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        import blingfire

        for doc in data:
            sentences = []
            for para in doc.text.split("\n"):
                if para.strip():
                    sentences.extend(
                        s.strip() for s in blingfire.text_to_sentences(para).split("\n")
                        if len(s.strip()) >= self.cfg.min_sentence_chars
                    )
            if not sentences:
                self.stat_update("dropped_no_sentences")
                continue
            split = "validation" if is_validation(doc.text, self.cfg) else "train"
            doc.metadata = {"sentences": sentences, "split": split, "hash": doc_hash(doc.text)}
            self.stat_update(f"{split}_docs")
            self.stat_update("sentences", value=len(sentences))
            yield doc


class TrainTokenizer(PipelineStep):
    """One task: train WordPiece on the train split (or adopt an existing tokenizer) into CORPUS/tokenizer."""

    name = "tokenizer"
    type = "🔤 - TOKENIZER"

    def __init__(self, cfg: PrepareConfig, docs_dir: str, out_dir: str):
        super().__init__()
        self.cfg, self.docs_dir, self.out_dir = cfg, docs_dir, out_dir

    def _texts(self) -> Iterator[str]:
        import orjson

        n = 0
        for path in sorted(Path(self.docs_dir).glob("*.jsonl")):
            with open(path, "rb") as f:
                for line in f:
                    rec = orjson.loads(line)
                    if rec["metadata"]["split"] == "train":
                        yield "\n".join(rec["metadata"]["sentences"])
                        n += 1
                        if n >= self.cfg.tokenizer.max_train_docs:
                            return

    def run(self, data, rank: int = 0, world_size: int = 1):
        from ptft_dist.corpus.tokenizer import adopt_tokenizer, train_wordpiece

        tcfg = self.cfg.tokenizer
        if tcfg.path:
            adopt_tokenizer(tcfg.path, self.out_dir)
        else:
            train_wordpiece(self._texts(), self.out_dir, tcfg)
        _maybe_fail("tokenizer", rank)
        return iter(())


class EncodeShards(PipelineStep):
    """Tokenize sentences in batches and write shard files; list them in ``shard_lists/RANK.json``."""

    name = "encode"
    type = "🔢 - ENCODE"

    def __init__(self, cfg: PrepareConfig, corpus_dir: str, lists_dir: str, progress_dir: str | None = None,
                 batch_docs: int = 256):
        super().__init__()
        self.cfg, self.corpus_dir, self.lists_dir, self.batch_docs = cfg, corpus_dir, lists_dir, batch_docs
        self.progress_dir = progress_dir

    def run(self, data, rank: int = 0, world_size: int = 1):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # tasks are the parallelism
        from tokenizers import Tokenizer

        from ptft_dist.corpus.format import ShardWriter

        tok = Tokenizer.from_file(str(Path(self.corpus_dir) / "tokenizer" / "tokenizer.json"))
        # A model's own tokenizer.json may pad and truncate every encoding (sentence-transformers ship
        # MiniLM's with Fixed(128) padding): the corpus keeps each sentence whole and unpadded, the
        # stream frames and truncates samples itself.
        tok.no_padding()
        tok.no_truncation()
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        target = int(self.cfg.shard_size_mb * 2**20)
        writers = {
            split: ShardWriter(self.corpus_dir, split, f"shard-{rank:05d}", vocab_size, target)
            for split in ("train", "validation")
        }
        batch: list[Document] = []
        progress = ProgressCounter(self.progress_dir, rank)

        def flush() -> None:
            sentences = [s for d in batch for s in d.metadata["sentences"]]
            encoded = tok.encode_batch(sentences, add_special_tokens=False)
            pos = 0
            for d in batch:
                n = len(d.metadata["sentences"])
                ids = [e.ids for e in encoded[pos : pos + n] if e.ids]
                pos += n
                if ids:
                    writers[d.metadata["split"]].add(ids, d.metadata["hash"])
                    self.stat_update("tokens", value=sum(len(x) for x in ids))
            progress.add(len(batch))
            batch.clear()

        for doc in data:
            batch.append(doc)
            if len(batch) >= self.batch_docs:
                flush()
        flush()
        _maybe_fail("encode", rank)
        lists = {split: [asdict_shard(s) for s in w.close()] for split, w in writers.items()}
        write_text_atomic(Path(self.lists_dir, f"{rank:05d}.json"), json.dumps(lists))
        return iter(())


def asdict_shard(info) -> dict:
    return asdict(info)


# Intermediate folders under WORK_DIR that the manifest makes redundant (task logs and stats stay).
_BULKY = ("cleaned", "docs", "exact_sigs", "exact_dups", "minhash_sigs", "minhash_buckets", "minhash_remove")


class Finalize(PipelineStep):
    """One task: gather shard lists, write the report, then the manifest (last, atomically)."""

    name = "finalize"
    type = "📦 - MANIFEST"

    def __init__(self, cfg: PrepareConfig, corpus_dir: str):
        super().__init__()
        self.cfg, self.corpus_dir = cfg, corpus_dir

    def run(self, data, rank: int = 0, world_size: int = 1):
        from ptft_dist.config import config_hash
        from ptft_dist.corpus import format as sh
        from ptft_dist.corpus.report import REPORT_NAME, WORK_DIR, build_report
        from ptft_dist.corpus.tokenizer import special_token_ids, vocab_size

        root = Path(self.corpus_dir)
        work = root / WORK_DIR
        splits: dict[str, list[dict]] = {"train": [], "validation": []}
        for path in sorted((work / "shard_lists").glob("*.json")):
            for split, items in json.loads(path.read_text()).items():
                splits[split].extend(items)
        if not splits["train"]:
            raise InputError("no training documents survived cleaning and deduplication; nothing to write")
        for items in splits.values():
            for info in items:  # re-check what the encode tasks wrote before vouching for it
                p = root / info["path"]
                if not p.is_file() or p.stat().st_size != info["bytes"]:
                    raise RuntimeError(f"{p}: missing or wrong size; re-run prepare")
        tok_dir = root / sh.TOKENIZER_DIR
        vs = vocab_size(tok_dir)
        manifest = sh.Manifest(
            format_version=sh.FORMAT_VERSION,
            tokenizer_hash=sh.tokenizer_hash(tok_dir),
            vocab_size=vs,
            token_dtype=sh.token_dtype(vs).name,
            special_tokens=special_token_ids(tok_dir),
            splits=splits,
            config_hash=config_hash(self.cfg),
        )
        report = build_report(root, manifest)
        write_text_atomic(root / REPORT_NAME, json.dumps(report, indent=2))
        _maybe_fail("finalize", rank)
        sh.write_manifest(root, manifest)
        for bulky in _BULKY:
            shutil.rmtree(work / bulky, ignore_errors=True)
        return iter(())


def _file_only_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's task logger without the console sink: task logs go to their files only."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, colorize=False, level="DEBUG",
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}")
    return logfile


def _close_file_task_logger(logfile) -> None:
    """datatrove's close re-adds its console logger; keep the console to warnings instead."""
    import sys

    from loguru import logger

    logger.complete()
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}")
    logfile.close()


def _local_executor_base():
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor


class QuietLocalExecutor(_local_executor_base()):
    """datatrove's local executor with task logs in files only; ptft prints its own progress."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        import datatrove.executor.base as base

        base.add_task_logger = _file_only_task_logger
        base.close_task_logger = _close_file_task_logger
        return super()._run_for_rank(rank, local_rank, node_rank)
