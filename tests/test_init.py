"""Tests of hf_chts.topology.init: initial topologies (ER, BRF, BSW, BSF) and density allocation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_chts._validation import link_count
from hf_chts.topology.init import (
    _log,
    _select_by_rank,
    _source_degrees,
    _Stream,
    allocate_densities,
    init_mask,
)

METHODS = [
    ("er", {}),
    ("brf", {"r": 0.0}),
    ("brf", {"r": 0.3}),
    ("brf", {"r": 1.0}),
    ("brf", {"r": 0.0, "degree_dist": "fixed"}),
    ("brf", {"r": 0.5, "degree_dist": "fixed"}),
    ("bsw", {"beta": 0.0}),
    ("bsw", {"beta": 0.3}),
    ("bsw", {"beta": 1.0}),
    ("bsf", {}),
]
SHAPES = [(1, 1), (1, 10), (10, 1), (5, 3), (3, 5), (7, 7), (17, 40), (40, 17), (96, 256), (256, 96)]
DENSITIES = [0.01, 0.05, 0.3, 0.5, 0.77, 0.95, 1.0]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ring_distance(n_s: int, n_l: int) -> torch.Tensor:
    """(n_s x n_l) ring distance of each target from each source's centre floor(i * n_l / n_s)."""
    centres = (torch.arange(n_s) * n_l) // n_s
    diff = (torch.arange(n_l)[None, :] - centres[:, None]) % n_l
    return torch.minimum(diff, n_l - diff)


# ------------------------------------------------------------------------------------ link counts
@pytest.mark.parametrize("method,params", METHODS, ids=lambda x: str(x))
def test_exact_link_count_every_shape_and_density(method, params):
    for shape in SHAPES:
        for density in DENSITIES:
            mask = init_mask(shape, density, method, generator=gen(), **params)
            assert mask.shape == shape and mask.dtype == torch.bool
            assert int(mask.sum()) == link_count(shape, density), (shape, density)


@pytest.mark.parametrize("shape", [(768, 2048), (2048, 768)])
@pytest.mark.parametrize("method", ["er", "brf", "bsw", "bsf"])
def test_exact_link_count_llama_shapes(shape, method):
    mask = init_mask(shape, 0.3, method, generator=gen())
    assert int(mask.sum()) == link_count(shape, 0.3)


def test_default_method_is_brf_and_full_density_is_dense():
    a = init_mask((20, 30), 0.2, generator=gen(3))
    b = init_mask((20, 30), 0.2, "brf", r=0.3, degree_dist="uniform", generator=gen(3))
    assert torch.equal(a, b)
    for method, params in METHODS:
        assert init_mask((6, 9), 1.0, method, generator=gen(), **params).all()


# ------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("method,params", METHODS, ids=lambda x: str(x))
def test_same_seed_same_mask_different_seed_differs(method, params):
    a = init_mask((64, 96), 0.2, method, generator=gen(1), **params)
    b = init_mask((64, 96), 0.2, method, generator=gen(1), **params)
    assert torch.equal(a, b)
    c = init_mask((64, 96), 0.2, method, generator=gen(2), **params)
    if method == "bsw" and params["beta"] == 0.0:
        assert torch.equal(a, c)  # the lattice has no randomness
    else:
        assert not torch.equal(a, c)


def test_without_generator_uses_torch_default_rng():
    torch.manual_seed(123)
    a = init_mask((30, 50), 0.1, "er")
    torch.manual_seed(123)
    b = init_mask((30, 50), 0.1, "er", device="cpu")
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,params", METHODS, ids=lambda x: str(x))
def test_same_key_same_mask_on_cpu_and_cuda(method, params):
    # 768 x 2048 and 4096 x 4096 hold exponential variates of exactly 0 (-0.0), which once sorted apart.
    shapes = [((128, 300), 0.1), ((300, 128), 0.3), ((1000, 1000), 0.05), ((64, 64), 0.9)]
    for shape, density in [*shapes, ((768, 2048), 0.3), ((4096, 4096), 0.3)]:
        cuda = init_mask(shape, density, method, key=11, device="cuda", **params)
        assert cuda.device.type == "cuda" and int(cuda.sum()) == link_count(shape, density)
        assert torch.equal(cuda.cpu(), init_mask(shape, density, method, key=11, **params)), shape
    # A generator only supplies the key: where the mask is drawn does not matter.
    g = torch.Generator(device="cuda")
    a = init_mask((128, 300), 0.1, method, generator=g.manual_seed(0), **params)
    cpu = init_mask((128, 300), 0.1, method, generator=g.manual_seed(0), device="cpu", **params)
    assert a.device.type == "cuda" and cpu.device.type == "cpu" and torch.equal(cpu, a.cpu())


@pytest.mark.parametrize("method,params", METHODS, ids=lambda x: str(x))
def test_key_decides_the_mask(method, params):
    a = init_mask((40, 70), 0.2, method, key=5, **params)
    assert torch.equal(a, init_mask((40, 70), 0.2, method, key=5, **params))
    if not (method == "bsw" and params["beta"] == 0.0):
        assert not torch.equal(a, init_mask((40, 70), 0.2, method, key=6, **params))
    with pytest.raises(ValueError, match="not both"):
        init_mask((4, 4), 0.5, method, key=5, generator=gen(), **params)
    with pytest.raises(ValueError, match="`key`"):
        init_mask((4, 4), 0.5, method, key=1.5, **params)


def test_log_is_accurate():
    # The device-independent log used for exponential keys: within a few float32 ulps of torch.log.
    x = torch.cat([torch.rand(100_000, generator=gen()) + 2.0**-24, torch.logspace(-30, 30, 1000)])
    err = (_log(x).double() - x.double().log()).abs()
    assert float((err / x.double().log().abs().clamp(min=1.0)).max()) < 4 * 2.0**-23


# ------------------------------------------------------------------------------------ BRF
@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (7, 30), (30, 30)])
@pytest.mark.parametrize("degree_dist", ["fixed", "uniform"])
def test_brf_r0_links_are_the_nearest_targets(shape, degree_dist):
    mask = init_mask(shape, 0.15, "brf", r=0.0, degree_dist=degree_dist, generator=gen())
    src = mask if shape[0] <= shape[1] else mask.T  # sources (smaller side) as rows
    dist = ring_distance(*src.shape)
    for i in range(src.shape[0]):  # a plain loop is fine in a test
        linked, unlinked = dist[i][src[i]], dist[i][~src[i]]
        if linked.numel() and unlinked.numel():
            assert linked.max() <= unlinked.min(), i


def test_brf_centres_spread_evenly_over_the_ring():
    # One link per source at r = 0: exactly its centre floor(i * n_l / n_s), covering the whole ring.
    n_s, n_l = 7, 30
    mask = init_mask((n_s, n_l), 1 / n_l, "brf", r=0.0, degree_dist="fixed", generator=gen())
    expected = torch.zeros(n_s, n_l, dtype=torch.bool)
    expected[torch.arange(n_s), (torch.arange(n_s) * n_l) // n_s] = True
    assert torch.equal(mask, expected)
    assert torch.equal(
        init_mask((n_l, n_s), 1 / n_l, "brf", r=0.0, degree_dist="fixed", generator=gen()), expected.T
    )


def test_brf_fixed_degrees_are_floor_or_ceil_of_mean():
    for shape in [(50, 120), (120, 50)]:
        mask = init_mask(shape, 0.123, "brf", r=0.3, degree_dist="fixed", generator=gen())
        degrees = mask.sum(1) if shape[0] <= shape[1] else mask.sum(0)
        mean = link_count(shape, 0.123) / degrees.numel()
        assert set(degrees.tolist()) <= {math.floor(mean), math.ceil(mean)}


def test_brf_uniform_degrees_at_least_one_and_spread():
    mask = init_mask((200, 500), 0.05, "brf", r=0.3, degree_dist="uniform", generator=gen())
    degrees = mask.sum(1).float()
    assert degrees.min() >= 1
    fixed = init_mask((200, 500), 0.05, "brf", r=0.3, degree_dist="fixed", generator=gen()).sum(1).float()
    assert degrees.var() > 5 * fixed.var()
    # Capped at n_l even when the multinomial overflows (density close to 1).
    dense = init_mask((20, 8), 0.9, "brf", degree_dist="uniform", generator=gen())
    assert int(dense.sum()) == link_count((20, 8), 0.9) and dense.sum(0).max() <= 20


def test_brf_r1_matches_er_degree_statistics():
    shape, density = (200, 1000), 0.1
    brf = init_mask(shape, density, "brf", r=1.0, degree_dist="fixed", generator=gen(5))
    er = init_mask(shape, density, "er", generator=gen(5))
    # Target (larger side) degrees: the same mean, and an ER-like (binomial) spread.
    t_brf, t_er = brf.sum(0).float(), er.sum(0).float()
    assert t_brf.mean().item() == pytest.approx(t_er.mean().item())
    assert 0.75 < t_brf.var() / t_er.var() < 1.33
    # No locality left: the mean ring distance of the links is that of uniform targets.
    dist = ring_distance(*shape).float()
    assert dist[brf].mean().item() == pytest.approx(dist.mean().item(), rel=0.05)


def test_brf_r_controls_locality():
    dist = ring_distance(100, 400).float()
    means = [
        dist[init_mask((100, 400), 0.1, "brf", r=r, generator=gen())].mean() for r in (0.0, 0.3, 0.7, 1.0)
    ]
    assert means == sorted(means)
    assert means[0] < 0.2 * means[-1]


@pytest.mark.parametrize("n", [1, 2, 9, 64, 301])
def test_select_by_rank_exact_counts_and_order_with_ties(n):
    g = gen(n)
    for spread in (3, 1000):  # keys from 3 values (ties everywhere) and from many
        keys = torch.randint(0, spread, (50, n), generator=g).float()
        for counts in (
            torch.randint(0, n + 1, (50,), generator=g),  # anything from 0 to n, mixed
            torch.full((50,), n // 3),  # all equal
            (n - torch.randint(0, 2, (50,), generator=g)).clamp_(min=0),  # nearly full: the complement path
            torch.tensor([0, n] * 25),  # K_i = 0 and K_i = n_l
        ):
            picked = _select_by_rank(keys, counts)
            assert torch.equal(picked.sum(1), counts)
            for i in range(50):  # no unpicked key beats a picked one: the same values as a full sort
                expected = keys[i].sort(descending=True).values[: counts[i]]
                assert torch.equal(keys[i][picked[i]].sort(descending=True).values, expected)


@pytest.mark.parametrize("degree_dist", ["fixed", "uniform"])
@pytest.mark.parametrize("r", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize(
    "shape,density", [((30, 70), 0.3), ((70, 30), 0.95), ((90, 40), 0.01), ((33, 33), 0.5)]
)
def test_brf_each_source_gets_exactly_its_degree(shape, density, r, degree_dist):
    # r = 0.02 exercises the log-domain (Gumbel) keys, r = 0.3 the linear race; 0.95 "uniform" has sources
    # capped at K_i = n_l, 0.01 with more sources than links has sources with K_i = 0.
    mask = init_mask(shape, density, "brf", r=r, degree_dist=degree_dist, key=7)
    src = mask if shape[0] <= shape[1] else mask.T
    n_s, n_l = src.shape
    degrees = _source_degrees(
        n_s, n_l, link_count(shape, density), degree_dist, _Stream(7, torch.device("cpu"))
    )
    assert torch.equal(src.sum(1), degrees)
    assert int(mask.sum()) == link_count(shape, density)


def test_brf_single_draw_follows_the_weights():
    # K_i = 1 on a square layer: each source's target offset from its centre has probability
    # (1 + delta)^-alpha / sum, the first step of the weighted sample without replacement.
    n, r, seeds = 32, 0.3, 150
    alpha = (1 - r) / r
    offsets = torch.zeros(n)
    for seed in range(seeds):
        mask = init_mask((n, n), 1 / n, "brf", r=r, degree_dist="fixed", generator=gen(seed))
        offsets += torch.bincount((mask.float().argmax(1) - torch.arange(n)) % n, minlength=n)
    delta = ring_distance(1, n)[0].double()
    p = (1 + delta) ** -alpha
    p /= p.sum()
    total = n * seeds
    for d in range(4):  # both offsets at distance d together
        sel = delta == d
        prob = float(p[sel].sum())
        sd = math.sqrt(total * prob * (1 - prob))
        assert abs(float(offsets[sel].sum()) - total * prob) < 4.5 * sd + 1, d


@pytest.mark.parametrize("r", [0.0, 0.02])
def test_brf_equal_weights_tie_break_at_random(r):
    # K_i = 2 near the pure receptive field: the centre plus one of its two neighbours at distance 1, which
    # have equal weight (and at r = 0 equal distance): each side about half of the time.
    n, right = 40, 0
    for seed in range(40):
        mask = init_mask((n, n), 2 / n, "brf", r=r, degree_dist="fixed", generator=gen(seed))
        centres = torch.arange(n)
        assert mask[centres, centres].all()
        right += int(mask[centres, (centres + 1) % n].sum())
        assert int(mask[centres, (centres - 1) % n].sum()) + int(mask[centres, (centres + 1) % n].sum()) == n
    total = 40 * n
    assert abs(right - total / 2) < 4 * math.sqrt(total / 4)


# ------------------------------------------------------------------------------------ BSW
@pytest.mark.parametrize("shape", [(60, 25), (25, 60), (30, 30)])
def test_bsw_beta0_is_a_ring_lattice(shape):
    mask = init_mask(shape, 0.2, "bsw", beta=0.0, generator=gen())
    windows = mask if shape[0] >= shape[1] else mask.T  # the larger side owns the windows, as rows
    degrees = windows.sum(1)
    mean = link_count(shape, 0.2) / windows.shape[0]
    assert set(degrees.tolist()) <= {math.floor(mean), math.ceil(mean)}
    n_s = windows.shape[1]
    for row, k in zip(
        windows, degrees.tolist(), strict=True
    ):  # a cyclic window: exactly one 0 -> 1 step around the ring
        if 0 < k < n_s:
            assert int((row & ~row.roll(1)).sum()) == 1


def test_bsw_rewiring_moves_links_and_preserves_count():
    shape, density = (80, 120), 0.1
    lattice = init_mask(shape, density, "bsw", beta=0.0, generator=gen())
    n = int(lattice.sum())
    moved_all = init_mask(shape, density, "bsw", beta=1.0, generator=gen())
    assert int(moved_all.sum()) == n and int((moved_all & lattice).sum()) == 0
    half = init_mask(shape, density, "bsw", beta=0.5, generator=gen())
    kept = int((half & lattice).sum()) / n
    assert int(half.sum()) == n and 0.45 < kept < 0.55


# ------------------------------------------------------------------------------------ BSF
def test_bsf_degrees_are_heavy_tailed():
    shape = (300, 500)
    bsf = init_mask(shape, 0.05, "bsf", generator=gen())
    er = init_mask(shape, 0.05, "er", generator=gen())
    for m in (bsf, er):
        assert int(m.sum()) == link_count(shape, 0.05)
    for axis in (0, 1):
        deg_bsf, deg_er = bsf.sum(axis).float(), er.sum(axis).float()
        assert deg_bsf.max() > 5 * deg_bsf.mean()
        assert deg_bsf.max() > 3 * deg_er.max()
        assert deg_bsf.median() < deg_bsf.mean()  # skewed: most nodes below the mean


# ------------------------------------------------------------------------------------ allocation
def test_allocate_uniform():
    assert allocate_densities([(10, 20), (30, 40)], 0.3) == [0.3, 0.3]


def test_allocate_erk_matches_budget_and_favours_small_layers():
    shapes = [(768, 768), (2048, 768), (768, 2048), (256, 256)]
    dens = allocate_densities(shapes, 0.1, "erk")
    sizes = [a * b for a, b in shapes]
    assert sum(d * s for d, s in zip(dens, sizes, strict=True)) == pytest.approx(0.1 * sum(sizes))
    assert dens[3] > dens[0] > dens[1] == pytest.approx(dens[2])
    ratio = [d / ((a + b) / (a * b)) for d, (a, b) in zip(dens, shapes, strict=True)]
    assert max(ratio) == pytest.approx(min(ratio))  # proportional to (n_in + n_out) / (n_in n_out)
    counts = [link_count(s, d) for s, d in zip(shapes, dens, strict=True)]
    assert abs(sum(counts) - 0.1 * sum(sizes)) <= len(shapes)


def test_allocate_erk_caps_at_one_and_redistributes():
    shapes = [(4, 4), (8, 8), (1000, 1000), (500, 2000)]
    dens = allocate_densities(shapes, 0.3, "erk")
    sizes = [a * b for a, b in shapes]
    assert dens[0] == 1.0 and dens[1] == 1.0
    assert all(0 < d <= 1 for d in dens)
    assert sum(d * s for d, s in zip(dens, sizes, strict=True)) == pytest.approx(0.3 * sum(sizes))
    assert allocate_densities(shapes, 1.0, "erk") == [1.0] * 4


def test_allocate_mapping_returns_mapping():
    out = allocate_densities({"q": (64, 64), "up": (172, 64)}, 0.2, "erk")
    assert list(out) == ["q", "up"] and out["q"] > out["up"]


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("r", [-0.1, 1.5])
def test_bad_r(r):
    with pytest.raises(ValueError, match=f"`r`.*{r}"):
        init_mask((4, 4), 0.5, "brf", r=r)


def test_bad_beta_degree_dist_method_params_and_shape():
    with pytest.raises(ValueError, match="`beta`.*2"):
        init_mask((4, 4), 0.5, "bsw", beta=2)
    with pytest.raises(ValueError, match="'zipf'.*'fixed', 'uniform'"):
        init_mask((4, 4), 0.5, "brf", degree_dist="zipf")
    with pytest.raises(ValueError, match="'xyz'.*'er', 'brf', 'bsw', 'bsf'"):
        init_mask((4, 4), 0.5, "xyz")
    with pytest.raises(ValueError, match="'beta'.*'brf'.*'r', 'degree_dist'"):
        init_mask((4, 4), 0.5, "brf", beta=0.1)
    with pytest.raises(ValueError, match="'r'.*'er'"):
        init_mask((4, 4), 0.5, "er", r=0.1)
    with pytest.raises(ValueError, match="shape"):
        init_mask((0, 4), 0.5, "er")
    with pytest.raises(ValueError, match="shape"):
        init_mask((4,), 0.5, "er")
    with pytest.raises(ValueError, match="'gaussian'.*'uniform', 'erk'"):
        allocate_densities([(4, 4)], 0.5, "gaussian")


def test_log_tiling_does_not_change_the_bits(monkeypatch):
    # On CPU the log runs tile by tile; on GPUs in one piece: both must give the same bits (and masks).
    from hf_chts.topology import init

    x = torch.rand(3, 40_000, generator=gen()) + 2.0**-24
    tiled = _log(x)
    mask = init_mask((300, 200), 0.2, "brf", key=3)
    monkeypatch.setattr(init, "_CPU_TILE", 1 << 30)
    assert torch.equal(_log(x), tiled)
    assert torch.equal(init_mask((300, 200), 0.2, "brf", key=3), mask)
