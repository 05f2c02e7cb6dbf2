"""What a fine-tuning run reads from its config: taken once, nothing the user set silently replaced."""

from pathlib import Path

import pytest

from ptft_dist.config import load_config
from ptft_dist.errors import UserError
from ptft_dist.finetune.settings import NOT_USED, plan_steps, read_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=1e-3", "optim.lr is not used by ptft finetune; set finetune.lr"),
    ("optim.schedule=cosine", "optim.schedule is not used by ptft finetune; set finetune.warmup_ratio"),
    ("optim.warmup_steps=10", "optim.warmup_steps is not used by ptft finetune; set finetune.warmup_ratio"),
    ("train.micro_batch_size=4", "train.micro_batch_size is not used by ptft finetune; set finetune.batch_size"),
    ("train.max_steps=50", "train.max_steps is not used by ptft finetune; set finetune.epochs"),
    ("train.run_dir=x", "train.run_dir is not used by ptft finetune; set finetune.output_dir"),
])
def test_pretraining_only_keys_are_refused(override, needle):
    with pytest.raises(UserError) as err:
        read_settings(load_config(None, ["finetune.model=m", override]))
    assert needle in str(err.value)


def test_every_refused_key_is_named_at_once():
    with pytest.raises(UserError) as err:
        read_settings(load_config(None, ["optim.lr=1e-3", "train.max_steps=50"]))
    assert "optim.lr is not used" in str(err.value) and "train.max_steps is not used" in str(err.value)


def test_defaults_and_the_shipped_config_are_accepted():
    assert all(key.split(".")[0] in ("optim", "train", "checkpoint") for key in NOT_USED)
    read_settings(load_config(None))
    s = read_settings(load_config(ROOT / "configs" / "finetune" / "rotten_tomatoes.yaml"))
    assert s.lr == pytest.approx(1e-4) and s.seed == 42 and s.engine_optim.weight_decay == pytest.approx(0.01)
    lora = read_settings(load_config(ROOT / "configs" / "finetune" / "rotten_tomatoes.yaml", ["finetune.method=lora"]))
    assert lora.lr == pytest.approx(1e-3)  # finetune.lora_lr


def test_honoured_engine_settings_reach_the_engine_and_the_schedule_comes_from_finetune():
    cfg = load_config(None, ["finetune.epochs=2", "finetune.batch_size=5", "finetune.lr=3e-5",
                             "finetune.warmup_ratio=0.1", "train.grad_accum=2", "train.zero_stage=3",
                             "train.precision=fp32", "optim.weight_decay=0.05", "optim.grad_clip=0.5",
                             "optim.min_lr_ratio=0.1"])
    plan = plan_steps(read_settings(cfg), n_train=100, world=2)
    # 100 examples over 2 ranks: 50 per rank, 10 micro-batches of 5; 2 epochs, 2 micro-batches per step
    assert plan.max_steps == 2 * 10 // 2 and plan.warmup_steps == round(0.1 * plan.max_steps)
    t, o = plan.engine_train, plan.engine_optim
    assert (t.micro_batch_size, t.max_steps, t.grad_accum, t.zero_stage, t.precision) == (5, 10, 2, 3, "fp32")
    assert (o.lr, o.schedule, o.warmup_steps) == (3e-5, "linear", plan.warmup_steps)
    assert (o.weight_decay, o.grad_clip, o.min_lr_ratio) == (0.05, 0.5, 0.1)
    assert cfg.optim.lr == 1e-4 and cfg.train.micro_batch_size == 8  # the user's config is left as it was


@pytest.mark.parametrize("overrides, world, resumed, stage", [
    ([], 1, None, 0),  # the default ZeRO-2 at one rank: nothing to partition, ZeRO-0 (issue 13)
    (["train.zero_stage=1"], 1, None, 0),
    ([], 2, None, 2),  # several ranks: as set
    (["train.zero_stage=3"], 1, None, 3),  # chosen to build and hold the model partitioned
    (["train.zero_stage=2", "train.offload_optimizer=true"], 1, None, 2),
    (["train.deepspeed_config=ds_configs/zero2.json"], 1, None, 2),  # the user's own JSON decides
    (["train.backend=accelerate"], 1, None, 2),
    ([], 1, 2, 2),  # resumed from a ZeRO-2 checkpoint: its optimizer state is in ZeRO's layout
    ([], 1, 0, 0),
])
def test_one_rank_runs_zero_1_2_as_zero_0(overrides, world, resumed, stage):
    plan = plan_steps(read_settings(load_config(None, ["finetune.model=m", *overrides])), 64, world, resumed)
    assert plan.engine_train.zero_stage == stage
