"""Tests of hf_chts.topology.link_prediction: Cannistraci-Hebb L3n scores and their references."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_chts import config as config_module
from hf_chts.topology import link_prediction
from hf_chts.topology.link_prediction import (
    CH_PRECISIONS,
    CH_VARIANTS,
    _round_weights,
    _split_bf16,
    ch3_l3_reference,
    ch_scores,
    ch_scores_reference,
)

# Small matmuls on a busy shared CPU: one thread avoids OpenMP spin-waits (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ["CH2_L3n", "CH3_L3n", "CH3.1_L3n"]
METHODS = ["auto", "dense", "int8", "float", "sparse", "dense_reference"]

# A 3 x 4 layer (outputs a0..a2, inputs j0..j3):
#   a0: j0 j1 j2     k_row = [3, 2, 2]
#   a1:    j1 j2     k_col = [2, 2, 2, 1]
#   a2: j0       j3
TINY = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)


def loop_scores(mask: torch.Tensor, variant: str) -> list[list[float]]:
    """Section 3's formulas, entry by entry in plain Python: an implementation independent of the kernels."""
    m = mask.int().tolist()
    n_out, n_in = len(m), len(m[0])
    k_row = [sum(row) for row in m]
    k_col = [sum(m[a][j] for a in range(n_out)) for j in range(n_in)]

    def weight(c: int, k_other: int) -> float:
        if c == 0:
            return 0.0
        e = max(k_other - c - 1, 0)
        if variant == "CH2_L3n":
            return (c + 1) / (1 + e)
        if variant == "CH3_L3n":
            return 1 / (1 + e)
        return (c + 1) / (1 + e) ** (1 + e / (1 + e))

    c_r = [[sum(m[a][j] * m[b][j] for j in range(n_in)) for b in range(n_out)] for a in range(n_out)]
    c_c = [[sum(m[a][j] * m[a][i] for a in range(n_out)) for i in range(n_in)] for j in range(n_in)]
    scores = [[0.0] * n_in for _ in range(n_out)]
    for a in range(n_out):
        for j in range(n_in):
            if m[a][j]:
                continue
            rows = sum(weight(c_r[a][b], k_row[b]) * m[b][j] for b in range(n_out))
            cols = sum(weight(c_c[j][i], k_col[i]) * m[a][i] for i in range(n_in))
            scores[a][j] = rows + cols
    return scores


# ------------------------------------------------------------------------------------ exact values
@pytest.mark.parametrize("method", METHODS)
def test_hand_computed_values_on_tiny_layer(method):
    # Candidate (a1, j0), CH2: rows: C_r[a1, a0] = 2, E = k_row[a0] - 2 - 1 = 0 -> G = 3, a0 - j0: 3.
    #   cols: a1's inputs j1, j2 share a0 with j0: C_c = 1, E = 2 - 1 - 1 = 0 -> G = 2 each: 4. Total 7.
    # Candidate (a2, j1): rows: C_r[a2, a0] = 1, E = 3 - 1 - 1 = 1 -> CH2 G = 2 / 2 = 1, CH3 1/2,
    #   CH3.1 2 / 2 ** 1.5; cols: a2's input j0 shares a0 with j1: C = 1, E = 0 -> CH2 2, CH3 1.
    expected = {
        "CH2_L3n": [[0, 0, 0, 4], [7, 0, 0, 0], [0, 3, 3, 0]],
        "CH3_L3n": [[0, 0, 0, 2], [3, 0, 0, 0], [0, 1.5, 1.5, 0]],
        "CH3.1_L3n": [[0, 0, 0, 4], [7, 0, 0, 0], [0, 2 + 2**-0.5, 2 + 2**-0.5, 0]],
    }
    for variant, values in expected.items():
        got = ch_scores(TINY, variant, method=method)
        assert got.dtype == torch.float32 and got.shape == TINY.shape
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float32))
        torch.testing.assert_close(
            got.double(), torch.tensor(loop_scores(TINY, variant), dtype=torch.float64)
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_loop_formula_on_small_random_layers(variant):
    g = torch.Generator().manual_seed(0)
    for shape, density in [((6, 9), 0.4), ((9, 6), 0.25), ((7, 7), 0.6)]:
        mask = torch.rand(shape, generator=g) < density
        expected = torch.tensor(loop_scores(mask, variant), dtype=torch.float64)
        torch.testing.assert_close(ch_scores_reference(mask, variant), expected)
        torch.testing.assert_close(ch_scores(mask, variant).double(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ kernels agree
@pytest.mark.parametrize("method", ["auto", "dense", "int8", "float", "sparse"])
def test_all_kernels_and_block_sizes_match_reference(method):
    g = torch.Generator().manual_seed(1)
    tiny = [((1, 1), 1.0), ((1, 7), 0.5), ((7, 1), 0.5), ((5, 3), 0.5)]
    small = [((37, 23), 0.02), ((23, 37), 0.1), ((64, 40), 0.3), ((40, 64), 0.7), ((20, 30), 1.0)]
    for case, (shape, density) in enumerate(tiny + small):
        mask = torch.rand(shape, generator=g) < density
        refs = {variant: ch_scores_reference(mask, variant) for variant in VARIANTS}
        # Every variant unblocked; blocks that divide the sides or not (one row per block on the tiny
        # layers) with one variant per case, in turn: blocking and the variant's weights are independent.
        runs = [(variant, None) for variant in VARIANTS]
        runs += [(VARIANTS[case % 3], b) for b in ((1, 2) if (shape, density) in tiny else (16,))]
        for variant, block_size in runs:
            ref = refs[variant]
            got = ch_scores(mask, variant, method=method, block_size=block_size)
            assert got.dtype == torch.float32 and got.shape == shape
            tol = 1e-5 * (1 + ref.abs().max().item())
            torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=tol)
            assert not got[mask].any()  # existing links are not candidates: 0.0


@pytest.mark.parametrize("density", [0.01, 0.05, 0.3])
def test_auto_matches_reference_on_a_larger_layer(density):
    mask = torch.rand(300, 170, generator=torch.Generator().manual_seed(2)) < density
    ref = ch_scores_reference(mask, "CH2_L3n")
    torch.testing.assert_close(ch_scores(mask).double(), ref, rtol=2e-6, atol=1e-5 * ref.abs().max().item())


def test_mask_dtypes_alias_and_degenerate_masks():
    mask = torch.rand(12, 17, generator=torch.Generator().manual_seed(3)) < 0.3
    expected = ch_scores(mask, "CH3.1_L3n")
    for other in (mask.float(), mask.int(), mask.to(torch.uint8), mask.double() * 2.5):
        torch.testing.assert_close(ch_scores(other, "CH3.1_L3n"), expected)
    torch.testing.assert_close(ch_scores(mask, "CH3_1_L3n"), expected)
    assert not ch_scores(torch.zeros(5, 8, dtype=torch.bool)).any()
    assert not ch_scores(torch.ones(5, 8, dtype=torch.bool)).any()


def test_respects_reduced_precision_fp32_setting():
    """A caller's TF32 / bf16 fp32-matmul setting must neither change the scores nor leak out changed."""
    mask = torch.rand(40, 90, generator=torch.Generator().manual_seed(4)) < 0.3
    expected = ch_scores(mask, method="float")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = ch_scores(mask, method="float")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["auto", "dense", "int8", "float", "sparse"])
def test_cuda_matches_reference(method):
    mask = torch.rand(300, 170, generator=torch.Generator().manual_seed(5)) < 0.2
    for variant in VARIANTS:
        ref = ch_scores_reference(mask, variant)
        got = ch_scores(mask.cuda(), variant, method=method, block_size=64)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu().double(), ref, rtol=2e-6, atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------------------------------ path-based CH3-L3
def test_ch3_l3_reference_hand_values():
    # (a1, j0): paths a1-j1-a0-j0 and a1-j2-a0-j0; community {j1, j2, a0}; no external links: 1 + 1 = 2.
    # (a2, j1): one path a2-j0-a0-j1; a0 has one link (j2) outside {j0, a0} and the seeds: 1 / sqrt(2).
    # (a0, j3): one path a0-j0-a2-j3, no external links: 1. (a1, j3): no path: 0.
    expected = torch.tensor([[0, 0, 0, 1], [2, 0, 0, 0], [0, 2**-0.5, 2**-0.5, 0]], dtype=torch.float64)
    torch.testing.assert_close(ch3_l3_reference(TINY), expected)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    def ranks(v):  # average ranks over ties
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=v.dtype)
        values, inverse = torch.unique(v, return_inverse=True)
        total = torch.zeros(values.numel(), dtype=v.dtype).index_add_(0, inverse, r)
        count = torch.zeros(values.numel(), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(r))
        return (total / count)[inverse]

    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_ch3_l3n_ranks_candidates_like_path_based_ch3_l3(density):
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(6)) < density
    candidates = ~mask
    exact = ch3_l3_reference(mask)[candidates]
    for variant in VARIANTS:
        rho = spearman(exact, ch_scores(mask, variant)[candidates])
        assert rho > 0.85, (variant, rho)
    assert torch.isfinite(exact).all() and (exact > 0).any()


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    mask = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="'CH4_L3'.*'CH2_L3n', 'CH3_L3n', 'CH3.1_L3n'"):
        ch_scores(mask, "CH4_L3")
    with pytest.raises(ValueError, match="'CH4_L3'"):
        ch_scores_reference(mask, "CH4_L3")
    with pytest.raises(ValueError, match="'gpu'.*'auto', 'dense', 'int8', 'float', 'sparse'"):
        ch_scores(mask, method="gpu")
    with pytest.raises(ValueError, match="ch_precision 'fp16'.*'exact', 'tf32', 'bf16'"):
        ch_scores(mask, precision="fp16")
    with pytest.raises(ValueError, match=r"2-D.*\(12,\)"):
        ch_scores(torch.ones(12))
    with pytest.raises(ValueError, match=r"3-D stack.*\(2, 2, 3, 4\)"):
        ch_scores(torch.ones(2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        ch3_l3_reference(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="torch.Tensor, got list"):
        ch_scores([[1, 0], [0, 1]])
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"block_size.*{bad}"):
            ch_scores(mask, block_size=bad)


# ------------------------------------------------------------------------------------ stacks of layers
@pytest.mark.parametrize("method", ["auto", "dense", "int8", "float", "sparse", "dense_reference"])
def test_stack_equals_per_layer(method):
    g = torch.Generator().manual_seed(8)
    # Layers of different densities in one stack (each picks its own kernels on CPU), an empty and a full one.
    stack = torch.stack([torch.rand(60, 45, generator=g) < d for d in (0.02, 0.1, 0.4, 0.9)])
    stack = torch.cat(
        [stack, torch.zeros(1, 60, 45, dtype=torch.bool), torch.ones(1, 60, 45, dtype=torch.bool)]
    )
    for variant in VARIANTS:
        for precision in CH_PRECISIONS:
            got = ch_scores(stack, variant, method=method, precision=precision)
            assert got.shape == stack.shape and got.dtype == torch.float32
            per_layer = torch.stack(
                [ch_scores(m, variant, method=method, precision=precision) for m in stack]
            )
            if method == "dense":  # one batched GEMM vs B single ones: float32 rounding may differ
                torch.testing.assert_close(got, per_layer, rtol=1e-6, atol=1e-5)
            else:
                assert torch.equal(got, per_layer), (variant, precision)
            if precision == "exact":
                ref = torch.stack([ch_scores_reference(m, variant) for m in stack])
                torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-5 * float(ref.abs().max()))


class _CountSyncs(TorchDispatchMode):
    """Counts the ops that read a device value on the host (a synchronisation on a GPU)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_dense_path_never_reads_the_device():
    # The GPU path (method="dense") picks kernels and blocks from shapes alone: no host synchronisation.
    stack = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(9)) < 0.2
    for precision in CH_PRECISIONS:
        with _CountSyncs() as mode:
            ch_scores(stack, "CH3.1_L3n", method="dense", precision=precision, block_size=16)
            ch_scores(stack[0], method="dense", precision=precision)
        assert mode.syncs == [], (precision, mode.syncs)


def test_known_link_counts_spare_the_cpu_plan_its_read():
    # "auto" on CPU picks each layer's kernels by density; with the counts given it reads nothing back and
    # computes the same scores (a dense layer, a sparse one, an empty one in one stack).
    g = torch.Generator().manual_seed(4)
    stack = torch.stack(
        [torch.rand(40, 60, generator=g) < 0.3, torch.rand(40, 60, generator=g) < 0.02, torch.zeros(40, 60)]
    ).bool()
    counts = [int(m.sum()) for m in stack]
    with _CountSyncs() as mode:
        dense_layers = ch_scores(stack[[0, 2]], nnz=[counts[0], counts[2]])
    assert mode.syncs == [], mode.syncs
    with _CountSyncs() as mode:
        ch_scores(stack[[0, 2]])
    assert mode.syncs  # the same call without the counts reads them
    got = ch_scores(stack, "CH3_L3n", nnz=counts)
    assert torch.equal(got, ch_scores(stack, "CH3_L3n"))
    assert torch.equal(dense_layers, ch_scores(stack[[0, 2]]))
    assert torch.equal(ch_scores(stack[0], "CH3_L3n", nnz=counts[0]), got[0])
    assert bool((got[2] == 0).all())


@pytest.mark.parametrize("nnz", [[1, 2], -1, [1.0, 2, 3], 5, [10**9, 0, 0]], ids=str)
def test_bad_link_counts(nnz):
    stack = torch.zeros(3, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="nnz"):
        ch_scores(stack, nnz=nnz)


# ------------------------------------------------------------------------------------ precision knob
def test_precision_names_match_the_config():
    assert config_module.CH_PRECISIONS == CH_PRECISIONS
    # one list: the config's variants are the predictor's, the path-based CH3-L3p among them
    assert config_module.CH_VARIANTS == CH_VARIANTS and "CH3_L3p" in CH_VARIANTS


def test_split_bf16_and_rounding():
    w = torch.rand(10_000, generator=torch.Generator().manual_seed(10)) * 50
    hi, mid, lo = _split_bf16(w)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    total = hi.float() + mid.float() + lo.float()
    assert float(((total - w).abs() / w).max()) <= 2.0**-24  # float32 precision
    # TF32 keeps 10 mantissa bits (round to nearest even); bf16 keeps 7.
    x = torch.tensor([1.0 + 2**-10, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-11 + 2**-20, 3.0])
    assert _round_weights(x, "tf32").tolist() == [1.0 + 2**-10, 1.0, 1.0 + 2**-9, 1.0 + 2**-10, 3.0]
    assert _round_weights(x, "bf16").tolist() == [1.0, 1.0, 1.0, 1.0, 3.0]
    assert _round_weights(x, "exact") is x


@pytest.mark.parametrize("method", ["auto", "dense", "sparse"])
def test_reduced_precision_error_and_top_k_agreement(method):
    # Thresholds of docs/PRECISION.md: score error relative to the largest score, and the overlap of the
    # top 10% of candidates with the exact top 10%.
    mask = torch.rand(400, 300, generator=torch.Generator().manual_seed(11)) < 0.1
    exact = ch_scores(mask, method=method)
    candidates = ~mask
    k = int(0.1 * int(candidates.sum()))
    top_exact = set(torch.topk(exact[candidates], k).indices.tolist())
    for precision, max_error, min_overlap in (("tf32", 2.0**-11, 0.97), ("bf16", 2.0**-8, 0.9)):
        got = ch_scores(mask, method=method, precision=precision)
        error = float((got - exact).abs().max() / exact.abs().max())
        assert 0 < error <= max_error, (precision, error)
        overlap = len(top_exact & set(torch.topk(got[candidates], k).indices.tolist())) / k
        assert overlap >= min_overlap, (precision, overlap)


def test_regrow_links_threads_the_precision(monkeypatch):
    from hf_chts.topology import regrowth
    from hf_chts.topology.regrowth import regrow_links

    seen = []
    original = link_prediction.ch_scores

    def spy(mask, variant="CH2_L3n", **kw):
        seen.append(kw.get("precision"))
        return original(mask, variant, **kw)

    monkeypatch.setattr(regrowth, "ch_scores", spy)
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(12)) < 0.2
    regrow_links(mask, 5, method="ch", ch_precision="bf16")
    assert seen == ["bf16"]
    with pytest.raises(ValueError, match="ch_precision 'half'"):
        regrow_links(mask, 5, method="ch", ch_precision="half")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stack_and_precisions():
    stack = torch.rand(3, 300, 170, generator=torch.Generator().manual_seed(13)) < 0.2
    ref = torch.stack([ch_scores_reference(m) for m in stack])
    exact = ch_scores(stack.cuda())
    torch.testing.assert_close(exact.cpu().double(), ref, rtol=2e-6, atol=1e-5 * float(ref.abs().max()))
    for precision, max_error in (("tf32", 2.0**-10), ("bf16", 2.0**-7)):
        got = ch_scores(stack.cuda(), precision=precision).cpu()
        assert float((got.double() - ref).abs().max() / ref.abs().max()) <= max_error, precision


def test_gpu_kernel_logic_with_emulated_bf16_gemms(monkeypatch):
    # The GPU path's bf16 branches (exact counts from bf16 operands, "exact" as three bf16 parts, "bf16" as
    # one), run on CPU with a bmm that does what a bf16 GEMM with fp32 output does: fp32 sums of the
    # (exactly representable) bf16 products.
    real_bmm = torch.bmm
    bf16_calls = []

    def bmm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_bmm(a, b)
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        bf16_calls.append(1)
        return real_bmm(a.float(), b.float())

    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setitem(link_prediction._BF16_FP32_MATMUL, "cpu", True)
    stack = torch.rand(3, 70, 50, generator=torch.Generator().manual_seed(14)) < 0.2
    for variant in VARIANTS:
        ref = torch.stack([ch_scores_reference(m, variant) for m in stack])
        scale = float(ref.abs().max())
        for precision, max_error in (("exact", 2e-6), ("tf32", 2.0**-11), ("bf16", 2.0**-8)):
            got = ch_scores(stack, variant, method="dense", precision=precision, block_size=32)
            assert float((got.double() - ref).abs().max()) <= max_error * scale, (variant, precision)
            assert not got[stack].any()
    # Blocks of 32: 3 for the 70 rows, 2 for the 50 columns. Per variant: "exact" 5 x (1 count + 3
    # products), "bf16" 5 x (1 + 1), "tf32" 5 counts (its products are TF32 GEMMs).
    assert len(bf16_calls) == 3 * (20 + 10 + 5)
