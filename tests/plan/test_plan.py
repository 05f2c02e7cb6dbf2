"""``ptft plan`` without running a job: the command's text / JSON, its arithmetic against the model
the loop really builds and against DeepSpeed's documented formulas, the published BERT scaling
anchor, and bad input (one line, exit 2). The checks against real runs are test_measured.py and
test_network.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptft_dist.cli import main
from ptft_dist.config import load_config
from ptft_dist.engine.base import check_global_batch
from ptft_dist.plan import comms, memory
from ptft_dist.plan.workload import build_workload

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs/pretrain/base-gpu.yaml")
LARGE = str(REPO / "configs/pretrain/large-gpu.yaml")


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys, *args: str) -> str:
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptft: error: "), err
    return err[0]


def test_parameter_count_is_the_model_the_loop_builds():
    from ptft_dist.metrics.parameters import count_parameters
    from ptft_dist.pretrain.model import build_pretrainer

    for nsp in (True, False):
        cfg = load_config(None, ["model.preset=mini", f"data.nsp={str(nsp).lower()}", "prepare.tokenizer.vocab_size=1000"])
        w = build_workload(cfg, "cpu")
        model = build_pretrainer(cfg.model, 1000, 0, nsp=nsp)
        assert w.params == count_parameters(model)["total"]
        assert w.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert w.trainable < w.params  # MLM-only: pooler + NSP head frozen


def test_text_report_and_json_agree(capsys):
    assert main(["plan", "-c", BASE, "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100"]) == 0
    text = capsys.readouterr().out
    plan = plan_json(capsys, "-c", BASE, "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100")
    assert [o["label"] for o in plan["options"]] == ["zero0", "zero1", "zero2", "zero3", "zero2+offload",
                                                    "zero3+offload"]
    best = plan["recommended"]
    assert f"recommended: {best['label']}, micro-batch {best['micro_batch']} x accumulation {best['grad_accum']}" in text
    assert plan["job"]["ranks"] == 32 and plan["job"]["global_batch"] == 256 * 1 * 32  # as configured
    assert 100e6 < plan["workload"]["params"] < 120e6  # BERT-base
    for o in plan["options"]:
        assert o["micro_batch"] * o["grad_accum"] * 32 == plan["job"]["global_batch"]
        assert o["micro_batch"] <= o["max_micro_batch"]
        m = o["memory_gib"]
        assert m["total"] == pytest.approx(sum(m[k] for k in ("params", "grads", "optimizer", "activations",
                                                              "buffers", "runtime")), abs=1e-3)
    # ZeRO partitions: optimizer state per rank 12Ψ (fp32 master + moments) at ZeRO-0 bf16, 12Ψ/32 beyond
    psi = plan["workload"]["trainable"]
    opt = {o["label"]: o["memory_gib"]["optimizer"] * 2**30 for o in plan["options"]}
    assert opt["zero0"] == pytest.approx(12 * psi, rel=1e-3)
    assert opt["zero1"] == pytest.approx(12 * psi / 32, rel=1e-3)
    assert [s["nodes"] for s in plan["scaling"]] == [1, 2, 4]
    assert plan["scaling"][0]["efficiency"] == pytest.approx(1.0)


def test_sbatch_line_runs_the_recommendation(capsys):
    plan = plan_json(capsys, "-c", BASE, "--nodes", "2", "--gpus-per-node", "8", "--gpu", "a100",
                     "--interconnect", "ib200", "--global-batch", "4096")
    line = plan["sbatch"]
    assert line.startswith(f"PTFT_CONFIG={BASE} sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 "
                           "slurm/pretrain.sbatch ")
    assert (REPO / "slurm/pretrain.sbatch").is_file()
    overrides = dict(a.split("=", 1) for a in line.split("slurm/pretrain.sbatch ")[1].split())
    cfg = load_config(BASE, [f"{k}={v}" for k, v in overrides.items()])
    assert check_global_batch(cfg.train, 16) == 4096  # the engine accepts it on 2 x 8 ranks
    assert int(overrides["train.zero_stage"]) == plan["recommended"]["zero_stage"]


def test_communication_formulas():
    cfg = load_config(None, ["model.preset=small", "prepare.tokenizer.vocab_size=1000", "train.precision=fp32"])
    w = build_workload(cfg, "cpu")
    psi, b, n = w.trainable, 4, 8
    by_stage = {s: comms.comm_plan(w, s, n, grad_accum=4) for s in range(4)}
    assert by_stage[0].by_op() == {"all_reduce": psi * b}  # once per step, whatever the accumulation
    assert by_stage[0].wire_bytes == pytest.approx(2 * (n - 1) / n * psi * b)  # the data-parallel 2Ψ
    assert by_stage[1].by_op() == {"all_reduce": psi * b, "all_gather_into_tensor": psi * b / n}
    assert by_stage[2].by_op()["all_reduce"] == 4 * psi * b  # ZeRO-2 reduces every micro-batch
    passes = 1 + comms.zero3_regathered_params(w) / w.params  # gathered once, part of it again for backward
    assert by_stage[3].wire_bytes == pytest.approx(4 * (passes + 1) * (n - 1) / n * psi * b)  # + reduce-scatter
    assert comms.comm_plan(w, 2, 1, 4).collectives == []


def test_zero3_regathers_for_backward_what_lies_beyond_the_reuse_distance(monkeypatch):
    """The reuse distance (engine/ds_config.py: 24h², two layers) decides: the embeddings and every
    layer with two or more layers after it are gathered again; a huge distance keeps all (the 2Ψ
    case), a tiny one re-gathers all but the last layer and the head (towards the paper's 3Ψ)."""
    cfg = load_config(None, ["model.preset=small", "prepare.tokenizer.vocab_size=1000", "model.num_hidden_layers=6"])
    w = build_workload(cfg, "h100")
    h, i = w.hidden, w.intermediate
    layer = 4 * h * h + 2 * h * i + 9 * h + 2 * i
    embeddings = w.params - w.layers * layer - 2 * h * h
    assert comms.zero3_regathered_params(w) == pytest.approx(embeddings + 4 * layer)  # layers 0-3 of 0-5
    monkeypatch.setattr(comms, "zero3_live_parameters", lambda hidden: 10**12)
    assert comms.zero3_regathered_params(w) == pytest.approx(embeddings)
    monkeypatch.setattr(comms, "zero3_live_parameters", lambda hidden: 1)
    assert comms.zero3_regathered_params(w) == pytest.approx(embeddings + 5 * layer)
    plan = comms.comm_plan(w, 3, 64, grad_accum=1)
    assert plan.wire_bytes == pytest.approx((2 + (embeddings + 5 * layer) / w.params) * 63 / 64 * w.params * 2)


def test_memory_fit_is_the_largest_micro_batch():
    cfg = load_config(None, ["model.preset=base", "prepare.tokenizer.vocab_size=30522"])
    w = build_workload(cfg, "a100")
    cap = 20 * 2**30
    for stage in range(4):
        mb = memory.largest_micro_batch(w, stage, 16, cap, on_cpu=False)
        assert memory.estimate(w, stage, 16, mb, on_cpu=False).total <= cap
        assert memory.estimate(w, stage, 16, mb + 1, on_cpu=False).total > cap
    # eager attention keeps the s x s probabilities for backward, CUDA SDPA (flash / memory-efficient) does not
    eager = build_workload(load_config(None, ["model.preset=base", "model.attn_implementation=eager"]), "a100")
    assert memory.activation_bytes(eager, 8, False) > memory.activation_bytes(w, 8, False)


def test_projection_against_nvidia_bert_large_scaling(capsys):
    """NVIDIA's published BERT-large phase-1 table (DGX A100, 8 x HDR 200 per node, global batch
    65536, LAMB): 90.6% weak-scaling efficiency at 32 nodes. Our projection for the same job
    must not promise less, nor (with the same MFU) more than ~10 points above it: docs/scaling.md."""
    plan = plan_json(capsys, "-c", LARGE, "--nodes", "32", "--gpus-per-node", "8", "--gpu", "a100",
                     "--interconnect", "ib200", "--global-batch", "65536", "optim.name=lamb", "train.zero_stage=0")
    eff = {p["nodes"]: p["efficiency"] for p in plan["scaling"]}
    assert 0.906 <= eff[32] <= 0.906 + 0.10
    assert eff[1] == pytest.approx(1.0) and all(eff[a] >= eff[b] - 1e-9 for a, b in ((2, 8), (8, 32)))
    assert [o["label"] for o in plan["options"]] == ["zero0"] and "lamb" in plan["job"]["note"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "v100"], "--gpu 'v100': unknown; known: a100, h100, h200, b200, cpu"),
        (["--gpu", "h100", "--interconnect", "carrier-pigeon"], "--interconnect 'carrier-pigeon': unknown; known: ib400"),
        (["--gpu", "h100", "--global-batch", "100"], "global batch 100 is not divisible by the 16 ranks"),
        (["--gpu", "h100", "--memory-gib", "1"], "does not fit at any micro-batch: "),
        (["--gpu", "cpu", "optim.name=lamb", "train.precision=fp32"], "optim.name=lamb needs DeepSpeed's FusedLamb"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    line = one_error_line(capsys, "-c", BASE, "--nodes", "2", "--gpus-per-node", "8", *args)
    assert message in line
    if "does not fit" in message:
        assert "GiB short" in line and "per rank, a rank has 1.00 GiB" in line


def test_readme_command_and_the_compute_sources(capsys, tmp_path):
    readme = ["--nodes", "8", "--gpus-per-node", "8", "--gpu", "h100", "--interconnect", "ib400", "--global-batch", "8192"]
    assert f"ptft plan -c configs/pretrain/base-gpu.yaml {' '.join(readme)}" in (REPO / "README.md").read_text()
    table = plan_json(capsys, "-c", BASE, *readme)
    assert "assumed: no H100 run of ours yet" in table["compute"]["source"] and table["compute"]["ours"] is False
    given = plan_json(capsys, "-c", BASE, *readme, "--mfu", str(table["compute"]["mfu"] / 2))
    assert given["recommended"]["compute_s"] == pytest.approx(2 * table["recommended"]["compute_s"], rel=1e-6)
    line = one_error_line(capsys, "-c", BASE, *readme, "--calibrate", str(tmp_path))
    assert "needs metrics.jsonl and resolved_config.yaml" in line
    assert "--mfu 1.5: must be in (0, 1]" in one_error_line(capsys, "-c", BASE, *readme, "--mfu", "1.5")
