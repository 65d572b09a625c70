"""The learning-rate schedule: warm-up, then constant / linear / cosine decay to min_lr, stepped per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from dynamo_mega.config import OptimConfig
from dynamo_mega.lr_schedule import lr_factor
from dynamo_mega.optim import build_optimizer


def _lrs(decay: str, steps: int, **optim) -> list[float]:
    cfg = OptimConfig(lr=1e-3, lr_decay=decay, **optim)
    opt, sched = build_optimizer(torch.nn.Linear(2, 2), cfg.lr, cfg, total_steps=steps)
    lrs = []
    for _ in range(steps + 2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_constant_after_warmup():
    lrs = _lrs("constant", 10, warmup_steps=4)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == pytest.approx([1e-3] * 8)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_reaches_min_lr_at_the_last_step_and_stays(decay):
    lrs = _lrs(decay, 10, warmup_steps=2, min_lr=1e-4)
    assert lrs[2] == pytest.approx(1e-3)  # peak right after warm-up
    assert lrs[10] == pytest.approx(1e-4) and lrs[11] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay
    middle = 1e-4 + 0.9e-3 * (0.5 if decay == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[6] == pytest.approx(middle)


def test_unknown_decay_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="optim.lr_decay='step'"):
        lr_factor(0, warmup_steps=0, total_steps=10, decay="step", min_ratio=0.0)


def test_config_rejects_min_lr_above_lr():
    from dynamo_mega.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"optim.min_lr=0.001 must be in \[0, optim.lr=0.0001\]"):
        load_config(None, ["optim.lr=1e-4", "optim.min_lr=1e-3"])
    with pytest.raises(ConfigError, match=r"optim.lr_decay: Invalid value 'step', expected one of \[constant, linear, cosine\]"):
        load_config(None, ["optim.lr_decay=step"])
