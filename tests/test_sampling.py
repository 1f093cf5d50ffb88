"""Tests of hf_chts.topology.sampling: exact soft sampling, hard top-k, zero fill, scale and bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_chts.topology import sampling, topk
from hf_chts.topology.rows import row_positions
from hf_chts.topology.sampling import (
    sample_uniform,
    sample_without_replacement,
    select_indices,
    topk_indices,
)
from hf_chts.topology.topk import topk_rows

# Upper 0.9999 quantiles of the chi-square distribution, by degrees of freedom: with a fixed seed a
# correct sampler passes deterministically, a biased one fails by a wide margin.
CHI2_9999 = {2: 18.42, 3: 21.11, 5: 25.74, 9: 33.72}


def _exact_subset_probabilities(weights: list[float], k: int) -> dict[tuple[int, ...], float]:
    """P(the drawn set is S) for successive sampling without replacement, by enumerating ordered draws."""
    total = sum(weights)
    probs: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, total
        for i in order:
            p *= weights[i] / left
            left -= weights[i]
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + p
    return probs


def _chi2(counts: dict, expected: dict) -> float:
    return sum((counts.get(key, 0) - e) ** 2 / e for key, e in expected.items())


def _draw_sets(
    weights: torch.Tensor, k: int, n_draws: int, seed: int, **kwargs
) -> dict[tuple[int, ...], int]:
    g = torch.Generator().manual_seed(seed)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n_draws):
        key = tuple(sample_without_replacement(weights, k, generator=g, **kwargs).tolist())
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ soft sampling


def test_soft_sampling_matches_exact_pair_probabilities():
    weights = [1.0, 2.0, 3.0, 4.0, 10.0]
    exact = _exact_subset_probabilities(weights, 2)
    n = 6000
    counts = _draw_sets(torch.tensor(weights), 2, n, seed=0)
    assert set(counts) <= set(exact)
    assert _chi2(counts, {key: p * n for key, p in exact.items()}) < CHI2_9999[9]
    # Inclusion probabilities too (each a binomial): within 4.5 standard deviations.
    for i in range(5):
        p = sum(prob for key, prob in exact.items() if i in key)
        freq = sum(c for key, c in counts.items() if i in key) / n
        assert abs(freq - p) < 4.5 * (p * (1 - p) / n) ** 0.5


def test_soft_sampling_with_temperature_in_log_space():
    # 1e-6 ** 3 is 1e-18 and (1e-6) ** 9 underflows float32: the log-space keys must not care about the scale.
    base = [1.0, 1.5, 2.0, 3.0]
    exact = _exact_subset_probabilities([b**3 for b in base], 2)
    n = 6000
    counts = _draw_sets(torch.tensor(base) * 1e-6, 2, n, seed=1, temperature=3.0)
    assert _chi2(counts, {key: p * n for key, p in exact.items()}) < CHI2_9999[5]  # 6 pairs


def test_temperature_nine_on_tiny_weights_still_samples():
    weights = torch.tensor([1e-6, 2e-6])
    assert float((weights**9).max()) == 0.0  # the naive power underflows to all zeros
    g = torch.Generator().manual_seed(0)
    picks = [int(sample_without_replacement(weights, 1, temperature=9.0, generator=g)) for _ in range(3000)]
    # P(pick index 1) = 512 / 513; a uniform fallback would give 0.5.
    assert sum(picks) / len(picks) > 0.99


def test_scaling_weights_does_not_change_the_draw():
    weights = torch.rand(200, generator=torch.Generator().manual_seed(3)) + 0.1
    a = sample_without_replacement(weights, 50, temperature=9.0, generator=torch.Generator().manual_seed(7))
    b = sample_without_replacement(
        weights * 1e-4, 50, temperature=9.0, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a, b)


def test_zero_weights_never_win_while_positive_remain():
    weights = torch.zeros(1000)
    weights[[3, 500, 999]] = torch.tensor([1e-30, 5.0, 1.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert sample_without_replacement(weights, 3, generator=g).tolist() == [3, 500, 999]
        assert set(sample_without_replacement(weights, 2, generator=g).tolist()) <= {3, 500, 999}


def test_zero_fill_is_uniform_among_zero_weights():
    weights = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    n = 4000
    counts = _draw_sets(weights, 3, n, seed=0)
    filled = {}
    for key, c in counts.items():
        assert 0 in key and 5 in key
        (extra,) = set(key) - {0, 5}
        filled[extra] = filled.get(extra, 0) + c
    assert _chi2(filled, {i: n / 4 for i in (1, 2, 3, 4)}) < CHI2_9999[3]


def test_output_is_sorted_unique_and_exact_count():
    weights = torch.rand(37, 11, generator=torch.Generator().manual_seed(0))
    idx = sample_without_replacement(weights, 100, generator=torch.Generator().manual_seed(1))
    assert idx.dtype == torch.long and idx.shape == (100,)
    assert torch.equal(idx, idx.unique())  # unique() sorts
    assert int(idx.min()) >= 0 and int(idx.max()) < weights.numel()


def test_edge_counts():
    weights = torch.rand(10)
    assert sample_without_replacement(weights, 0).numel() == 0
    assert sample_without_replacement(weights, 10).tolist() == list(range(10))
    assert sample_without_replacement(torch.zeros(4), 4).tolist() == [0, 1, 2, 3]


def test_determinism_with_seed():
    weights = torch.rand(300_000, generator=torch.Generator().manual_seed(0))
    draw = [
        sample_without_replacement(weights, 123_456, generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])


def test_more_than_2_pow_24_entries():
    n = 2**24 + 1000
    weights = torch.zeros(n)
    hot = torch.tensor([0, 12345, 2**24 + 999])
    weights[hot] = torch.tensor([1.0, 2.0, 3.0])
    idx = sample_without_replacement(weights, 3, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == hot.tolist()
    weights.uniform_(0.5, 1.0, generator=torch.Generator().manual_seed(0))
    k = 200_000
    idx = sample_without_replacement(weights, k, generator=torch.Generator().manual_seed(0))
    assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all()) and int(idx[-1]) < n
    # Heavier entries are drawn more often: the kept half of the weights has a larger mean.
    assert float(weights[idx].mean()) > float(weights.mean())


def test_bracketed_selection_equals_full_sort():
    # Integer-valued keys with many ties exercise the band, the tie rule and the fallback.
    g = torch.Generator().manual_seed(0)
    for n, k, high in [
        (300_000, 90_000, 1000),
        (400_000, 399_000, 50),
        (300_000, 17, 3),
        (300_000, 150_000, 1),
    ]:
        values = torch.randint(0, high, (n,), generator=g).float()
        ref = torch.sort(-values, stable=True).indices[:k].sort().values  # ties: lowest index first
        assert torch.equal(topk_rows(values[None], [k])[0].nonzero().squeeze(1), ref)


def test_exclude_is_never_drawn():
    weights = torch.tensor([[100.0, 1.0], [0.0, 100.0]])
    exclude = torch.tensor([[True, False], [False, True]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_without_replacement(weights, 1, exclude=exclude, generator=g).tolist() == [1]
        assert sample_without_replacement(weights, 2, exclude=exclude, generator=g).tolist() == [1, 2]
    with pytest.raises(ValueError, match="k=3"):
        sample_without_replacement(weights, 3, exclude=exclude)


@pytest.mark.parametrize(
    "weights, k, kwargs, match",
    [
        (torch.tensor([1.0, float("nan")]), 1, {}, "NaN"),
        (torch.tensor([1.0, float("inf")]), 1, {}, "infinite"),
        (torch.tensor([1.0, -0.5]), 1, {}, "non-negative"),
        (torch.tensor([1.0, 2.0]), 3, {}, "k=3"),
        (torch.tensor([1.0, 2.0]), -1, {}, "`k`"),
        (torch.tensor([1.0, 2.0]), 1.5, {}, "`k`"),
        (torch.tensor([1.0, 2.0]), 1, {"exclude": torch.tensor([True])}, "exclude"),
        (torch.tensor([True, False]), 1, {}, "real tensor"),
        ([1.0, 2.0], 1, {}, "torch.Tensor"),
    ],
)
def test_sample_bad_inputs(weights, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_without_replacement(weights, k, **kwargs)


# ------------------------------------------------------------------------------------------ uniform sampling


def test_sample_uniform_among_candidates():
    candidates = torch.tensor([[True, False, True], [True, False, True]])
    g = torch.Generator().manual_seed(0)
    counts: dict[int, int] = {}
    n = 3000
    for _ in range(n):
        idx = sample_uniform(candidates, 2, generator=g).tolist()
        assert len(set(idx)) == 2 and set(idx) <= {0, 2, 3, 5}
        for i in idx:
            counts[i] = counts.get(i, 0) + 1
    assert _chi2(counts, {i: n / 2 for i in (0, 2, 3, 5)}) < CHI2_9999[3]
    assert sample_uniform(candidates, 4).tolist() == [0, 2, 3, 5]
    assert sample_uniform(candidates, 0).numel() == 0


def test_sample_uniform_bad_inputs():
    with pytest.raises(ValueError, match="boolean"):
        sample_uniform(torch.ones(3), 1)
    with pytest.raises(ValueError, match="at most 1"):
        sample_uniform(torch.tensor([True, False]), 2)


# ------------------------------------------------------------------------------------------ hard selection


def test_topk_indices_exact_and_tie_break():
    scores = torch.tensor([[1.0, 3.0, 3.0], [2.0, 3.0, -1.0]])
    assert topk_indices(scores, 2).tolist() == [1, 2]
    assert topk_indices(scores, 4).tolist() == [1, 2, 3, 4]
    assert topk_indices(scores, 0).tolist() == []
    assert topk_indices(torch.full((300_000,), 7.0), 5).tolist() == [0, 1, 2, 3, 4]


def test_topk_indices_matches_torch_topk_at_scale():
    values = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0))
    k = 300_000
    assert torch.equal(topk_indices(values, k), torch.topk(values, k).indices.sort().values)


def test_topk_indices_exclude_and_infinities():
    scores = torch.tensor([float("-inf"), 5.0, float("inf"), 1.0])
    exclude = torch.tensor([False, False, True, True])
    assert topk_indices(scores, 2, exclude=exclude).tolist() == [0, 1]
    assert topk_indices(scores, 1).tolist() == [2]
    with pytest.raises(ValueError, match="NaN"):
        topk_indices(torch.tensor([float("nan"), 1.0]), 1)
    with pytest.raises(ValueError, match="k=3"):
        topk_indices(scores, 3, exclude=exclude)


def test_select_indices_hard_is_deterministic_top_k():
    scores = torch.tensor([0.5, 0.0, 2.0, 1.0, 2.0])
    assert select_indices(scores, 2, mode="hard").tolist() == [2, 4]
    assert select_indices(scores, 3, mode="hard").tolist() == [2, 3, 4]


def test_select_indices_hard_zero_fill_is_uniform():
    scores = torch.tensor([0.0, 5.0, 0.0, 0.0, 1.0, 0.0])
    exclude = torch.tensor([False, False, False, False, False, True])  # index 5 is never a fill candidate
    g = torch.Generator().manual_seed(0)
    counts: dict[int, int] = {}
    n = 3000
    for _ in range(n):
        idx = select_indices(scores, 3, mode="hard", exclude=exclude, generator=g).tolist()
        assert 1 in idx and 4 in idx and 5 not in idx
        (extra,) = set(idx) - {1, 4}
        counts[extra] = counts.get(extra, 0) + 1
    assert _chi2(counts, {i: n / 3 for i in (0, 2, 3)}) < CHI2_9999[2]


def test_select_indices_soft_and_bad_mode():
    weights = torch.tensor([0.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    assert select_indices(weights, 2, mode="soft", generator=g).tolist() == [1, 2]
    with pytest.raises(ValueError, match="'hard', 'soft'"):
        select_indices(weights, 1, mode="top")
    with pytest.raises(ValueError, match="non-negative"):
        select_indices(torch.tensor([1.0, -1.0]), 1, mode="hard")


# ---------------------------------------------------------------------------- stacked selection (select_rows)


def _rows_as_indices(chosen: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().squeeze(1).tolist() for row in chosen]


@pytest.mark.parametrize("source", ["generators", "streams"])
def test_select_rows_chi_square_on_a_stack(source):
    # Every row of a stack is an independent exact draw: 6000 draws of a 3-row stack, one chi-square per row,
    # with torch generators and with counter-based streams (a fresh stream key per draw and row).
    from hf_chts.topology.rng import stream_key

    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0], [5.0, 1.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    n = 6000
    gens = [torch.Generator().manual_seed(100 + b) for b in range(3)]
    counts: list[dict] = [{}, {}, {}]
    for i in range(n):
        if source == "generators":
            chosen = sampling.select_rows(weights, [2, 2, 2], mode="soft", generators=gens)
        else:
            streams = [stream_key(0, i, b) for b in range(3)]
            chosen = sampling.select_rows(weights, [2, 2, 2], mode="soft", streams=streams)
        for b, idx in enumerate(_rows_as_indices(chosen)):
            counts[b][tuple(idx)] = counts[b].get(tuple(idx), 0) + 1
    for b in range(3):
        exact = _exact_subset_probabilities(weights[b].tolist(), 2)
        assert set(counts[b]) <= set(exact)
        assert _chi2(counts[b], {key: p * n for key, p in exact.items()}) < CHI2_9999[9]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_select_rows_with_streams_row_alone_equals_row_in_stack(mode):
    # A row's result depends only on the row and its stream key: alone, in any stack, in any position.
    from hf_chts.topology.rng import stream_key

    g = torch.Generator().manual_seed(3)
    for n in (40, 300_000):
        scores = torch.rand(4, n, generator=g) ** 2
        scores[1, : n // 2] = 0.0  # the zero fill
        exclude = torch.rand(4, n, generator=g) < 0.2
        ks, lengths = [n // 4, n // 3, 1, 0], [n, n - 3, n // 2, n]
        streams = [stream_key(1, "row", b) for b in range(4)]
        kw = dict(mode=mode, temperature=3.0)
        stacked = sampling.select_rows(scores, ks, exclude=exclude, lengths=lengths, streams=streams, **kw)
        order = [2, 0, 3, 1]
        shuffled = sampling.select_rows(
            scores[order],
            [ks[b] for b in order],
            exclude=exclude[order],
            lengths=[lengths[b] for b in order],
            streams=[streams[b] for b in order],
            **kw,
        )
        for j, b in enumerate(order):
            alone = sampling.select_rows(
                scores[b : b + 1],
                [ks[b]],
                exclude=exclude[b : b + 1],
                lengths=[lengths[b]],
                streams=[streams[b]],
                **kw,
            )
            assert torch.equal(alone[0], stacked[b]) and torch.equal(shuffled[j], stacked[b])
            assert int(stacked[b].sum()) == ks[b] and not (stacked[b] & exclude[b]).any()


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_select_rows_overwrite_selects_the_same(mode):
    # overwrite=True computes the keys in the scores' memory: the same selection, and the input is spent.
    from hf_chts.topology.rng import stream_key

    g = torch.Generator().manual_seed(5)
    scores = torch.rand(3, 400, generator=g) ** 2
    scores[1, :300] = 0.0  # the zero fill
    exclude = torch.rand(3, 400, generator=g) < 0.2
    streams = [stream_key(2, "overwrite", b) for b in range(3)]
    for excl, ks, whole in ((exclude, [100, 150, 0], False), (None, [100, 90, 120], True)):
        kw = dict(mode=mode, temperature=2.0, exclude=excl, streams=streams)
        kept = scores.clone()
        expected = sampling.select_rows(kept, ks, **kw)
        assert torch.equal(kept, scores)  # by default the scores are left alone
        spent = scores.clone()
        assert torch.equal(sampling.select_rows(spent, ks, overwrite=True, **kw), expected)
        if whole and mode == "soft":
            assert not torch.equal(spent, scores)
        for source in (scores.double(), scores.to(torch.bfloat16)):
            assert torch.equal(
                sampling.select_rows(source, ks, overwrite=True, **kw), sampling.select_rows(source, ks, **kw)
            )


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_select_rows_equals_select_indices_row_by_row(mode):
    # Row b of a stack is exactly select_indices on row b alone, with the same generator: ragged lengths,
    # exclusions, the zero fill, k = 0 and k = all, small rows (kthvalue) and long ones (bracket).
    g = torch.Generator().manual_seed(0)
    for n in (50, 300_000):
        rows = 5
        scores = torch.rand(rows, n, generator=g) ** 3
        scores[1, : n // 2] = 0.0  # scarce positive scores: the zero fill
        scores[2] = torch.round(scores[2] * 4) / 4  # heavy ties
        exclude = torch.rand(rows, n, generator=g) < 0.3
        lengths = [n, n - 7, n, n // 3, n]
        ks = [n // 5, (n - 7) // 2 + 3, 0, n // 6, 1]
        for excl in (None, exclude) if n < 1000 else (exclude,):
            seeds = [7, 8, 9, 10, 11]
            chosen = sampling.select_rows(
                scores,
                ks,
                mode=mode,
                temperature=2.0,
                exclude=excl,
                lengths=lengths,
                generators=[torch.Generator().manual_seed(s) for s in seeds],
            )
            for b in range(rows):
                length = lengths[b]
                ref = select_indices(
                    scores[b, :length],
                    ks[b],
                    mode=mode,
                    temperature=2.0,
                    exclude=None if excl is None else excl[b, :length],
                    generator=torch.Generator().manual_seed(seeds[b]),
                )
                got = chosen[b].nonzero().squeeze(1)
                assert torch.equal(got, ref), (n, b, excl is None)
                assert not chosen[b, length:].any()


def test_select_rows_uniform_when_scores_are_none():
    exclude = torch.tensor([[True, False, False, True], [False, False, False, False]])
    chosen = sampling.select_rows(None, [2, 4], exclude=exclude, shape=(2, 4), device="cpu")
    assert torch.equal(chosen[0], ~exclude[0]) and bool(chosen[1].all())


@pytest.mark.parametrize(
    "scores, k, kwargs, match",
    [
        (torch.ones(2, 3), [1], {}, "one per row"),
        (torch.ones(2, 3), [4, 1], {}, "lower `k`"),
        (torch.tensor([[1.0, float("nan"), 1.0]]), [1], {}, "NaN"),
        (torch.tensor([[1.0, -1.0, 1.0]]), [1], {}, "non-negative"),
        (torch.ones(3), [1], {}, "2-D"),
        (torch.ones(2, 3), [1, 1], {"mode": "top"}, "mode"),
        (torch.ones(2, 3), [1, 1], {"exclude": torch.ones(3, dtype=torch.bool)}, "exclude"),
        (None, [1], {}, "shape"),
    ],
)
def test_select_rows_bad_inputs(scores, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.select_rows(scores, k, **kwargs)


def test_kth_largest_by_topk_equals_kthvalue_with_ties():
    # The GPU path (topk) and the CPU path (kthvalue) give the same k-th value, ties included.
    from hf_chts.topology.topk import _kth_largest, _row_ranks

    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 7, (5, 301), generator=g).float()  # heavy ties
    for k in (1, 2, 150, 151, 300, 301):
        assert torch.equal(_kth_largest(values, k, by_topk=True), _kth_largest(values, k, by_topk=False)), k
    flags = torch.rand(4, 1000, generator=g) < 0.3
    assert torch.equal(_row_ranks(flags), flags.cumsum(dim=1, dtype=torch.int32))


def test_sortable_orders_negative_zero_as_zero():
    # An exponential variate of 0 can be -0.0; it must sort as the smallest key, not overflow.
    from hf_chts.topology.init import _sortable

    keys = torch.tensor([0.5, -0.0, 0.25, 2.0])
    order = torch.sort(_sortable(keys, torch.arange(4), smallest=True, signed=False), descending=True)
    assert order.indices.tolist() == [1, 2, 0, 3]


def test_row_positions_are_each_rows_links_in_order():
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(4, 500, generator=g) < torch.tensor([[0.3], [0.01], [0.0], [0.9]])
    counts = [int(row.sum()) for row in mask]
    got = row_positions(mask, counts, fill=-7)
    assert got.shape == (4, max(counts)) and got.dtype == torch.long
    for b, row in enumerate(mask):
        assert got[b, : counts[b]].tolist() == (row.nonzero().squeeze(1) + b * 500).tolist()
        assert bool((got[b, counts[b] :] == -7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sample_order_statistics_match_a_sort(dtype):
    g = torch.Generator().manual_seed(6)
    sample = torch.randn(3, 1000, generator=g).round(decimals=1).to(dtype)  # ties
    sample[1, ::3] = -float("inf")
    hi_pos, lo_pos = [0, 10, 998], [999, 500, 999]
    hi, lo = topk._descending_order_stats(sample, hi_pos, lo_pos)
    ordered = torch.sort(sample, dim=1, descending=True).values
    assert torch.equal(hi[:, 0], ordered[torch.arange(3), hi_pos])
    assert torch.equal(lo[:, 0], ordered[torch.arange(3), lo_pos])
    assert hi.dtype == lo.dtype == dtype
