"""Tests of hf_chts.sparsify: a run's sparse layers and the masks it starts with."""

from __future__ import annotations

import logging

import torch
from torch import nn

from hf_chts.config import SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.masking import MASK_NAME, is_masked, layer_view_shape, remask_every_step
from hf_chts.sparsify import run_modules, sparsify_, start_masks_

CONFIG = SparseTrainingConfig(method="set", density=0.25, update_interval=2)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleList([nn.Linear(16, 8), nn.Linear(8, 4)]))


def _engine(modules):
    return TopologyEngine(CONFIG, {n: layer_view_shape(m) for n, m in modules.items()}, max_steps=10)


def test_run_modules_selects_or_keeps_the_carried_layers():
    model = _model()
    modules, carried = run_modules(model, CONFIG)
    assert not carried and list(modules) == ["0.0", "0.1"] and not any(is_masked(m) for m in modules.values())
    model[0][1].register_buffer(MASK_NAME, torch.ones(4, 8, dtype=torch.bool))  # e.g. loaded into nn.Linear
    modules, carried = run_modules(model, CONFIG)
    assert carried and list(modules) == ["0.1"] and is_masked(modules["0.1"])


def test_start_masks_draws_the_schedule_and_zeroes_masked_weights():
    model = _model()
    modules, carried = run_modules(model, CONFIG)
    engine = _engine(modules)
    density = start_masks_(model, modules, engine, carried=carried)
    expected = engine.init_masks()
    for name, module in modules.items():
        assert torch.equal(module.weight_mask, expected[name])
        assert torch.all(module.weight[~module.weight_mask] == 0.0)
    links = sum(int(m.weight_mask.sum()) for m in modules.values())
    assert density == links / (16 * 8 + 8 * 4)


def test_carried_masks_off_the_schedule_are_redrawn_only_at_step_0(caplog):
    model = _model()
    modules = sparsify_(model, SparseTrainingConfig(method="set", density=0.5))
    engine = _engine(modules)
    before = {n: m.weight_mask.clone() for n, m in modules.items()}
    start_masks_(model, modules, engine, carried=True, fresh=False)  # resuming: the model's masks stay
    assert all(torch.equal(m.weight_mask, before[n]) for n, m in modules.items())
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        start_masks_(model, modules, engine, carried=True, fresh=True)
    assert "do not fit the step-0 schedule" in caplog.text
    assert all(int(m.weight_mask.sum()) == engine.target_nnz(n, 0) for n, m in modules.items())


def test_remask_every_step_follows_the_mode_and_the_optimizer():
    params = [nn.Parameter(torch.zeros(2))]

    class Mixing(torch.optim.SGD):  # unknown to hf_chts: it may move masked weights
        pass

    assert remask_every_step("every_step", torch.optim.AdamW(params))
    assert not remask_every_step("update_steps", Mixing(params, lr=0.1))
    assert not remask_every_step("auto", torch.optim.AdamW(params))
    assert remask_every_step("auto", Mixing(params, lr=0.1)) and remask_every_step("auto", None)
