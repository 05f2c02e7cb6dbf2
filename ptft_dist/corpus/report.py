"""``prepare_report.json``: what every prepare stage saw, kept and dropped, and how fast.

Counts come from the per-task datatrove stats files under ``CORPUS/.prepare/`` (:data:`WORK_DIR`),
which survive a resumed run, so a report after a crash-and-resume still counts every task once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ptft_dist.corpus.format import Manifest, load_manifest
from ptft_dist.log import get_logger

WORK_DIR = ".prepare"  # prepare's working state inside the output directory; removed when it finishes
REPORT_NAME = "prepare_report.json"


def stage_metrics(work: Path, stage: str) -> dict[str, dict[str, float]]:
    """{step name: {metric: total}} summed over the stage's tasks."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in sorted((work / "logs" / stage / "stats").glob("*.json")):
        for step in json.loads(path.read_text()):
            for metric, value in step.get("stats", {}).items():
                totals[step["name"]][metric] += value["total"] if isinstance(value, dict) else value
    return totals


def step_counts(metrics: dict[str, dict[str, float]], step: str) -> dict[str, int]:
    """Metrics of our step called ``step`` (datatrove names steps "TYPE: name")."""
    found = next((v for k, v in metrics.items() if k == step or k.endswith(f": {step}")), {})
    return {k: int(v) for k, v in found.items()}


def build_report(root: Path, manifest: Manifest) -> dict:
    work = root / WORK_DIR
    ingest = stage_metrics(work, "ingest")
    dedup = stage_metrics(work, "dedup")
    read = step_counts(ingest, "read")
    clean = step_counts(ingest, "clean+pii")
    removed = step_counts(dedup, "dedup")
    sentences = step_counts(dedup, "sentences")
    times_path = work / "times.json"
    seconds = json.loads(times_path.read_text()) if times_path.exists() else {}
    input_mb = read.get("input_bytes", 0) / 2**20
    total_s = sum(seconds.values())
    report = {
        "read": {"files": read.get("input_files", 0), "documents": read.get("input_docs", 0),
                 "megabytes": round(input_mb, 3), "decode_replaced": read.get("decode_replaced", 0),
                 "bad_json_skipped": read.get("bad_json_skipped", 0),
                 "null_text_skipped": read.get("null_text_skipped", 0),
                 "empty_text_skipped": read.get("empty_text_skipped", 0)},
        "clean": {"kept": clean.get("clean_docs", 0),
                  "dropped": {k[len("dropped_"):]: v for k, v in clean.items() if k.startswith("dropped_")}},
        "pii": {k[len("pii_"):]: v for k, v in clean.items() if k.startswith("pii_")},
        "dedup": {"exact_removed": removed.get("exact_removed", 0), "near_removed": removed.get("near_removed", 0)},
        "sentences": {"documents": sentences.get("train_docs", 0) + sentences.get("validation_docs", 0),
                      "sentences": sentences.get("sentences", 0),
                      "dropped_no_sentences": sentences.get("dropped_no_sentences", 0)},
        "tokenizer": {"vocab_size": manifest.vocab_size, "hash": manifest.tokenizer_hash},
        "splits": {s: {**manifest.totals(s), "shards": len(manifest.splits[s])} for s in manifest.splits},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "throughput_mb_per_s": round(input_mb / total_s, 3) if total_s else None,
    }
    return report


def log_report(corpus_dir: str | Path) -> None:
    """The summary table logged at the end of ``ptft prepare``."""
    root = Path(corpus_dir)
    r = json.loads((root / REPORT_NAME).read_text())
    m = load_manifest(root)
    read, dropped = r["read"], r["clean"]["dropped"]
    rows = [
        ("read", f"{read['documents']:,} docs from {read['files']} file part(s), {read['megabytes']:.1f} MB"
                 + (f", {read['decode_replaced']} undecodable repaired" if read["decode_replaced"] else "")
                 + (f", {read['bad_json_skipped']} bad JSON lines skipped" if read["bad_json_skipped"] else "")
                 + (f", {n} null texts skipped" if (n := read.get("null_text_skipped")) else "")
                 + (f", {n} empty texts skipped" if (n := read.get("empty_text_skipped")) else "")),
        ("clean", f"{r['clean']['kept']:,} kept; dropped "
                  + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none")),
        ("pii", ", ".join(f"{k} {v}" for k, v in r["pii"].items()) or "none found"),
        ("dedup", f"exact -{r['dedup']['exact_removed']}, near -{r['dedup']['near_removed']}"),
        ("sentences", f"{r['sentences']['documents']:,} docs, {r['sentences']['sentences']:,} sentences"),
        ("tokenizer", f"vocab {m.vocab_size:,} (hash {m.tokenizer_hash})"),
    ]
    for split, t in r["splits"].items():
        rows.append((split, f"{t['documents']:,} docs, {t['sentences']:,} sentences, {t['tokens']:,} tokens, "
                            f"{t['shards']} shard(s), {t['bytes'] / 2**20:.1f} MB"))
    if r.get("throughput_mb_per_s"):
        rows.append(("time", f"{sum(r['seconds'].values()):.1f}s, {r['throughput_mb_per_s']:.2f} MB/s of raw text"))
    width = max(len(k) for k, _ in rows)
    table = "".join(f"\n  {k:<{width}}  {v}" for k, v in rows)
    get_logger("prepare").info(f"prepared corpus: {root}{table}")
