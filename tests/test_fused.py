"""Tests of hf_chts.topology._fused: elementwise chains compiled into one kernel, checked against eager.

On a GPU the fused functions (the random stream's tiles, the CH node weights) run compiled; here the
compiled path is forced on the CPU (Inductor's C++ kernels) to prove it gives the eager bits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from hf_chts.profiling import OpCounter
from hf_chts.topology import _fused, link_prediction, rng, sampling
from hf_chts.topology._fused import ENV_VAR, FusedFunction, compile_enabled
from hf_chts.topology.link_prediction import ch_scores
from hf_chts.topology.rng import random_bits, stream_key, uniform
from hf_chts.topology.sampling import sample_without_replacement, select_rows


@pytest.fixture
def fresh(monkeypatch):
    """Fresh (uncompiled, unchecked) fused functions, compiled on CPU too."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", frozenset({"cpu", "cuda"}))
    for name in ("_BITS_TILE", "_UNIFORM_TILE"):
        old = getattr(rng, name)
        monkeypatch.setattr(rng, name, FusedFunction(old.fn, compare=old.compare))
    for mode, old in list(link_prediction._WEIGHT_PARTS.items()):
        monkeypatch.setitem(link_prediction._WEIGHT_PARTS, mode, FusedFunction(old.fn, compare=old.compare))
    old = sampling._SOFT_KEYS
    monkeypatch.setattr(sampling, "_SOFT_KEYS", FusedFunction(old.fn, compare=old.compare))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _stream_args(keys):
    keys = torch.tensor(keys, dtype=torch.int64)
    return keys, rng._mix64(keys.clone())[:, None], rng._gamma(keys)[:, None]


# ------------------------------------------------------------------------------------ random stream
def test_compiled_stream_is_bit_identical_and_compiles_once(fresh):
    keys, start, gamma = _stream_args([stream_key(0, i) for i in range(5)] + [-1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the compiled kernel is what ran
        for uniform_float, draw in ((False, random_bits), (True, uniform)):
            fused = rng._UNIFORM_TILE if uniform_float else rng._BITS_TILE
            before = _graphs()
            # (rows, cols, offset, tile): one tile, then several (row and column tiles, a far offset).
            cases = [(7, 300, 9, 4096), (7, 1000, 12345, 1 << 20), (5, 77, 1 << 40, 50)]
            for rows, cols, offset, tile in cases:
                got = rng._draw_tiles(start[:rows], gamma[:rows], cols, offset, uniform_float, tile)
                assert torch.equal(got, draw(keys[:rows], cols, offset=offset)), (rows, cols, offset, tile)
            assert fused.verified("cpu")
            # dynamic=True: new tile and stack shapes reuse the first graph.
            assert _graphs() - before == 1


def test_device_tiles_are_whole_draws_once_checked(fresh):
    device = torch.device("cpu")
    assert rng._device_tile(device, True) == rng._TILE_DEVICE  # the first call's eager check stays bounded
    keys, start, gamma = _stream_args([3, 4])
    rng._draw_tiles(start, gamma, 64, 0, True, rng._device_tile(device, True))
    assert rng._device_tile(device, True) == rng._TILE_FUSED
    assert rng._device_tile(device, False) == rng._TILE_DEVICE  # checked per function


@pytest.mark.slow
def test_compiled_stream_edge_shapes(fresh):
    # Single streams, single columns and keys of every bit pattern (0/1 sizes may compile a second graph).
    for keys in ([stream_key(1, "x")], [(1 << 63) - 1, -(1 << 63), 1, 2]):
        keys, start, gamma = _stream_args(keys)
        for uniform_float, draw in ((False, random_bits), (True, uniform)):
            for cols, offset, tile in [(1, 0, 8), (33, 7, 8), (4097, (1 << 62) - 5000, 1 << 20), (2, 5, 1)]:
                got = rng._draw_tiles(start, gamma, cols, offset, uniform_float, tile)
                assert torch.equal(got, draw(keys, cols, offset=offset)), (keys, cols, offset, tile)


# ------------------------------------------------------------------------------------ CH node weights
def _emulate_bf16_gemms(monkeypatch):
    """A bmm that does what a bf16 GEMM with fp32 output does, so the GPU's bf16 branches run on CPU."""
    real_bmm = torch.bmm

    def bmm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_bmm(a, b)
        return real_bmm(a.float(), b.float())

    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setitem(link_prediction._BF16_FP32_MATMUL, "cpu", True)


@pytest.mark.parametrize(
    "variant, precision", [("CH2_L3n", "exact"), ("CH3.1_L3n", "bf16"), ("CH3_L3n", "tf32")]
)
def test_compiled_node_weights_give_the_eager_scores(fresh, monkeypatch, variant, precision):
    stack = torch.rand(3, 70, 50, generator=torch.Generator().manual_seed(3)) < 0.2
    _emulate_bf16_gemms(monkeypatch)
    kwargs = dict(method="dense", precision=precision, block_size=32)
    eager = ch_scores(stack, variant, **kwargs)
    fused = link_prediction._WEIGHT_PARTS[link_prediction._parts_kind(precision, True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = ch_scores(stack, variant, **kwargs)
    assert fused.verified("cpu")
    assert torch.equal(compiled, eager)  # on CPU Inductor keeps the eager rounding bit for bit


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "bf16", "split"])
def test_compiled_node_weights_every_kind_and_precision(fresh, mode):
    fused = link_prediction._WEIGHT_PARTS[mode]
    m = (torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(4)) < 0.3).float()
    blocks = [
        (torch.bmm(m, m[:, :17].transpose(1, 2)), m.sum(2)[:, :, None]),  # row part: (B, n_out, block)
        (torch.bmm(m.transpose(1, 2), m[:, :, 5:16]), m.sum(1)[:, :, None]),  # column part
    ]
    for kind in ("ch2", "ch3", "ch31"):
        for c, k in blocks:
            got, expected = fused(c, k, kind), fused.fn(c, k, kind)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), (mode, kind)
    assert fused.verified("cpu")


def test_node_weights_are_pure():
    c = torch.tensor([[0.0, 2.0], [1.0, 5.0]])
    for kind in ("ch2", "ch3", "ch31"):
        before = c.clone()
        g = link_prediction._node_weights(c, torch.tensor([[3.0], [4.0]]), kind)
        assert torch.equal(c, before) and g[0, 0] == 0
    # ch2: (C + 1) / max(k - C, 1) where C > 0.
    expected = torch.tensor([[0.0, 3.0], [2.0 / 3.0, 6.0]])
    assert torch.equal(link_prediction._node_weights(c, torch.tensor([[3.0], [4.0]]), "ch2"), expected)


# ------------------------------------------------------------------------------------ soft keys
def _soft_rows(scores, monkeypatch, compile_setting, **kwargs):
    monkeypatch.setenv(ENV_VAR, compile_setting)
    if "generators" in kwargs:
        kwargs["generators"] = [torch.Generator().manual_seed(i) for i in range(scores.shape[0])]
    return select_rows(scores.clone(), [10, 50, 0, 499], mode="soft", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=9.0, streams=[1, 2, 3, 4], overwrite=True),
        dict(temperature=1.0, generators=True),
        dict(temperature=3.0, streams=[5, 6, 7, 8], dtype=torch.float64),
    ],
    ids=["streams-overwrite", "generators", "float64"],
)
def test_compiled_soft_keys_select_what_eager_keys_select(fresh, monkeypatch, kwargs):
    dtype = kwargs.pop("dtype", torch.float32)
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(4, 500, generator=g) * (torch.rand(4, 500, generator=g) < 0.7)).to(dtype)
    eager = _soft_rows(scores, monkeypatch, "0", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = _soft_rows(scores, monkeypatch, "1", **kwargs)
    assert sampling._SOFT_KEYS.verified("cpu")
    # The keys agree to an ulp of a log (checked on the first call); these selections agree exactly.
    assert torch.equal(compiled, eager)
    assert compiled.sum(1).tolist() == [10, 50, 0, 499]


def test_a_large_first_soft_key_call_is_checked_on_a_slice(fresh, monkeypatch):
    monkeypatch.setattr(sampling, "_SOFT_KEYS_CHECK", 64)
    seen = []

    def spy(actual, expected):  # the check's comparison, after the eager run
        seen.append(tuple(expected.shape))
        return sampling._soft_keys_compare(actual, expected)

    monkeypatch.setattr(sampling._SOFT_KEYS, "compare", spy)
    g = torch.Generator().manual_seed(3)
    u, w = torch.rand(3, 500, generator=g), torch.rand(3, 500, generator=g)
    expected = sampling._soft_keys(u, w, torch.full((), 2.0))
    got = sampling._fused_soft_keys_(u.clone(), w, 2.0)
    assert seen == [(3, 21)] and sampling._SOFT_KEYS.verified("cpu")
    assert sampling._soft_keys_compare(got, expected) is None


def test_compiled_soft_keys_sample_what_eager_keys_sample(fresh, monkeypatch):
    weights = torch.rand(3000, generator=torch.Generator().manual_seed(2))
    weights[::7] = 0.0
    drawn = {}
    for setting in ("0", "1"):
        monkeypatch.setenv(ENV_VAR, setting)
        generator = torch.Generator().manual_seed(5)
        drawn[setting] = sample_without_replacement(weights, 700, temperature=9.0, generator=generator)
    assert sampling._SOFT_KEYS.verified("cpu") and torch.equal(drawn["0"], drawn["1"])


def test_soft_keys_eager_function_is_the_select_rows_chain():
    g = torch.Generator().manual_seed(1)
    u, w = torch.rand(3, 100, generator=g), torch.rand(3, 100, generator=g, dtype=torch.float64)
    w[0, :5] = 0.0
    expected = sampling._log_weights(w).mul_(9.0)
    expected.sub_(u.clone().clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_())
    assert torch.equal(sampling._soft_keys(u, w, torch.full((), 9.0)), expected)
    one_ulp = torch.where(expected.isfinite(), expected.nextafter(torch.zeros(())), expected)
    assert sampling._soft_keys_compare(one_ulp, expected) is None
    assert "infinite" in sampling._soft_keys_compare(expected.nan_to_num(neginf=-1e30), expected)
    assert "ulps" in sampling._soft_keys_compare(expected * 1.001, expected)


# ------------------------------------------------------------------------------------ self-check
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@pytest.mark.parametrize("broken", ["wrong", "raises"])
def test_a_failing_compiled_kernel_warns_once_and_runs_eagerly(monkeypatch, broken):
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.delenv(ENV_VAR, raising=False)
    fused = FusedFunction(_double)
    calls = []

    def compiled(x):
        calls.append(1)
        if broken == "raises":
            raise RuntimeError("no kernel for you")
        return x * 3

    fused._compiled = compiled  # what torch.compile would have returned
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="_double on cpu") as record:
        assert torch.equal(fused(x), x * 2)
    assert ("no kernel for you" if broken == "raises" else "differs") in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fused(x), x * 2)  # eager from now on, without a second warning
    assert len(calls) == 1 and not fused.uses_compiled(x.device)


def test_out_may_be_an_input_even_when_the_kernel_is_wrong(monkeypatch):
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.delenv(ENV_VAR, raising=False)
    fused = FusedFunction(_double)
    x = torch.arange(5.0)
    assert fused(x, out=x) is x and torch.equal(x, torch.arange(5.0) * 2)  # compiled, written in place
    assert fused.verified("cpu")
    broken = FusedFunction(_double)

    def compiled_into(out, x):
        out.copy_(x * 3)

    broken._compiled_into = compiled_into
    x = torch.arange(5.0)
    with pytest.warns(RuntimeWarning, match="differs"):
        assert broken(x, out=x) is x
    assert torch.equal(x, torch.arange(5.0) * 2)  # the eager result, computed before x was overwritten


def test_float_comparison_tolerates_an_ulp_but_not_more():
    compare = link_prediction._weights_compare(2.0**-20)
    g = torch.tensor([[0.0, 1 / 3, 7.0]])
    ulp = torch.nextafter(g, torch.full_like(g, 10.0))
    assert compare((g,), (g,)) is None
    assert compare((torch.where(g > 0, ulp, g),), (g,)) is None
    assert "relative" in compare((g * 1.001,), (g,))
    assert "relative" in compare((g + 1e-30,), (g,))  # a masked zero must stay exactly zero
    assert "dtypes" in compare((g.to(torch.bfloat16),), (g,))


# ------------------------------------------------------------------------------------ when it compiles
def test_off_switch_and_bad_values(monkeypatch):
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", frozenset({"cpu"}))
    fused = FusedFunction(_double)
    monkeypatch.setenv(ENV_VAR, "0")
    assert not compile_enabled() and not fused.uses_compiled(torch.device("cpu"))
    assert torch.equal(fused(torch.ones(2)), torch.full((2,), 2.0)) and fused._compiled is None
    monkeypatch.setenv(ENV_VAR, "1")
    assert compile_enabled() and fused.uses_compiled(torch.device("cpu"))
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"HF_CHTS_COMPILE='yes'.*\('0', '1'\)"):
        fused(torch.ones(2))


def test_cpu_and_dispatch_modes_run_eagerly(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    fused = FusedFunction(_double)
    assert not fused.uses_compiled(torch.device("cpu"))  # by default only GPUs compile
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", frozenset({"cpu"}))
    x = torch.ones(3)
    with OpCounter() as counter:
        assert not fused.uses_compiled(x.device)
        fused(x)
    assert counter.ops == 1 and fused._compiled is None  # one eager mul, counted


def test_inside_a_callers_compile_the_function_is_traced_inline(monkeypatch):
    monkeypatch.setattr(_fused, "_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.delenv(ENV_VAR, raising=False)
    fused = FusedFunction(_double)

    @torch.compile(backend="eager", fullgraph=True)
    def outer(x):
        return fused(x) + 1

    x = torch.arange(3.0)
    assert torch.equal(outer(x), x * 2 + 1) and fused._compiled is None


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_the_checked_compiled_kernels():
    assert compile_enabled(), f"unset {ENV_VAR} to run this test"
    assert _fused._has_triton(), "Triton is not usable here: the fused kernels run eagerly on this GPU"
    keys = torch.tensor([stream_key(0, i) for i in range(7)] + [-1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warning fails the test
        for shape, offset in [((4096,), 0), ((33, 1000), 12345), (((1 << 20) + 3,), 5)]:
            for draw in (random_bits, uniform):
                on_cuda = draw(keys.cuda(), shape, offset=offset)
                assert torch.equal(on_cuda.cpu(), draw(keys, shape, offset=offset)), (draw, shape)
        stack = torch.rand(3, 300, 170, generator=torch.Generator().manual_seed(5)) < 0.2
        for precision in ("exact", "bf16", "tf32"):
            ch_scores(stack.cuda(), "CH3.1_L3n", precision=precision)
        scores = torch.rand(4, 5000, device="cuda")
        chosen = select_rows(scores, [10, 500, 0, 4999], mode="soft", temperature=9.0, streams=[1, 2, 3, 4])
        assert chosen.sum(1).tolist() == [10, 500, 0, 4999]
    device = torch.device("cuda")
    assert rng._BITS_TILE.verified(device) and rng._UNIFORM_TILE.verified(device)
    if link_prediction._has_bf16_fp32_matmul(device):
        assert link_prediction._WEIGHT_PARTS["split"].verified(device)
        assert link_prediction._WEIGHT_PARTS["bf16"].verified(device)
    assert link_prediction._WEIGHT_PARTS["fp32"].verified(device)
    assert sampling._SOFT_KEYS.verified(device)
