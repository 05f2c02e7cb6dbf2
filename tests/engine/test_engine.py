"""Training engine (ptft_dist/engine/): DeepSpeed config resolution (ds_config.py, in-process), and real
multi-process runs over gloo that compare NUMBERS: ZeRO 0/1/2/3 losses, ZeRO-3 state memory,
save/load round trips, elastic resume 2 → 1 and 2 → 3 ranks (universal checkpoint), and the
Accelerate backend against DeepSpeed ZeRO-0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptft_dist.config import OptimConfig, TrainConfig
from ptft_dist.engine.base import EngineConfigError, check_global_batch
from ptft_dist.engine.ds_config import DS_CONFIG_DIR, resolve_deepspeed_config
from tests.dist_scripts.common import free_port, job_env

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "dist_scripts" / "engine_job.py"
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- config (in-process)


def test_templates_resolve_for_every_stage():
    for stage, off, name in [(0, False, "zero0"), (1, False, "zero1"), (2, False, "zero2"), (3, False, "zero3"),
                             (2, True, "zero2_offload"), (3, True, "zero3_offload")]:
        assert (DS_CONFIG_DIR / f"{name}.json").is_file()
        tc = TrainConfig(zero_stage=stage, offload_optimizer=off, micro_batch_size=8, grad_accum=4)
        cfg = resolve_deepspeed_config(tc, OptimConfig(lr=3e-4, grad_clip=0.5), 2, CPU)
        assert "auto" not in json.dumps(cfg), name
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
        assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # auto → fp32 on CPU
        assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-6,
                                                               "weight_decay": 0.01}}
        if off:
            assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


def test_precision_and_hidden_size_driven_fields():
    class M(torch.nn.Linear):
        class config:
            hidden_size = 64

    cfg = resolve_deepspeed_config(TrainConfig(zero_stage=3, precision="bf16"), OptimConfig(), 1, CPU, M(2, 2))
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    z = cfg["zero_optimization"]
    assert z["reduce_bucket_size"] == 64 * 64 and z["stage3_param_persistence_threshold"] == 640
    # about two layers gathered at a time, not DeepSpeed's 1e9 (the whole model stays gathered)
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 24 * 64 * 64
    cfg = resolve_deepspeed_config(TrainConfig(zero_stage=0, precision="fp16"), OptimConfig(), 1, CPU)
    assert cfg["fp16"]["enabled"] is True and cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def _user_json(tmp_path: Path, **overrides) -> str:
    cfg = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    for dotted, value in overrides.items():
        d = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    p = tmp_path / "user_ds.json"
    p.write_text(json.dumps(cfg))
    return str(p)


@pytest.mark.parametrize("override,ds_key,ds_val,run_key,run_val", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu", "16", "train.micro_batch_size", "8"),
    ({"zero_optimization__stage": 3}, "zero_optimization.stage", "3", "train.zero_stage", "2"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "2", "train.grad_accum", "1"),
    ({"optimizer__params__lr": 0.1}, "optimizer.params.lr", "0.1", "optim.lr", "0.0001"),
    ({"bf16__enabled": True}, "bf16.enabled", "true", "train.precision", "false"),
])
def test_user_json_contradiction_names_both_keys(tmp_path, override, ds_key, ds_val, run_key, run_val):
    tc = TrainConfig(zero_stage=2, micro_batch_size=8, deepspeed_config=_user_json(tmp_path, **override))
    with pytest.raises(ValueError) as ei:
        resolve_deepspeed_config(tc, OptimConfig(lr=1e-4), 2, CPU)
    msg = str(ei.value)
    assert f"{ds_key}={ds_val}" in msg and run_key in msg and run_val in msg, msg


def test_user_json_explicit_agreeing_values_and_extra_keys_kept(tmp_path):
    path = _user_json(tmp_path, train_micro_batch_size_per_gpu=8, zero_optimization__stage=2,
                      zero_optimization__reduce_bucket_size=12345, communication_data_type="fp32")
    tc = TrainConfig(zero_stage=2, micro_batch_size=8, deepspeed_config=path)
    cfg = resolve_deepspeed_config(tc, OptimConfig(), 2, CPU)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 12345 and cfg["communication_data_type"] == "fp32"
    assert cfg["train_batch_size"] == 16


def test_bad_combinations_fail_early_with_clear_messages(tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=64 != .*8 .*1 .*world size 2 = 16.*grad_accum=4"):
        check_global_batch(TrainConfig(micro_batch_size=8, grad_accum=1, global_batch_size=64), 2)
    assert check_global_batch(TrainConfig(micro_batch_size=8, grad_accum=4, global_batch_size=64), 2) == 64
    with pytest.raises(EngineConfigError, match="lamb.*zero_stage=2"):
        resolve_deepspeed_config(TrainConfig(zero_stage=2), OptimConfig(name="lamb"), 1, CPU)
    with pytest.raises(EngineConfigError, match="FusedLamb.*cpu"):
        resolve_deepspeed_config(TrainConfig(zero_stage=0), OptimConfig(name="lamb"), 1, CPU)
    with pytest.raises(EngineConfigError, match="offload_params.*zero_stage=3"):
        resolve_deepspeed_config(TrainConfig(zero_stage=2, offload_params=True), OptimConfig(), 1, CPU)
    with pytest.raises(EngineConfigError, match="not found"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "nope.json")), OptimConfig(), 1, CPU)
    (tmp_path / "s.json").write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(EngineConfigError, match="scheduler"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "s.json")), OptimConfig(), 1, CPU)
    (tmp_path / "o.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer":
                                                                        {"device": "cpu"}}}))
    with pytest.raises(EngineConfigError, match=r"offload_optimizer.device=\"cpu\" contradicts train.offload_optimizer"):
        resolve_deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "o.json")), OptimConfig(), 1, CPU)


# --------------------------------------------------------------------------- multi-process runs


def _run(cmd: list[str], log: Path, timeout: int = 400) -> None:
    with open(log, "wb") as f:
        p = subprocess.run(cmd, env=job_env(), stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}:\n" + log.read_text()[-4000:])


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(free_port())]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """2 ranks via the deepspeed launcher: ZeRO 0-3 numbers and ZeRO-2/3 checkpoints."""
    d = tmp_path_factory.mktemp("engine")
    launcher = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    _run([str(launcher), "--num_gpus", "2", "--master_port", str(port), str(JOB), "zero", str(d),
          str(d / "ckpt")], d / "zero.log")
    result = json.loads((d / "zero.json").read_text())
    result["leaked_shm"] = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return d, result


@pytest.mark.distributed
def test_deepspeed_cpu_shm_segments_are_released(zero_run):
    """DeepSpeed leaves a 67 MB /dev/shm segment per rank behind; the engine unlinks it after init."""
    _, r = zero_run
    assert r["leaked_shm"] == []
    assert "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" in (zero_run[0] / "zero.log").read_text()


@pytest.mark.distributed
def test_zero_stages_agree_on_losses(zero_run):
    _, r = zero_run
    base = r["losses"]["0"]
    assert len(base) == 3 and base[0] > 5  # ~ln(256) MLM + ln(2) NSP at init
    assert base[2] != base[0]  # it trains
    for stage in ("1", "2", "3"):
        assert r["losses"][stage] == pytest.approx(base, abs=1e-5), stage
        assert r[f"lr_{stage}"] == r["lr_0"] and r[f"gstep_{stage}"] == 3
        assert r[f"grad_norm_{stage}"] == pytest.approx(r["grad_norm_0"], rel=1e-5)
    assert r["losses"]["0"][0] == r["losses"]["3"][0]  # same init, same data: identical first loss
    for name in ("2o", "3o"):  # ZeRO-Offload: DeepSpeedCPUAdam on the CPU-held optimizer state
        assert r["losses"][name] == pytest.approx(base, abs=1e-5), name
        assert r[f"optimizer_{name}"] == "DeepSpeedCPUAdam"


@pytest.mark.distributed
def test_zero3_state_memory_is_partitioned(zero_run):
    _, r = zero_run
    z0, z3 = r["mem_bf16"]["0"], r["mem_bf16"]["3"]
    # bf16 + fp32 master/moments: ZeRO-0 holds 2+2+12 bytes/param, ZeRO-3 over 2 ranks about half
    assert z0["optimizer"] == 6 * z0["params"] and z0["grads"] == z0["params"]
    assert z3["total"] <= 0.55 * z0["total"], (z3, z0)
    for k in ("params", "grads", "optimizer"):
        assert z3[k] <= 0.55 * z0[k], k
    # fp32: ZeRO-1/2/3 partition the optimizer state (each rank 1/2 of master + moments)
    f = r["mem_fp32"]
    assert f["3"]["params"] <= 0.55 * f["0"]["params"]
    for s in ("1", "2", "3"):
        assert f[s]["optimizer"] <= 0.80 * f["0"]["optimizer"], s


@pytest.mark.distributed
def test_save_load_roundtrip_bitwise(zero_run):
    d, r = zero_run
    for stage in ("2", "3"):
        rt = r["roundtrip"][stage]
        assert rt["params_bitwise"] and rt["params_maxdiff"] == 0.0, stage
        assert rt["exp_avg_bitwise"] and rt["exp_avg_sq_bitwise"] and rt["exp_avg_nonzero"]
        assert rt["client"] == {"step": 3, "note": f"zero{stage}"} and rt["gstep"] == 3
        assert rt["lr"] == r[f"lr_{stage}"]
        assert rt["losses"] == r["continue"][stage]  # training continues identically
    tag = d / "ckpt" / "z3"
    meta = json.loads((tag / "ptft_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3 and meta["backend"] == "deepspeed"
    assert r["ds_config_z3"]["zero_optimization"]["stage"] == 3


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 3])
def test_elastic_resume_other_world_size(zero_run, world):
    d, r = zero_run
    _run(_torchrun(world) + [str(JOB), "elastic", str(d), str(d / "ckpt")], d / f"elastic{world}.log")
    e = json.loads((d / f"elastic_{world}.json").read_text())
    for stage in ("0", "2", "3"):
        x = e[stage]
        assert x["params_bitwise"], (world, stage, x["params_maxdiff"])
        assert x["exp_avg_bitwise"] and x["exp_avg_sq_bitwise"] and x["exp_avg_nonzero"], (world, stage)
        assert x["client"]["note"] == f"zero{stage}" and x["gstep"] == 3 and x["lr"] == r[f"lr_{stage}"]
        # same global batch (12 = 2 × accum × world): the next losses match the 2-rank run
        assert x["losses"] == pytest.approx(r["continue"][stage], abs=2e-6), (world, stage)
        # ZeRO-0 checkpoints hold the whole optimizer state: no conversion needed
        assert (d / "ckpt" / f"z{stage}" / "universal" / ".complete").is_file() == (stage != "0")


@pytest.mark.distributed
def test_accelerate_matches_deepspeed_zero0(zero_run, tmp_path):
    _, r = zero_run
    _run(_torchrun(2) + [str(JOB), "accelerate", str(tmp_path), str(tmp_path / "ckpt")], tmp_path / "acc.log")
    a = json.loads((tmp_path / "accelerate.json").read_text())
    assert a["losses"] == pytest.approx(r["losses"]["0"], abs=1e-5)
    assert a["grad_norm"] == pytest.approx(r["grad_norm_0"], rel=1e-5) and a["lr"] == r["lr_0"]
    rt = a["roundtrip"]
    assert rt["params_bitwise"] and rt["exp_avg_bitwise"] and rt["exp_avg_sq_bitwise"]
    assert rt["client"] == {"step": 3} and rt["gstep"] == 3 and rt["losses"] == a["continue"]
    assert {"model.safetensors", "optimizer.bin", "client_state.pt", "random_states_0.pkl"} <= set(a["files"])
