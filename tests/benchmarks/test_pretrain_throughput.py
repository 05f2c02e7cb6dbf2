"""The documented packed-rows benchmark, walked end to end at smoke size (benchmarks/pretrain_throughput.py
--smoke --arch roberta --short-texts --pack-samples): the demo's Rotten Tomatoes sentences prepared with
MiniLM's tokenizer, ptft with packed rows and one sentence per row, HF Trainer on the same rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_packed_rows_benchmark_on_short_texts(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pretrain_throughput.py"), "--smoke", "--arch", "roberta",
           "--short-texts", "--pack-samples", "--out", str(out), "--keep", str(tmp_path / "work")]
    p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["setup"]["pack"] and report["corpus"].startswith("Rotten Tomatoes")
    # rows hold several ~29-token sentences (seq 64 at smoke size: at least two)
    assert report["mean_tokens_per_sample"] > 40
    for side in ("ptft", "hf_trainer"):
        assert report[side]["tokens_per_s"] > 0
        assert 0 < report[side]["mfu_model"] <= report[side]["mfu_executed"] * 1.05 <= 1.05
    assert report["ptft_one_chunk_per_row"]["tokens_per_s"] > 0
    assert report["ratio"] > 0 and report["ratio_packed_vs_one_per_row"] > 0
    # the corpus was prepared with MiniLM's tokenizer and holds no padding (the prepare fix)
    manifest = json.loads((tmp_path / "work" / "short_texts" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 30522
    shard = manifest["splits"]["train"][0]
    assert shard["tokens"] < 64 * shard["sentences"]  # not every sentence padded to a fixed length
