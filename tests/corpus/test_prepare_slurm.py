"""``ptft prepare`` with the SLURM executor: the stage chain runs as dependent array jobs on a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptft_dist.corpus import format as sh
from tests.corpus.test_prepare import corpus_texts
from tests.text_factory import documents


# CI runs the SLURM executor through slurm/prepare.sbatch (tests/launch/test_slurm_jobs.py,
# test_prepare_job_makes_a_verified_corpus[slurm], which also compares with a local prepare); this
# direct ``ptft prepare prepare.executor=slurm`` run is the extended one
@pytest.mark.extended
def test_prepare_runs_as_dependent_slurm_jobs(slurm_cluster, tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(80, seed=31)))
    out = tmp_path / "corpus"
    ptft = str(Path(sys.executable).parent / "ptft")
    proc = subprocess.run(
        [ptft, "prepare", "-i", str(src), "-o", str(out), "prepare.executor=slurm",
         "prepare.slurm_partition=debug", "prepare.workers=2", "prepare.slurm_mem_per_cpu_mb=100",
         "prepare.tokenizer.vocab_size=600", "prepare.validation_fraction=0.05"],
        env=slurm_cluster.env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "submitted" in proc.stderr
    deadline = time.monotonic() + 240
    while not (out / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    logs = out / ".prepare" / "slurm_logs"
    assert (out / "manifest.json").exists(), "\n".join(
        p.read_text()[-1500:] for p in sorted(logs.rglob("*.out"))[-3:]
    ) + slurm_cluster.log_tail()
    assert sh.verify_corpus(out) == []
    # the stages really ran as array jobs: ingest tasks 0 and 1 of one array job, each with its own log
    array_logs = {}
    for p in (logs / "ingest").glob("*.out"):
        job, index = p.stem.split("_")
        array_logs.setdefault(job, set()).add(index)
    assert {"0", "1"} in array_logs.values()
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["read"]["documents"] == 80
    local = tmp_path / "local"
    from ptft_dist.cli import main

    assert main(["prepare", "-i", str(src), "-o", str(local), "prepare.workers=1",
                 "prepare.tokenizer.vocab_size=600", "prepare.validation_fraction=0.05"]) == 0
    assert sorted(corpus_texts(out)) == sorted(corpus_texts(local))
