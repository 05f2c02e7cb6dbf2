"""``ptft prepare``: raw text → cleaned, PII-scrubbed, deduplicated, sentence-split, tokenized shards.

The work is a chain of datatrove stages, so the same steps run as processes on one machine
(local executor) or as dependent SLURM array jobs (slurm executor)::

    ingest    (T tasks)  read → clean → PII scrub → exact + MinHash signatures → cleaned/*.jsonl
    exact     (1 task)   find exact duplicates across the whole corpus
    buckets   (B tasks)  MinHash LSH buckets            } near duplicates across
    cluster   (1 task)   MinHash clusters               } the whole corpus
    dedup     (T tasks)  drop duplicates → sentences → train/validation by document hash
    tokenizer (1 task)   train WordPiece on the train split, or adopt the given tokenizer
    encode    (T tasks)  tokenize → shard files
    finalize  (1 task)   report + manifest.json (written last, atomically)

Each stage records finished tasks under ``CORPUS_DIR/.prepare/``, so re-running the same command
after a crash skips finished work. The manifest appears only when every shard exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from ptft_dist.config import Config, PrepareConfig, config_hash, save_resolved
from ptft_dist.corpus.inputs import InputError, Source, resolve_sources
from ptft_dist.corpus.output import claim_output
from ptft_dist.corpus.report import WORK_DIR, log_report, stage_metrics, step_counts
from ptft_dist.log import get_logger

log = get_logger("prepare")


# --------------------------------------------------------------------------- stages


class _Stage:
    """One datatrove stage: a name, its pipeline and its task count."""

    def __init__(self, name: str, pipeline: list, tasks: int):
        self.name, self.pipeline, self.tasks = name, pipeline, tasks


def build_stages(sources: list[Source], cfg: PrepareConfig, out: Path) -> list[_Stage]:
    """The chain of the module docstring; the dedup stages only for the kinds that are enabled."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
    from datatrove.pipeline.readers import JsonlReader

    from ptft_dist.corpus import steps as st

    work = out / WORK_DIR
    tasks = max(1, cfg.workers)
    exact_cfg = ExactDedupConfig(content_getter=st.text_for_exact_hash)
    mh_cfg = minhash_config(cfg)
    return [
        _Stage("ingest", _ingest_pipeline(sources, cfg, work, exact_cfg, mh_cfg), tasks),
        *_duplicate_finding_stages(cfg, work, exact_cfg, mh_cfg),
        _Stage("dedup", _dedup_pipeline(cfg, work), tasks),
        _Stage("tokenizer", [st.TrainTokenizer(cfg, str(work / "docs"), str(out / "tokenizer"))], 1),
        _Stage("encode", [
            JsonlReader(str(work / "docs"), glob_pattern="*.jsonl", compression=None),
            st.EncodeShards(cfg, str(out), str(work / "shard_lists"), str(work / "progress" / "encode")),
        ], tasks),
        _Stage("finalize", [st.Finalize(cfg, str(out))], 1),
    ]


def _ingest_pipeline(sources: list[Source], cfg: PrepareConfig, work: Path, exact_cfg, mh_cfg) -> list:
    """read → clean → PII scrub → duplicate signatures (written on the way) → cleaned/*.jsonl."""
    from datatrove.pipeline.writers import JsonlWriter

    from ptft_dist.corpus import steps as st

    ingest = [st.ReadSources(sources, cfg, str(work / "errors"), str(work / "progress" / "ingest")),
              st.CleanAndScrub(cfg)]
    if cfg.dedup.exact:
        ingest.append(st.ExactSignaturePassThrough(output_folder=str(work / "exact_sigs"), config=exact_cfg))
    if cfg.dedup.near:
        ingest.append(st.MinhashSignaturePassThrough(output_folder=str(work / "minhash_sigs"), config=mh_cfg))
    ingest.append(JsonlWriter(str(work / "cleaned"), output_filename="${rank}.jsonl", compression=None))
    return ingest


def _duplicate_finding_stages(cfg: PrepareConfig, work: Path, exact_cfg, mh_cfg) -> list[_Stage]:
    """The corpus-wide steps between ingest and dedup: exact duplicates, MinHash buckets and clusters."""
    from datatrove.pipeline.dedup.exact_dedup import ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupCluster

    stages = []
    if cfg.dedup.exact:
        find = ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact_cfg)
        stages.append(_Stage("exact", [find], 1))
    if cfg.dedup.near:
        buckets = MinhashDedupBuckets(str(work / "minhash_sigs"), str(work / "minhash_buckets"), config=mh_cfg)
        cluster = MinhashDedupCluster(str(work / "minhash_buckets"), str(work / "minhash_remove"), config=mh_cfg)
        stages += [_Stage("buckets", [buckets], mh_cfg.num_buckets), _Stage("cluster", [cluster], 1)]
    return stages


def _dedup_pipeline(cfg: PrepareConfig, work: Path) -> list:
    """cleaned/*.jsonl → drop duplicates → sentences, train/validation → docs/*.jsonl."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from ptft_dist.corpus import steps as st

    return [
        JsonlReader(str(work / "cleaned"), glob_pattern="*.jsonl", compression=None),
        st.DropDuplicates(str(work / "exact_dups") if cfg.dedup.exact else None,
                          str(work / "minhash_remove") if cfg.dedup.near else None),
        st.SplitSentences(cfg),
        JsonlWriter(str(work / "docs"), output_filename="${rank}.jsonl", compression=None),
    ]


def minhash_config(cfg: PrepareConfig):
    """LSH bands b × rows r ≤ num_perm whose S-curve midpoint (1/b)^(1/r) is closest to the threshold."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    n = cfg.dedup.num_perm
    b, r = min(
        ((b, r) for r in range(1, n + 1) for b in range(1, n // r + 1)),
        key=lambda br: (abs((1 / br[0]) ** (1 / br[1]) - cfg.dedup.threshold), -br[0] * br[1]),
    )
    return MinhashConfig(n_grams=cfg.dedup.ngram, num_buckets=b, hashes_per_bucket=r)


def _executors(stages: list[_Stage], cfg: PrepareConfig, out: Path):
    from ptft_dist.corpus.steps import QuietLocalExecutor

    work = out / WORK_DIR
    if cfg.executor == "local":
        return [
            QuietLocalExecutor(s.pipeline, tasks=s.tasks, workers=min(s.tasks, max(1, cfg.workers)),
                               logging_dir=str(work / "logs" / s.name))
            for s in stages
        ]
    from datatrove.executor import SlurmPipelineExecutor

    if not cfg.slurm_partition:
        raise InputError("prepare.slurm_partition: required with prepare.executor=slurm")
    execs: list = []
    for s in stages:
        execs.append(SlurmPipelineExecutor(
            s.pipeline, tasks=s.tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
            cpus_per_task=cfg.slurm_cpus_per_task, sbatch_args={"mem-per-cpu": f"{cfg.slurm_mem_per_cpu_mb}M"},
            job_name=f"ptft-prepare-{s.name}", logging_dir=str(work / "logs" / s.name),
            slurm_logs_folder=str(work / "slurm_logs" / s.name), depends=execs[-1] if execs else None,
            env_command=f"export PATH={Path(sys.executable).parent}:$PATH", mail_type="NONE", qos="",
        ))
    return execs


# --------------------------------------------------------------------------- entry point


def prepare(inputs: list[str], output: str | Path, cfg: Config, overwrite: bool = False) -> Path:
    """Run the whole preparation; returns the corpus directory (or, on SLURM, after submitting)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # before datatrove imports tqdm: its per-task bars are noise here
    pcfg = cfg.prepare
    out = Path(output).resolve()
    sources = resolve_sources(inputs, pcfg.storage_options, output=out)
    fingerprint = {"inputs": sorted(s.url for s in sources), "config": config_hash(pcfg)}
    resumed = claim_output(out, fingerprint, overwrite)
    save_resolved(cfg, out)
    total_mb = sum(s.size for s in sources) / 2**20
    log.info(f"{len(sources)} source(s), {total_mb:.1f} MB → {out}" + (" (resuming)" if resumed else ""))
    stages = build_stages(sources, pcfg, out)
    executors = _executors(stages, pcfg, out)
    _quiet_console_logs()
    if pcfg.executor == "slurm":
        executors[-1].run()  # submits the whole chain through its `depends`
        log.info(f"submitted {len(stages)} dependent SLURM jobs; the corpus is ready when "
                 f"{out / 'manifest.json'} exists (logs: {out / WORK_DIR / 'slurm_logs'})")
        return out
    for i, (stage, ex) in enumerate(zip(stages, executors), 1):
        _run_stage(i, len(stages), stage, ex, sources, out)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)  # the manifest now vouches for the corpus
    log_report(out)
    return out


def _run_stage(i: int, n: int, stage: _Stage, executor, sources: list[Source], out: Path) -> None:
    """One local stage with its progress bar; a failure becomes one clear error (see _explain_failure)."""
    t0 = time.perf_counter()
    log.info(f"[{i}/{n}] {stage.name:<9} ({stage.tasks} task{'s' if stage.tasks > 1 else ''})")
    try:
        with StageProgress(out / WORK_DIR / "progress" / stage.name, _progress_total(stage.name, sources, out)):
            executor.run()
    except Exception as exc:
        log.info(f"[{i}/{n}] {stage.name} failed")
        raise _explain_failure(out, stage.name, exc) from None
    log.info(f"      done in {time.perf_counter() - t0:.1f}s")
    if stage.name == "ingest":
        _check_ingest(out)
    if stage.name == "dedup":
        _check_training_documents(out)
    _record_time(out, stage.name, time.perf_counter() - t0)


def _progress_total(stage: str, sources: list[Source], out: Path) -> tuple[int, str] | None:
    """What a stage's progress bar counts: raw bytes while ingesting, documents while encoding."""
    if stage == "ingest":
        return sum(s.size for s in sources), "B"
    if stage == "encode":
        counts = step_counts(stage_metrics(out / WORK_DIR, "dedup"), "sentences")
        return counts.get("train_docs", 0) + counts.get("validation_docs", 0), "doc"
    return None


class StageProgress:
    """A console bar fed by the counters that tasks leave in ``progress/RANK`` (works across processes)."""

    def __init__(self, folder: Path, total: tuple[int, str] | None):
        self.folder, self.total = folder, total
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> int:
        n = 0
        for f in self.folder.glob("*"):
            with contextlib.suppress(OSError, ValueError):
                n += int(f.read_text() or 0)
        return n

    def _loop(self) -> None:
        from tqdm import tqdm

        total, unit = self.total or (None, "it")
        with tqdm(total=total or None, unit=unit, unit_scale=True, leave=False, disable=False,
                  file=sys.stderr, mininterval=1.0) as bar:
            while not self._stop.wait(1.0):
                bar.n = self._read()
                bar.refresh()

    def __enter__(self) -> StageProgress:
        if self.total is not None and sys.stderr.isatty():
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def _quiet_console_logs() -> None:
    """datatrove logs every task to the console by default; keep warnings only (details are in files)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}")


def _check_ingest(out: Path) -> None:
    """Stop early, before dedup and tokenizer training, when there is nothing to prepare."""
    ingest = stage_metrics(out / WORK_DIR, "ingest")
    counts = step_counts(ingest, "read")
    if not counts.get("input_docs"):
        nulls, empties = counts.get("null_text_skipped", 0), counts.get("empty_text_skipped", 0)
        if nulls or empties:
            raise InputError(f"the inputs contain no documents: every record's text field is null ({nulls}) "
                             f"or empty ({empties}); is prepare.text_field the right field?")
        raise InputError("the inputs contain no documents (empty files?)")
    if not step_counts(ingest, "clean+pii").get("clean_docs"):
        raise InputError(f"all {counts['input_docs']} documents were dropped by the cleaning filters "
                         "(see prepare.clean.*)")


def _check_training_documents(out: Path) -> None:
    """Stop before tokenizer training when no document is left for the train split, saying why."""
    counts = step_counts(stage_metrics(out / WORK_DIR, "dedup"), "sentences")
    if counts.get("train_docs"):
        return
    if counts.get("validation_docs"):
        raise InputError(f"all {counts['validation_docs']} documents went to the validation split and none to "
                         "train: lower prepare.validation_fraction")
    raise InputError(f"no document has a sentence of prepare.min_sentence_chars characters or more "
                     f"({counts.get('dropped_no_sentences', 0)} dropped): lower prepare.min_sentence_chars")


def _record_time(out: Path, stage: str, seconds: float) -> None:
    path = out / WORK_DIR / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    path.write_text(json.dumps(times))


def _explain_failure(out: Path, stage: str, exc: Exception) -> Exception:
    """Turn a failed task into one clear line: the recorded input error, or where the logs are."""
    errors = sorted((out / WORK_DIR / "errors").glob("*.txt"))
    if errors:
        return InputError(errors[0].read_text().strip())
    if isinstance(exc, InputError):
        return exc
    logs = out / WORK_DIR / "logs" / stage / "logs"
    return RuntimeError(f"prepare stage '{stage}' failed: {exc} (task logs: {logs}); "
                        f"re-run the same command to resume")

