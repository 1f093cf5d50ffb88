"""CSTI: top-|corr| links on hand-built inputs, the 2 x 2 tiling, exact counts, bad input, the engine path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_chts.config import SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.topology.csti import abs_correlation, csti_scores
from hf_chts.topology.init import init_mask


def _hand_built_inputs():
    """Four features: f1 = 2 f0 (|corr| 1), f2 = -f0 + noise (|corr| high), f3 constant."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, generator=g, dtype=torch.float64)
    noise = torch.randn(500, generator=g, dtype=torch.float64)
    return torch.stack([base, 2 * base, -base + 0.5 * noise, torch.full_like(base, 3.0)], 1)


def test_correlation_matches_numpy_and_constant_feature_is_zero():
    x = _hand_built_inputs()
    corr = abs_correlation(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.abs(np.corrcoef(x.numpy().T))
    expected[np.isnan(expected)] = 0
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-6)
    assert torch.isfinite(corr).all() and corr[3].eq(0).all() and corr[:, 3].eq(0).all()


def test_picks_the_top_correlations():
    x = _hand_built_inputs()
    # |corr|: (0,1) = (1,0) = 1, (0,2), (1,2) ~0.89 and their mirrors; everything else 0.
    mask = init_mask((4, 4), 2 / 16, "csti", inputs=x, generator=torch.Generator().manual_seed(0))
    assert mask.nonzero().tolist() == [[0, 1], [1, 0]]
    mask = init_mask((4, 4), 6 / 16, "csti", inputs=x, generator=torch.Generator().manual_seed(0))
    assert sorted(map(tuple, mask.nonzero().tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


def test_tiling_for_other_shapes_and_exact_counts():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    corr = abs_correlation(x)
    scores = csti_scores((10, 7), x)
    tiled = torch.cat([torch.cat([corr, corr], 1), torch.cat([corr, corr], 1)], 0)
    torch.testing.assert_close(scores, tiled[:10, :7])
    for shape, density in [((10, 7), 0.3), ((12, 12), 0.01), ((3, 11), 1.0), ((10, 7), 0.6)]:
        mask = init_mask(shape, density, "csti", inputs=x, generator=torch.Generator().manual_seed(2))
        assert mask.dtype == torch.bool and mask.shape == shape
        assert int(mask.sum()) == round(density * shape[0] * shape[1])
        # every kept score is >= every dropped one
        s = csti_scores(shape, x)
        if 0 < int(mask.sum()) < mask.numel():
            assert s[mask].min() >= s[~mask].max()


def test_bad_inputs_name_the_fix():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="needs calibration inputs.*inputs=X"):
        init_mask((4, 4), 0.5, "csti")
    with pytest.raises(ValueError, match=r"cannot cover a layer of shape \(9, 4\).*at least 5 features"):
        init_mask((9, 4), 0.5, "csti", inputs=x)
    with pytest.raises(ValueError, match="2-D"):
        init_mask((4, 4), 0.5, "csti", inputs=torch.randn(50))
    with pytest.raises(ValueError, match="NaN"):
        init_mask((4, 4), 0.5, "csti", inputs=torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match="'r'"):
        init_mask((4, 4), 0.5, "csti", inputs=x, r=0.3)


def test_engine_and_config_path(tmp_path):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    shapes = {"a": (12, 8), "b": (12, 12)}
    cfg = SparseTrainingConfig(method="chts", init="csti", density=0.2)
    with pytest.raises(ValueError, match="needs calibration inputs"):
        TopologyEngine(cfg, shapes).init_masks()
    masks = TopologyEngine(cfg, shapes, csti_inputs=x).init_masks()
    for name, mask in masks.items():
        assert int(mask.sum()) == round(0.2 * mask.numel())
        expected = init_mask(shapes[name], 0.2, "csti", inputs=x, generator=torch.Generator().manual_seed(9))
        scores = csti_scores(shapes[name], x)
        assert scores[mask].sum().item() == pytest.approx(scores[expected].sum().item(), rel=1e-6)
    torch.save(x, tmp_path / "calib.pt")
    from_file = TopologyEngine(
        SparseTrainingConfig(method="chts", init="csti", density=0.2, csti_inputs=str(tmp_path / "calib.pt")),
        shapes,
    ).init_masks()
    assert all(torch.equal(from_file[n], masks[n]) for n in masks)
