"""Tests of hf_chts.update: one topology update of a model's masked layers (one process)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from hf_chts.config import SparseTrainingConfig
from hf_chts.distributed import Collectives
from hf_chts.engine import TopologyEngine
from hf_chts.masking import layer_view_shape, set_grad_capture_
from hf_chts.sparsify import sparsify_
from hf_chts.stats import masks_density
from hf_chts.update import dense_gradients, topology_update


def _setup(method: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleList([nn.Linear(16, 12), nn.Linear(12, 8)]))
    config = SparseTrainingConfig(method=method, density=0.3, update_interval=1, zeta=0.3)
    modules = sparsify_(model, config)
    engine = TopologyEngine(config, {n: layer_view_shape(m) for n, m in modules.items()}, max_steps=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, modules, engine, optimizer


def _train_step(model, optimizer):
    layers = model[0]
    x = torch.randn(4, 16)
    layers[1](torch.relu(layers[0](x))).pow(2).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_update_keeps_counts_zeros_and_optimizer_state(method):
    model, modules, engine, optimizer = _setup(method)
    store: dict[str, torch.Tensor] = {}
    if engine.config.needs_dense_gradient:
        set_grad_capture_(modules, store)
    _train_step(model, optimizer)
    set_grad_capture_(modules, None)
    before = {n: m.weight_mask.clone() for n, m in modules.items()}
    result = topology_update(
        engine, modules, 1, collectives=Collectives(), optimizer=optimizer, captured=store
    )
    assert result.owned_layers == [n for group in engine.groups() for n in group]
    changed = False
    for name, module in modules.items():
        mask = module.weight_mask
        assert int(mask.sum()) == engine.target_nnz(name, 1)
        assert torch.all(module.weight[~mask] == 0.0)
        grown = mask & ~before[name]
        for value in optimizer.state[module.weight].values():
            if value.shape == mask.shape:
                assert torch.all(value[~mask | grown] == 0)
        changed |= not torch.equal(mask, before[name])
    assert changed  # the topology did evolve
    assert result.density == masks_density(m.weight_mask for m in modules.values())
    logs = result.log_dict("sparsity/", per_layer=True, seconds_total=7.0)
    assert logs["sparsity/update_step"] == 1.0 and logs["sparsity/update_seconds_total"] == 7.0
    assert logs["sparsity/density"] == result.density and logs["sparsity/update_seconds"] == result.seconds
    assert logs["sparsity/links_regrown"] == sum(s.regrown for s in result.stats.layers.values())
    assert "sparsity/0.1/turnover" in logs


def test_dense_gradients_fall_back_to_the_weight_gradient(caplog):
    model, modules, _, optimizer = _setup("rigl")
    _train_step(model, optimizer)
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        grads = dense_gradients(modules, {})
    assert "no dense gradient was captured" in caplog.text
    assert all(torch.equal(grads[n], m.weight.grad.float()) for n, m in modules.items())
    modules["0.0"].weight.grad = None
    assert torch.equal(dense_gradients(modules, {"0.1": grads["0.1"]})["0.0"], torch.zeros(12, 16))
