"""Tests of hf_chts.rewarmup: the re-warmup factor and the one-step learning-rate scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_chts.rewarmup import LearningRateScale, rewarmup_factor


def test_factor_rises_over_the_steps_after_an_update():
    assert [rewarmup_factor(s, 100, 3) for s in range(99, 106)] == [1.0, 1.0, 0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize(("last_update", "steps"), [(0, 3), (-1, 3), (100, 0)])
def test_factor_is_one_before_any_update_or_without_rewarmup(last_update, steps):
    assert all(rewarmup_factor(s, last_update, steps) == 1.0 for s in range(0, 200))


def _optimizer():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    return torch.optim.SGD([{"params": params[:1], "lr": 0.1}, {"params": params[1:], "lr": 0.4}])


def test_scale_and_restore_every_param_group():
    optimizer, scale = _optimizer(), LearningRateScale()
    scale.scale_(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.025, 0.1] and scale.active
    scale.restore_(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.4] and not scale.active


def test_factor_one_and_no_optimizer_change_nothing():
    optimizer, scale = _optimizer(), LearningRateScale()
    scale.scale_(optimizer, 1.0)
    scale.scale_(None, 0.5)
    assert not scale.active and [g["lr"] for g in optimizer.param_groups] == [0.1, 0.4]
    scale.restore_(optimizer)  # nothing saved: nothing to restore
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.4]


def test_scaling_twice_never_compounds():
    optimizer, scale = _optimizer(), LearningRateScale()
    scale.scale_(optimizer, 0.5)
    scale.scale_(optimizer, 0.5)  # e.g. a restore that never came: starts from the scheduler's value again
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.2]
    scale.restore_(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.4]
