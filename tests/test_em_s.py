"""EM_S density schedule: the schedule alone, then the density trajectory of a layer update by update."""

from __future__ import annotations

import pytest
import torch

from hf_chts.config import SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.topology.schedules import EMSDensity, make_density_schedule


def test_schedule_phases():
    s = EMSDensity(0.1, t_end=150, update_interval=10)
    assert s.last_update == 150
    expected = {0: 0.15, 10: 0.15, 90: 0.15, 100: 0.125, 140: 0.125, 150: 0.1, 160: 0.1}
    for step, density in expected.items():
        assert s(step) == pytest.approx(density, abs=1e-12), step
    assert [s.regrows(t) for t in (0, 90, 140, 150, 200)] == [True, True, True, False, False]
    # t_end not a multiple of the interval: the final prune is the last update before t_end
    s = EMSDensity(0.1, t_end=155, update_interval=10)
    assert s.last_update == 150 and s(140) == pytest.approx(0.125) and s(150) == pytest.approx(0.1)
    assert make_density_schedule("em_s", 0.1, t_end=150, update_interval=10) == EMSDensity(0.1, 150, 10)


def test_schedule_and_config_refuse_bad_values():
    with pytest.raises(ValueError, match=r"density=0\.97.*lower `density`"):
        EMSDensity(0.97, t_end=100)
    with pytest.raises(ValueError, match=r"<= 0\.95, got 0\.96.*density_schedule='constant'"):
        SparseTrainingConfig(method="set", density=0.96, density_schedule="em_s")
    with pytest.raises(ValueError, match="needs `t_end`"):
        make_density_schedule("em_s", 0.1)
    with pytest.raises(ValueError, match="initial_density"):
        SparseTrainingConfig(method="set", density=0.1, initial_density=0.5, density_schedule="em_s")
    SparseTrainingConfig(method="set", density=0.95, density_schedule="em_s")  # the largest allowed


@pytest.mark.parametrize("method", ["set", "chts"])
def test_density_trajectory_step_by_step(method):
    shape = (40, 50)  # 2000 positions: +0.05 = 100 links, +0.025 = 50 links
    cfg = SparseTrainingConfig(
        method=method, density=0.1, density_schedule="em_s", update_interval=10, chain_removal=False
    )
    engine = TopologyEngine(cfg, {"fc": shape}, max_steps=200)
    assert engine.t_end == 150 and engine.last_update == 150
    masks = engine.init_masks()
    assert int(masks["fc"].sum()) == 300  # starts at 0.1 + 0.05
    g = torch.Generator().manual_seed(0)
    expected = {**dict.fromkeys(range(10, 91, 10), (100, 100, 300))}  # (removed, regrown, nnz after)
    expected[100] = (100, 50, 250)  # first update of the second phase: remove 0.05, regrow 0.025
    expected.update(dict.fromkeys(range(110, 141, 10), (50, 50, 250)))
    expected[150] = (50, 0, 200)  # the final prune: exactly the target density, nothing regrown
    seen = []
    for step in range(1, 201):
        if not engine.should_update(step):
            continue
        weights = {"fc": torch.randn(shape, generator=g) * masks["fc"]}
        new, grown, stats = engine.step(step, masks, weights)
        layer = stats.layers["fc"]
        assert (layer.removed, layer.regrown, int(new["fc"].sum())) == expected[step], step
        assert not (grown["fc"] & ~new["fc"]).any()
        masks = new
        seen.append(step)
    assert seen == sorted(expected)  # no update after the final prune
    assert int(masks["fc"].sum()) == 200


def test_final_prune_keeps_the_strongest_links():
    shape = (20, 20)
    cfg = SparseTrainingConfig(
        method="set", density=0.1, density_schedule="em_s", update_interval=10, chain_removal=False
    )
    engine = TopologyEngine(cfg, {"fc": shape}, max_steps=20)  # t_end 15: the update at 10 is the last
    mask = engine.init_masks()["fc"]
    weights = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * mask
    new, _, _ = engine.step(10, {"fc": mask}, {"fc": weights})
    strongest = weights.flatten().topk(40).indices
    assert int(new["fc"].sum()) == 40 and bool(new["fc"].flatten()[strongest].all())


@pytest.mark.parametrize("n_out2", [30, 10])
def test_final_prune_with_chain_removal_ends_at_exactly_the_target(n_out2):
    # fc1 (30 x 20) -> fc2 (n_out2 x 30): the final prune empties the rows of 6 hidden neurons of fc1 (their
    # links are the weakest), so chain removal also clears their columns of fc2 (and, with n_out2 = 10, the
    # prune of the small fc2 leaves many more hidden neurons without an outgoing link). The layers must still
    # end at exactly the target link count, keeping only links they had.
    from hf_chts.topology.percolation import LayerChain, chain_removal

    shapes = {"fc1": (30, 20), "fc2": (n_out2, 30)}
    cfg = SparseTrainingConfig(
        method="set", density=0.1, density_schedule="em_s", update_interval=10, chain_removal=True
    )
    engine = TopologyEngine(cfg, shapes, chains=[LayerChain(["fc1", "fc2"])], max_steps=20)
    assert engine.density_schedule.last_update == 10  # t_end 15: the update at 10 is the final prune
    masks = engine.init_masks()
    g = torch.Generator().manual_seed(3)
    weights = {name: (torch.rand(shape, generator=g) + 1.0) * masks[name] for name, shape in shapes.items()}
    alive = masks["fc1"].any(1) & masks["fc2"].any(0)
    hidden = alive.nonzero().flatten()[:6]
    assert len(hidden) == 6
    weights["fc1"][hidden] *= 1e-3  # these hidden neurons lose every incoming link to the magnitude prune
    weights["fc2"][:, hidden] *= 10.0  # ... while their outgoing links are the strongest of fc2
    new, grown, stats = engine.step(10, masks, weights)
    for name, shape in shapes.items():
        layer = stats.layers[name]
        assert int(new[name].sum()) == layer.nnz == layer.target_nnz == round(0.1 * shape[0] * shape[1])
        assert layer.nnz_before - layer.removed - layer.chain_removed + layer.regrown == layer.nnz
        assert min(layer.removed, layer.chain_removed) >= 0
        assert layer.regrown == 0 and not grown[name].any()  # the final prune grows nothing new ...
        assert not (new[name] & ~masks[name]).any()  # ... it only keeps links the layer already had
    assert stats.layers["fc1"].chain_removed > 0  # the case under test happened
    if n_out2 == 30:
        # enough removed links between active neurons: those come back, and no link is left on an
        # inactive neuron (chain removal finds nothing more to remove)
        assert not new["fc1"][hidden].any() and not new["fc2"][:, hidden].any()
        again, _ = chain_removal(dict(new), LayerChain(["fc1", "fc2"]))
        assert all(torch.equal(again[name], new[name]) for name in shapes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_final_prune_with_chain_removal_is_identical_on_cpu_and_cuda():
    from hf_chts.topology.percolation import LayerChain

    shapes = {"fc1": (30, 20), "fc2": (10, 30)}
    cfg = SparseTrainingConfig(
        method="set", density=0.1, density_schedule="em_s", update_interval=10, chain_removal=True
    )
    engine = TopologyEngine(cfg, shapes, chains=[LayerChain(["fc1", "fc2"])], max_steps=20)
    masks = engine.init_masks()
    g = torch.Generator().manual_seed(3)
    weights = {name: torch.rand(shape, generator=g) * masks[name] for name, shape in shapes.items()}
    cpu, _, cpu_stats = engine.step(10, masks, weights)
    on = {name: m.cuda() for name, m in masks.items()}
    cuda, _, _ = engine.step(10, on, {name: w.cuda() for name, w in weights.items()})
    assert any(layer.chain_removed for layer in cpu_stats.layers.values())  # links were kept back
    for name in shapes:
        assert cuda[name].device.type == "cuda" and torch.equal(cuda[name].cpu(), cpu[name]), name
