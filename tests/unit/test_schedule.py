"""The learning-rate schedule: linear warmup, then cosine or linear decay to min_lr."""

import pytest
from omegaconf import OmegaConf

from orchestrator.train.trainer import lr_at


def optim(schedule):
    return OmegaConf.create({"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "schedule": schedule})


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay_to_min_lr(schedule):
    o = optim(schedule)
    assert lr_at(1, o, 110) == pytest.approx(0.1)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)  # halfway: both schedules pass the midpoint
    assert lr_at(110, o, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_after_warmup():
    assert lr_at(50, optim("constant"), 110) == 1.0
