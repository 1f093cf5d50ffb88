"""Tests of hf_chts.topology.rng: a counter-based random stream with the same bits on every device."""

from __future__ import annotations

import math

import pytest
import torch

from hf_chts.engine import derive_generator
from hf_chts.topology import rng
from hf_chts.topology.rng import random_bits, stream_key, uniform

M64 = (1 << 64) - 1


# A plain-Python statement of the stream (SplitMix64 per key), to check the tensor code bit for bit.
def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _gamma(k: int) -> int:
    z = (k + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 33)) * 0xFF51AFD7ED558CCD) & M64
    z = ((z ^ (z >> 33)) * 0xC4CEB9FE1A85EC53) & M64
    z = (z ^ (z >> 33)) | 1
    if bin(z ^ (z >> 1)).count("1") < 24:
        z ^= 0xAAAAAAAAAAAAAAAA
    return z


def reference_bits(key: int, n: int, offset: int = 0) -> list[int]:
    key &= M64
    start, gamma = _mix(key), _gamma(key)
    return [_mix((start + (offset + i + 1) * gamma) & M64) >> 1 for i in range(n)]


# ------------------------------------------------------------------------------------ exact values
@pytest.mark.parametrize("key", [0, 1, 2, 12345, (1 << 63) - 1, (1 << 64) - 1, -7])
def test_bits_match_the_plain_python_statement(key):
    assert random_bits(key, 300, offset=11).tolist() == reference_bits(key, 300, offset=11)


def test_uniform_is_the_top_24_bits():
    keys = torch.tensor([3, stream_key(1, 2), -5])
    bits, u = random_bits(keys, (7, 90)), uniform(keys, (7, 90))
    assert u.dtype == torch.float32 and u.shape == (3, 7, 90)
    assert torch.equal(u, (bits >> 39).to(torch.float32) * 2.0**-24)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert bits.dtype == torch.int64 and bool((bits >= 0).all())


def test_stream_key_is_the_engine_seed_hash():
    # The same stable SHA-256 key the engine's torch generators are seeded with.
    for keys in [(0,), (7, "init", "fc1"), (3, 150, "model.layers.0.mlp.up_proj", "regrow")]:
        assert stream_key(*keys) == derive_generator(*keys).initial_seed()
        assert 0 <= stream_key(*keys) < 2**63
    assert stream_key(0, "a") != stream_key(0, "b") != stream_key(1, "a")


# ------------------------------------------------------------------------------------ composition
def test_values_do_not_depend_on_batch_composition_or_position():
    a, b, c = stream_key(0, "a"), stream_key(0, "b"), stream_key(0, "c")
    alone = uniform(b, (5, 33))
    for batch in ([a, b], [b, a, c], [c, c, b, a]):
        drawn = uniform(torch.tensor(batch), (5, 33))
        assert torch.equal(drawn[batch.index(b)], alone)
    assert torch.equal(uniform(torch.tensor([a, b]), 40)[1], uniform(b, 40))


def test_values_do_not_depend_on_tiling(monkeypatch):
    keys = torch.tensor([stream_key(0, i) for i in range(5)])
    whole = random_bits(keys, 300)
    for tile in (1, 7, 64, 299, 4096):
        monkeypatch.setattr(rng, "_TILE_CPU", tile)
        assert torch.equal(random_bits(keys, 300), whole), tile
        assert torch.equal(uniform(keys, (3, 100), offset=5).view(5, -1), uniform(keys, 300, offset=5)), tile


@pytest.mark.parametrize("uniform_float", [False, True], ids=["bits", "uniform"])
def test_tensor_tiles_match_the_cpu_path(uniform_float):
    # Off the CPU the stream runs as int64 tensor ops (rng._fill_tiles); on a CPU through NumPy. Both give
    # the same integers, whatever the tile; checked here on CPU tensors, so the device code runs in CI.
    keys = torch.tensor([stream_key(0, i) for i in range(5)] + [-1, 0])
    start, gamma = rng._mix64(keys.clone())[:, None], rng._gamma(keys)[:, None]
    expected = (uniform if uniform_float else random_bits)(keys, 300, offset=9)
    for tile in (1, 7, 64, 299, 4096):
        out = torch.empty(7, 300, dtype=expected.dtype)
        rng._fill_tiles(out, start, gamma, 9, uniform_float, tile)
        assert torch.equal(out, expected), tile


def test_offset_continues_the_stream():
    key = stream_key(4, "x")
    full = uniform(key, 500)
    assert torch.equal(uniform(key, 200, offset=300), full[300:])
    assert torch.equal(torch.cat([uniform(key, 123), uniform(key, 377, offset=123)]), full)


def test_shapes_and_empty_draws():
    assert uniform(1, ()).shape == ()
    assert uniform(1, 0).shape == (0,)
    assert uniform(torch.tensor([1, 2]), (0, 4)).shape == (2, 0, 4)
    assert uniform(torch.empty(0, dtype=torch.int64), 5).shape == (0, 5)
    assert torch.equal(uniform(9, (3, 4)).reshape(-1), uniform(9, 12))


# ------------------------------------------------------------------------------------ statistics
def test_uniformity_chi_square_and_ks():
    n, bins = 200_000, 256
    for key in (0, 1, stream_key(0, "init", "fc")):
        u = uniform(key, n).double()
        counts = torch.bincount((u * bins).long(), minlength=bins).double()
        chi2 = float(((counts - n / bins) ** 2 / (n / bins)).sum())
        assert chi2 < 350.0, (key, chi2)  # 255 degrees of freedom: P(chi2 > 350) ~ 1e-4
        x = u.sort().values
        grid = torch.arange(1, n + 1, dtype=torch.float64) / n
        ks = float(torch.maximum(grid - x, x - (grid - 1.0 / n)).max()) * math.sqrt(n)
        assert ks < 1.95, (key, ks)  # P(KS > 1.95) ~ 1e-3


def test_successive_draws_and_every_bit_are_balanced():
    n = 100_000
    bits = random_bits(stream_key(2, "bits"), n)
    means = ((bits[:, None] >> torch.arange(63)) & 1).double().mean(0)
    assert float((means - 0.5).abs().max()) < 5 * math.sqrt(0.25 / n), means
    # Pairs of successive uniforms fill a 16 x 16 grid evenly (no serial structure).
    u = uniform(stream_key(2, "pairs"), 2 * n)
    cell = (u[0::2] * 16).long() * 16 + (u[1::2] * 16).long()
    counts = torch.bincount(cell, minlength=256).double()
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
    assert chi2 < 350.0, chi2


def test_different_keys_are_independent():
    n = 100_000
    keys = torch.tensor([0, 1, 2, 3, stream_key(0, "a"), stream_key(0, "b")])
    u = uniform(keys, n).double()
    corr = torch.corrcoef(u)
    off_diagonal = corr[~torch.eye(len(keys), dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < 4.5 / math.sqrt(n)
    # Consecutive keys do not give shifted copies of one stream.
    bits = random_bits(torch.tensor([10, 11]), 4096)
    assert len(set(bits[0].tolist()) & set(bits[1].tolist())) == 0


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "keys",
    [1.5, True, "7", torch.tensor([1, 2], dtype=torch.int32), torch.tensor([[1, 2]]), torch.tensor(3)],
    ids=["float", "bool", "str", "int32", "2d", "0d"],
)
def test_bad_keys(keys):
    with pytest.raises(ValueError, match="keys"):
        uniform(keys, 4)


@pytest.mark.parametrize("shape", [-1, (3, -2), 2.0, (True,), "4"])
def test_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        random_bits(1, shape)


@pytest.mark.parametrize("offset", [-1, 1.0, 1 << 62])
def test_bad_offset(offset):
    with pytest.raises(ValueError, match="offset"):
        uniform(1, 4, offset=offset)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        stream_key("0", "a")


# ------------------------------------------------------------------------------------ devices
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_bits_are_identical():
    keys = torch.tensor([stream_key(0, i) for i in range(7)] + [-1, 0, 1])
    for shape, offset in [((4096,), 0), ((33, 1000), 12345), ((), 7)]:
        cpu = random_bits(keys, shape, offset=offset)
        cuda = random_bits(keys.cuda(), shape, offset=offset)
        assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)
        assert torch.equal(
            uniform(keys, shape, offset=offset, device="cuda").cpu(), uniform(keys, shape, offset=offset)
        )
    # A draw larger than one device tile, and an int key placed with `device`.
    big = uniform(stream_key(1, "big"), (1 << 26) + 5, device="cuda")
    assert torch.equal(big.cpu(), uniform(stream_key(1, "big"), (1 << 26) + 5))
