"""The GPU benchmark's every branch, on CPU (benchmarks/gpu_matrix.py via pretrain_throughput.py
--gpu --smoke-cpu): padded, packed, compiled and no-dropout ptft runs next to HF Trainer, so the
one GPU call (never run here: no GPU) fails only on what needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.extended
def test_gpu_matrix_smoke_runs_every_variant(tmp_path):
    out = tmp_path / "matrix.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pretrain_throughput.py"), "--gpu", "--smoke-cpu",
           "--shapes", "tiny-64", "--threads", "1", "--out", str(out), "--keep", str(tmp_path / "work")]
    p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["tiny-64"]
    names = ("padded", "packed", "packed+nodrop", "packed+nodrop+compile")
    assert set(rows) >= set(names)
    for name in names:
        row = rows[name]
        assert "failed" not in row and "skipped" not in row, (name, row)
        assert row["seq_per_s"] > 0 and 0 < row["mfu"] <= 1.0, (name, row)
        assert row["hf_trainer"]["seq_per_s"] > 0 and row["ratio_vs_hf"] > 0, (name, row)
        assert ("compile_s" in row) == ("compile" in name), (name, row)
    assert rows["packed+nodrop+compile"]["compile_s"] > 0
    assert rows["packed"]["hf_trainer"] != rows["packed+nodrop"]["hf_trainer"]  # HF measured on each config
    # The runs really differ as named: packed runs log the ptft_varlen kernel, compiled ones compile.
    logs = {p.name: p.read_text() for p in (tmp_path / "work" / "tiny-64").glob("ptft_*.log")}
    assert "packed batches run" in logs["ptft_packed.log"] and "packed batches run" not in logs["ptft_padded.log"]
    assert "engine.compile()" in logs["ptft_packed_nodrop_compile.log"]
