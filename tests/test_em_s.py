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
