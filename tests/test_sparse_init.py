"""Sparse weight initialisation of the recipes: swi std against its formula, the modes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_chts.recipe_utils import init_sparse_weights_, swi_std


def _masked_linear(n_in, n_out, density, seed=0):
    layer = nn.Linear(n_in, n_out)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g) < density
    layer.register_buffer("weight_mask", mask)
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer


def test_swi_std_formula():
    # sqrt(2 / (density * N / W.shape[1])), N = n_out * n_in
    assert swi_std((1000, 784), 0.06) == pytest.approx(math.sqrt(2 / (0.06 * 1000 * 784 / 784)))
    assert swi_std((10, 20), 1.0) == pytest.approx(math.sqrt(2 / 10))
    with pytest.raises(ValueError, match="density"):
        swi_std((10, 20), 0.0)
    with pytest.raises(ValueError, match="shape"):
        swi_std((10,), 0.5)


def test_swi_std_on_a_large_layer():
    layer = _masked_linear(1000, 2000, 0.1)  # ~200k links
    init_sparse_weights_({"fc": layer}, "swi", generator=torch.Generator().manual_seed(1))
    mask = layer.weight_mask
    density = mask.float().mean().item()
    values = layer.weight[mask]
    expected = math.sqrt(2 / (density * 2000))
    assert abs(values.std().item() / expected - 1) < 0.02
    assert abs(values.mean().item()) < 0.02 * expected
    assert bool((layer.weight[~mask] == 0).all())


def test_modes_scaled_default_and_bad_name():
    layer = _masked_linear(50, 40, 0.25)
    before = layer.weight.detach().clone()
    init_sparse_weights_({"fc": layer}, "default")
    assert torch.equal(layer.weight, before)
    init_sparse_weights_({"fc": layer}, "scaled")
    density = layer.weight_mask.float().mean().item()
    torch.testing.assert_close(layer.weight.detach(), before / math.sqrt(density))
    with pytest.raises(ValueError, match="sparse_init.*'swi'"):
        init_sparse_weights_({"fc": layer}, "kaiming")


def test_cyclic_rewarmup_scales_and_restores_the_lr():
    from types import SimpleNamespace

    from hf_chts.recipe_utils import CyclicRewarmup

    callback = CyclicRewarmup(every=20, steps=2)
    assert [callback.factor(s) for s in (0, 1, 2, 19, 20, 21, 22, 239)] == [0, 0.5, 1, 1, 0, 0.5, 1, 1]
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    lrs = []
    for step in (20, 21, 22):
        state = SimpleNamespace(global_step=step)
        callback.on_pre_optimizer_step(None, state, None, optimizer=optimizer)
        lrs.append(optimizer.param_groups[0]["lr"])
        callback.on_optimizer_step(None, state, None, optimizer=optimizer)
        assert optimizer.param_groups[0]["lr"] == 0.1
    assert lrs == [0.0, 0.05, 0.1]
    with pytest.raises(ValueError, match="steps"):
        CyclicRewarmup(every=10, steps=10)


def test_research_rewarmup_is_at_most_a_tenth_of_the_cycle():
    from hf_chts.recipe_utils import CyclicRewarmup

    assert [(c.every, c.steps) for c in map(CyclicRewarmup.research, (100, 1000, 20, 10))] == [
        (100, 10),
        (1000, 10),
        (20, 2),
        (10, 1),
    ]
    assert CyclicRewarmup.research(100, steps=5).steps == 5
    assert CyclicRewarmup.research(9) is None and CyclicRewarmup.research(100, steps=0) is None
    with pytest.raises(ValueError, match="every"):
        CyclicRewarmup.research(0)
