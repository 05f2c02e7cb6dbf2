"""Learning-rate schedules (ptft_dist/engine/schedule.py): values at key steps, shape, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from ptft_dist.config import OptimConfig
from ptft_dist.engine.schedule import lr_lambda

MAX = 100


def curve(schedule: str, **kw) -> list[float]:
    f = lr_lambda(OptimConfig(schedule=schedule, **kw), MAX)
    return [f(s) for s in range(MAX + 1)]


def test_warmup_is_shared_and_reaches_the_peak():
    for schedule in ("linear", "cosine", "wsd", "constant"):
        c = curve(schedule, warmup_steps=10)
        assert c[0] == pytest.approx(0.1) and c[4] == pytest.approx(0.5)
        assert c[9] == c[10] == 1.0
        assert all(a < b for a, b in zip(c[:9], c[1:10]))


def test_linear_and_cosine_key_values():
    lin = curve("linear", warmup_steps=10, min_lr_ratio=0.1)
    assert lin[55] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lin[MAX] == pytest.approx(0.1) and lin[MAX - 1] > 0.1
    cos = curve("cosine", warmup_steps=10, min_lr_ratio=0.0)
    assert cos[55] == pytest.approx(0.5)
    assert cos[10 + 90 // 3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert cos[MAX] == pytest.approx(0.0, abs=1e-12)
    assert curve("linear", warmup_steps=0)[0] == 1.0
    assert set(curve("constant", warmup_steps=5)[5:]) == {1.0}


def test_wsd_is_flat_then_one_minus_sqrt_decay():
    c = curve("wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert set(c[10:80]) == {1.0}
    assert c[80] == 1.0 and c[85] == pytest.approx(1 - math.sqrt(0.25))
    assert c[MAX] == pytest.approx(0.0)
    floor = curve("wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert floor[85] == pytest.approx(0.1 + 0.9 * 0.5) and floor[MAX] == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd", "constant"])
def test_non_increasing_after_warmup_and_bounded(schedule):
    c = curve(schedule, warmup_steps=7, min_lr_ratio=0.05)
    assert all(a >= b for a, b in zip(c[7:], c[8:]))
    assert all(0.05 - 1e-12 <= v <= 1.0 for v in c[7:])


@pytest.mark.parametrize(
    ("kw", "max_steps", "key"),
    [
        ({"warmup_steps": 200}, 100, "optim.warmup_steps"),
        ({"warmup_steps": -1}, 100, "optim.warmup_steps"),
        ({"min_lr_ratio": 1.5}, 100, "optim.min_lr_ratio"),
        ({"schedule": "wsd", "decay_fraction": 0.0}, 100, "optim.decay_fraction"),
        ({"schedule": "wsd", "warmup_steps": 50, "decay_fraction": 0.6}, 100, "optim.decay_fraction"),
        ({"schedule": "step"}, 100, "optim.schedule"),
        ({}, 0, "train.max_steps"),
    ],
)
def test_bad_config_names_the_key(kw, max_steps, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        lr_lambda(OptimConfig(**kw), max_steps)  # checked when the engine is built, before any step


def test_lambda_lr_drives_the_optimizer_and_resumes_from_its_step():
    """As the engines use it: ``LambdaLR(optimizer, lr_lambda(...))``, stepped once per optimizer step."""
    cfg = OptimConfig(lr=1e-3, schedule="linear", warmup_steps=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = LambdaLR(opt, lr_lambda(cfg, 20))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    state = sched.state_dict()

    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = LambdaLR(opt2, lr_lambda(cfg, 20))
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    opt2.step()
    sched2.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
