"""Tests of hf_chts.topology.removal: exact counts, hard top scores, soft sampling and temperatures."""

from __future__ import annotations

import pytest
import torch

from hf_chts.topology.removal import remove_links


def _random_mask_and_scores(seed: int, shape=(40, 30), density=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    scores = torch.rand(shape, generator=g) * mask
    return mask, scores


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("n_remove", [0, 1, 17, 100])
def test_exact_count_and_subset(mode, n_remove):
    mask, scores = _random_mask_and_scores(0)
    nnz = int(mask.sum())
    new = remove_links(mask, scores, n_remove, mode=mode, generator=torch.Generator().manual_seed(1))
    assert new.dtype == torch.bool and new.shape == mask.shape
    assert int(new.sum()) == nnz - n_remove
    assert not bool((new & ~mask).any())  # nothing outside the old mask


def test_remove_everything():
    mask, scores = _random_mask_and_scores(0)
    assert int(remove_links(mask, scores, int(mask.sum()), mode="soft").sum()) == 0


def test_hard_keeps_the_highest_scores():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scores = torch.tensor([[0.5, 0.1, 9.0], [0.9, 0.3, 0.7]])  # 9.0 sits on a non-link: ignored
    new = remove_links(mask, scores, 2)
    assert new.tolist() == [[True, False, False], [True, False, True]]


def test_scores_outside_the_mask_are_ignored():
    mask = torch.tensor([[True, False], [False, True]])
    scores = torch.tensor([[1.0, float("nan")], [-5.0, 2.0]])
    assert remove_links(mask, scores, 1).tolist() == [[False, False], [False, True]]
    assert remove_links(mask, scores, 1, mode="soft").sum() == 1


def test_soft_high_temperature_equals_hard():
    mask = torch.ones(4, 8, dtype=torch.bool)
    scores = 2.0 ** torch.arange(32, dtype=torch.float32).view(4, 8)  # ratios of 2 between neighbours
    hard = remove_links(mask, scores, 10)
    for seed in range(20):
        soft = remove_links(
            mask, scores, 10, mode="soft", temperature=60.0, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(soft, hard)


def test_soft_low_temperature_is_random():
    mask, scores = _random_mask_and_scores(0)
    kept = {
        tuple(
            remove_links(mask, scores, 50, mode="soft", generator=torch.Generator().manual_seed(s))
            .flatten()
            .tolist()
        )
        for s in range(5)
    }
    assert len(kept) == 5


def test_soft_temperature_nine_on_tiny_weights():
    mask = torch.ones(20, 50, dtype=torch.bool)
    base = torch.rand(20, 50, generator=torch.Generator().manual_seed(0)) + 0.5
    tiny = base * 1e-3  # tiny ** 9 underflows float32 to 0 everywhere
    assert float((tiny**9).max()) < 1e-25
    kept_tiny = remove_links(
        mask, tiny, 500, mode="soft", temperature=9.0, generator=torch.Generator().manual_seed(3)
    )
    kept_base = remove_links(
        mask, base, 500, mode="soft", temperature=9.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(kept_tiny, kept_base)  # the scale does not change the draw
    # Not a uniform fallback: the kept links are strongly the large ones.
    assert float(base[kept_tiny].mean()) > float(base[~kept_tiny].mean()) + 0.2


def test_soft_removes_zero_scored_links_first():
    mask = torch.ones(3, 4, dtype=torch.bool)
    scores = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 0.5]])
    for seed in range(10):
        new = remove_links(mask, scores, 4, mode="soft", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(new, scores > 0)


def test_hard_zero_scored_ties_are_kept_uniformly():
    mask = torch.ones(1, 6, dtype=torch.bool)
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    counts = torch.zeros(6)
    for seed in range(400):
        counts += remove_links(mask, scores, 3, generator=torch.Generator().manual_seed(seed))[0]
    assert counts[0] == 400 and counts[5] == 400
    assert all(60 < c < 140 for c in counts[1:5].tolist())  # 100 expected each


def test_bad_inputs():
    mask, scores = _random_mask_and_scores(0)
    nnz = int(mask.sum())
    with pytest.raises(ValueError, match=f"at most {nnz}"):
        remove_links(mask, scores, nnz + 1)
    with pytest.raises(ValueError, match="n_remove"):
        remove_links(mask, scores, -1)
    with pytest.raises(ValueError, match="shape"):
        remove_links(mask, scores.T, 1)
    with pytest.raises(ValueError, match="'hard', 'soft'"):
        remove_links(mask, scores, 1, mode="gumbel")
    with pytest.raises(ValueError, match="non-negative"):
        remove_links(mask, -scores - 1, 1)
    with pytest.raises(ValueError, match="2-D"):
        remove_links(mask.flatten(), scores.flatten(), 1)
