"""ZeRO-3 pretraining builds its model partitioned: no rank ever holds the whole model (the
Trainer builds it inside ``deepspeed.zero.Init`` through ``engine.model_build_context``), and the
partitioned build gives the same initial weights as a whole one. 2 CPU ranks under the real
``deepspeed`` launcher; what each rank holds is read from the parameters themselves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus_factory import make_corpus
from tests.dist_scripts.common import free_port, job_env

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "dist_scripts" / "zero3_build_job.py"


def test_zero3_trainer_builds_the_model_partitioned_with_the_same_init(tmp_path):
    make_corpus(tmp_path / "corpus", shard_docs=(20, 15), val_docs=(6,), sentences=(2, 8), n_words=(4, 12))
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(JOB), str(tmp_path / "corpus"),
           str(tmp_path / "run"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and len(r["params"]) > 20
        for p in r["params"]:  # right after the build, before the engine: a partition, never the data
            assert p["zero"] and p["status"] == "ZeroParamStatus.NOT_AVAILABLE", p
            assert p["local_numel"] == 0, p
            assert p["partition_numel"] == math.ceil(p["full_numel"] / 2), p
        assert sum(p["partition_numel"] for p in r["params"]) <= 0.51 * sum(p["full_numel"] for p in r["params"])
        # same initial weights as a whole build of the same seed; the whole build is not partitioned
        assert r["mismatched"] == [] and r["names_gathered"] == r["names_whole"]
        assert not r["whole_is_zero"]
        assert r["word_embedding_std"] == pytest.approx(0.02, rel=0.1)  # HF's init, not an empty partition
        assert r["tied"]  # the MLM decoder is still the word-embedding matrix
        assert r["groups"] == r["groups_whole"] and len(r["groups"]) == 2  # weight decay on the same parameters
    assert ranks[0]["rng_after_build"] == ranks[1]["rng_after_build"]  # dropout does not depend on the build
