"""Tests of hf_chts.topology.regrowth: candidates only, exact counts, RigL, CH and the zero-score fill."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_chts.topology.regrowth import regrow_links


def _mask(seed: int = 0, shape=(30, 40), density=0.3) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def _has_ch_scores() -> bool:
    if importlib.util.find_spec("hf_chts.topology.link_prediction") is None:
        return False
    from hf_chts.topology import link_prediction

    return hasattr(link_prediction, "ch_scores")


needs_ch = pytest.mark.skipif(
    not _has_ch_scores(), reason="hf_chts.topology.link_prediction.ch_scores missing"
)

CASES = [
    {"method": "random"},
    {"method": "gradient", "mode": "hard"},
    {"method": "gradient", "mode": "soft"},
    {"method": "ch", "mode": "hard", "scores": "given"},
    {"method": "ch", "mode": "soft", "scores": "given"},
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n_grow", [0, 1, 50, 840])  # 840 = every empty position of the 30x40 mask
def test_exact_count_and_never_on_existing_links(case, n_grow):
    mask = _mask()
    n_empty = int((~mask).sum())
    n_grow = min(n_grow, n_empty)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(case)
    # Large scores and gradients on the existing links: they must still never be chosen.
    big_on_links = torch.rand(mask.shape, generator=g) + 100.0 * mask
    if kwargs.get("scores") == "given":
        kwargs["scores"] = big_on_links
    if kwargs["method"] == "gradient":
        kwargs["grad"] = -big_on_links
    new_mask, grown = regrow_links(mask, n_grow, generator=g, **kwargs)
    assert grown.dtype == torch.bool and new_mask.dtype == torch.bool
    assert int(grown.sum()) == n_grow
    assert not bool((grown & mask).any())
    assert torch.equal(new_mask, mask | grown)
    assert int(new_mask.sum()) == int(mask.sum()) + n_grow


def test_rigl_picks_largest_gradient_magnitudes():
    mask = torch.tensor([[True, False, False], [False, True, False]])
    grad = torch.tensor([[99.0, -0.5, 3.0], [-4.0, 50.0, 0.1]])
    new_mask, grown = regrow_links(mask, 2, method="gradient", grad=grad)
    assert grown.tolist() == [[False, False, True], [True, False, False]]
    assert new_mask.tolist() == [[True, False, True], [True, True, False]]


def test_ch_hard_picks_top_scores():
    mask = torch.tensor([[True, False, False, False], [False, False, True, False]])
    scores = torch.tensor([[9.0, 0.2, 0.7, 0.1], [0.3, 0.6, 9.0, 0.9]])
    _, grown = regrow_links(mask, 3, method="ch", mode="hard", scores=scores)
    assert grown.tolist() == [[False, False, True, False], [False, True, False, True]]


def test_ch_soft_samples_proportionally_to_score():
    mask = torch.tensor([[True, False, False, False]])
    scores = torch.tensor([[5.0, 1.0, 3.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts += regrow_links(mask, 1, method="ch", mode="soft", scores=scores, generator=g)[1][0]
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[1].item() / n - 0.25) < 0.03 and abs(counts[2].item() / n - 0.75) < 0.03


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_zero_score_fill_is_uniform_among_candidates(mode):
    mask = torch.tensor([[True, False, False], [False, False, True]])
    scores = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # one positive candidate: (0, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 3)
    n = 3000
    for _ in range(n):
        _, grown = regrow_links(mask, 2, method="ch", mode=mode, scores=scores, generator=g)
        assert grown[0, 1]
        counts += grown
    fill = counts[~mask & (scores == 0)]  # (0, 2), (1, 0), (1, 1): n / 3 each
    assert counts[mask].sum() == 0
    assert all(abs(c / n - 1 / 3) < 0.04 for c in fill.tolist())


def test_random_is_uniform_over_candidates():
    mask = torch.tensor([[True, False, False], [False, True, False]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 3)
    n = 3000
    for _ in range(n):
        counts += regrow_links(mask, 2, method="random", generator=g)[1]
    assert counts[mask].sum() == 0
    assert all(abs(c / n - 0.5) < 0.04 for c in counts[~mask].tolist())


def test_determinism_with_seed():
    mask = _mask()
    a = regrow_links(mask, 100, generator=torch.Generator().manual_seed(4))[1]
    b = regrow_links(mask, 100, generator=torch.Generator().manual_seed(4))[1]
    c = regrow_links(mask, 100, generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_float_mask_accepted():
    mask = _mask().float()
    new_mask, grown = regrow_links(mask, 10, generator=torch.Generator().manual_seed(0))
    assert new_mask.dtype == torch.bool and int(grown.sum()) == 10 and not bool((grown & mask.bool()).any())


@needs_ch
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_ch_scores_computed_from_the_mask(mode):
    from hf_chts.topology.link_prediction import ch_scores

    mask = _mask(1, shape=(12, 16), density=0.25)
    n_grow = 20
    g = torch.Generator().manual_seed(0)
    new_mask, grown = regrow_links(mask, n_grow, method="ch", mode=mode, generator=g)
    assert int(grown.sum()) == n_grow and not bool((grown & mask).any())
    if mode == "hard":
        scores = ch_scores(mask, variant="CH2_L3n")
        g2 = torch.Generator().manual_seed(0)
        assert torch.equal(grown, regrow_links(mask, n_grow, method="ch", scores=scores, generator=g2)[1])


def test_bad_inputs():
    mask = _mask()
    n_empty = int((~mask).sum())
    with pytest.raises(ValueError, match=f"at most {n_empty}"):
        regrow_links(mask, n_empty + 1)
    with pytest.raises(ValueError, match="grad="):
        regrow_links(mask, 1, method="gradient")
    with pytest.raises(ValueError, match="shape"):
        regrow_links(mask, 1, method="gradient", grad=torch.ones(3, 3))
    with pytest.raises(ValueError, match="shape"):
        regrow_links(mask, 1, method="ch", scores=torch.ones(3, 3))
    with pytest.raises(ValueError, match="no effect"):
        regrow_links(mask, 1, method="random", scores=torch.ones(mask.shape))
    with pytest.raises(ValueError, match="'random', 'gradient', 'ch'"):
        regrow_links(mask, 1, method="set")
    with pytest.raises(ValueError, match="'hard', 'soft'"):
        regrow_links(mask, 1, method="ch", mode="greedy", scores=torch.ones(mask.shape))
    with pytest.raises(ValueError, match="n_grow"):
        regrow_links(mask, -2)
    with pytest.raises(ValueError, match="non-negative"):
        regrow_links(mask, 1, method="ch", scores=-torch.ones(mask.shape))
