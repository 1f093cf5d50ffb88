"""A counter-based random stream whose bits are the same on every device (docs/DESIGN.md, Randomness).

``torch.Generator`` streams differ between CPU and CUDA, and a generator's draws depend on how many came
before. Here draw ``i`` of the stream with key ``k`` is a pure function ``hash(k, i)`` computed with 64-bit
integer arithmetic on int64 tensors (wrap-around multiplication, xor and logical shifts), so:

- the bits are identical on CPU and CUDA (no floating-point operation is involved: a uniform is a 24-bit
  integer times 2**-24, exact in float32);
- a stream's values do not depend on which other streams are drawn with it, nor on their order
  (``uniform(torch.tensor([a, b]), n)[1]`` equals ``uniform(b, n)``), nor on the tile size;
- any stretch of a stream can be drawn alone (``offset``), so a large draw can be split into pieces.

Each stream is SplitMix64 (Steele, Lea and Flood, 2014) with its own start and increment derived from the
key: draw ``i`` is ``mix64(start_k + (i + 1) * gamma_k)``. Keys come from :func:`stream_key`, a stable hash
of what the stream is for (seed, step, layer, phase), so the streams of a run do not depend on the rank,
the batching of layers, or what was drawn before.

On a GPU the whole chain from counter to output is one fused elementwise function, compiled into one
kernel that writes the output directly (``hf_chts.topology._fused``: checked against its eager form on
first use, eager int64 tensor ops over bounded tiles where compiling is off or fails). On a CPU the
same integers are computed with NumPy's uint64 arithmetic on cache-sized tiles of the output, in place
(logical shifts are native there, and NumPy's per-call cost is a fraction of a dispatched op): about 3x
faster than the int64 tensor ops and faster than ``torch.rand`` (docs/DESIGN.md, Randomness).

Example:
    >>> key = stream_key(0, "init", "model.layers.0.mlp.up_proj")
    >>> u = uniform(key, (4, 8))  # float32 in [0, 1), the same on every device
    >>> both = uniform(torch.tensor([key, key + 1]), (4, 8))  # a batch of two streams: shape (2, 4, 8)
    >>> torch.equal(both[0], u)
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._fused import FusedFunction

__all__ = ["random_bits", "stream_key", "uniform"]

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 with the same bits (torch takes scalars as signed int64)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64's output mix ("variant 13" of Stafford's MurmurHash3 finaliser) and its gamma derivation.
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))
_GAMMA_MIX = (_signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53))
_ALTERNATING = _signed(0xAAAAAAAAAAAAAAAA)
# Elements per tile: small on CPU (a tile's three temporaries stay in cache), large elsewhere: eager int64
# ops (and the eager check of the fused kernel's first call) keep their temporaries at ~3 x 512 MB; the
# checked fused kernel has none and writes its output directly, up to 2**30 elements per kernel (int32
# indices stay valid).
_TILE_CPU = 1 << 15
_TILE_DEVICE = 1 << 26
_TILE_FUSED = 1 << 30
_MIX_U64 = tuple(np.uint64(m & _MASK64) for m in _MIX)


def stream_key(seed: int, *keys: Any) -> int:
    """A stable 63-bit key for the stream identified by ``(seed, *keys)``.

    The key is the first 8 bytes of the SHA-256 of ``repr((seed, *keys))``: the same in every process, on
    every machine, and unrelated for different tuples. Use values with a stable ``repr`` (ints, strings).

    Args:
        seed (`int`): the run's seed.
        *keys: what the stream is for, e.g. ``(step, layer_name, "regrow")``.

    Returns:
        `int` in ``[0, 2**63)``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_bits(
    keys: int | torch.Tensor,
    shape: int | Sequence[int],
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random 63-bit integers from the streams ``keys``, identical on every device.

    Args:
        keys (`int` or `torch.Tensor`): one stream key (an int, taken modulo 2**64), or an int64 tensor of
            shape `(B,)` of keys (any bit pattern), one stream per entry.
        shape (`int` or `tuple[int, ...]`): the shape drawn from each stream; draws fill it in row-major
            order (draw ``offset + i`` lands at flat position ``i``).
        offset (`int`, *optional*, defaults to 0): index of the first draw in the stream.
        device (`torch.device` or `str`, *optional*): where to compute; defaults to the keys' device (CPU
            for an int key).

    Returns:
        `torch.Tensor`: int64 in ``[0, 2**63)`` of shape ``shape`` for an int key, ``(B, *shape)`` for a
        tensor of keys. Comparisons of these integers are exact everywhere, so they make tie-free
        selection keys (a collision has probability ~``n**2 / 2**64``).
    """
    return _draw(keys, shape, offset, device, uniform_float=False)


def uniform(
    keys: int | torch.Tensor,
    shape: int | Sequence[int],
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform float32 draws in ``[0, 1)`` from the streams ``keys``, identical on every device.

    Each value is ``j * 2**-24`` for a uniform integer ``j`` in ``[0, 2**24)``: the 24 highest bits of the
    matching :func:`random_bits` draw (``uniform(k, n) == (random_bits(k, n) >> 39) * 2**-24``). 0.0 occurs
    (probability 2**-24), 1.0 never.

    Args:
        keys (`int` or `torch.Tensor`): as in :func:`random_bits`.
        shape (`int` or `tuple[int, ...]`): as in :func:`random_bits`.
        offset (`int`, *optional*, defaults to 0): as in :func:`random_bits`.
        device (`torch.device` or `str`, *optional*): as in :func:`random_bits`.

    Returns:
        `torch.Tensor`: float32 of shape ``shape`` (int key) or ``(B, *shape)`` (tensor of keys).
    """
    return _draw(keys, shape, offset, device, uniform_float=True)


# ------------------------------------------------------------------------------------------ internals
def _draw(keys, shape, offset, device, *, uniform_float: bool) -> torch.Tensor:
    shape = _check_shape(shape)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 1 << 62:
        raise ValueError(f"`offset` must be an integer in [0, 2**62), got {offset!r}.")
    key_tensor, batched = _check_keys(keys, device)
    dev = key_tensor.device
    n = 1
    for size in shape:
        n *= size
    if offset + n > 1 << 62:
        raise ValueError(f"A stream holds 2**62 draws; `offset` + draws = {offset + n} is beyond that.")
    out_dtype = torch.float32 if uniform_float else torch.int64
    if key_tensor.numel() * n == 0 or dev.type == "cpu":
        out = torch.empty((key_tensor.numel(), n), dtype=out_dtype, device=dev)
    if key_tensor.numel() * n:
        start = _mix64(key_tensor.clone())[:, None]
        gamma = _gamma(key_tensor)[:, None]
        if dev.type == "cpu":
            _fill_host(out, start, gamma, offset, uniform_float, _TILE_CPU)
        else:
            tile = _device_tile(dev, uniform_float)
            out = _draw_tiles(start, gamma, n, offset, uniform_float, tile)
    out = out.view(key_tensor.numel(), *shape)
    return out if batched else out[0]


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"`shape` must be a non-negative int or a tuple of them, got {shape!r}.")
    return tuple(shape)


def _check_keys(keys, device) -> tuple[torch.Tensor, bool]:
    if isinstance(keys, torch.Tensor):
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise ValueError(
                f"`keys` must be an int or an int64 tensor of shape (B,), got a {keys.dtype} tensor of "
                f"shape {tuple(keys.shape)}; build it with torch.tensor([...], dtype=torch.int64)."
            )
        return (keys if device is None else keys.to(device)), True
    if isinstance(keys, bool) or not isinstance(keys, int):
        raise ValueError(
            f"`keys` must be an int (see stream_key) or an int64 tensor of shape (B,), got {keys!r}."
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # torch.full passes the key to a fill kernel; torch.tensor(..., device=cuda) would copy it from the host,
    # and that copy waits for the device's queue.
    return torch.full((1,), _signed(keys), dtype=torch.int64, device=dev), False


def _shift_right(z: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Logical ``z >> bits`` of int64 bit patterns (torch's ``>>`` on int64 is arithmetic)."""
    out = torch.bitwise_right_shift(z, bits, out=out) if out is not None else z >> bits
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def _xorshift_(z: torch.Tensor, bits: int, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """``z ^= z >>> bits`` in place."""
    return z.bitwise_xor_(_shift_right(z, bits, out=tmp))


def _mix64(z: torch.Tensor, tmp: torch.Tensor | None = None, *, full: bool = True) -> torch.Tensor:
    """SplitMix64's output function, in place. ``full=False`` skips the last xorshift, which leaves the
    33 highest bits unchanged (enough for a 24-bit uniform)."""
    _xorshift_(z, 30, tmp).mul_(_MIX[0])
    _xorshift_(z, 27, tmp).mul_(_MIX[1])
    return _xorshift_(z, 31, tmp) if full else z


def _popcount(x: torch.Tensor) -> torch.Tensor:
    x = x - _shift_right(x, 1).bitwise_and_(0x5555555555555555)
    x = x.bitwise_and(0x3333333333333333) + _shift_right(x, 2).bitwise_and_(0x3333333333333333)
    x = (x + _shift_right(x, 4)).bitwise_and_(0x0F0F0F0F0F0F0F0F)
    return _shift_right(x * 0x0101010101010101, 56)


def _gamma(keys: torch.Tensor) -> torch.Tensor:
    """SplitMix64's ``mixGamma``: an odd increment per stream with enough bit transitions."""
    z = keys.add(_GOLDEN)
    _xorshift_(z, 33).mul_(_GAMMA_MIX[0])
    _xorshift_(z, 33).mul_(_GAMMA_MIX[1])
    z = _xorshift_(z, 33).bitwise_or_(1)
    weak = _popcount(z ^ _shift_right(z, 1)) < 24
    return torch.where(weak, z ^ _ALTERNATING, z)


def _device_tile(device: torch.device, uniform_float: bool) -> int:
    """Elements per tile off the CPU: the whole draw where the checked fused kernel runs (it has no
    temporaries), else bounded (eager ops, and the eager check of the kernel's first call)."""
    fused = _UNIFORM_TILE if uniform_float else _BITS_TILE
    return _TILE_FUSED if fused.verified(device) else _TILE_DEVICE


def _stream(base: torch.Tensor, gamma: torch.Tensor, cols: int, full: bool) -> torch.Tensor:
    """``mix64(base + i * gamma)`` for ``i < cols`` (``full=False``: without the last xorshift), out of
    place: ``base`` and ``gamma`` (rows, 1) int64 -> (rows, cols)."""
    z = base + torch.arange(cols, dtype=torch.int64, device=base.device) * gamma
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX[0]  # torch's >> on int64 is arithmetic: mask after it
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX[1]
    return z ^ ((z >> 31) & ((1 << 33) - 1)) if full else z


def _bits_tile(base: torch.Tensor, gamma: torch.Tensor, cols: int) -> torch.Tensor:
    """One tile of :func:`random_bits`: the stream's 63 high bits, int64 (rows, cols)."""
    return (_stream(base, gamma, cols, True) >> 1) & ((1 << 63) - 1)


def _uniform_tile(base: torch.Tensor, gamma: torch.Tensor, cols: int) -> torch.Tensor:
    """One tile of :func:`uniform`: the top 24 bits times 2**-24 (exact), float32 (rows, cols)."""
    top = (_stream(base, gamma, cols, False) >> 40) & ((1 << 24) - 1)
    return top.to(torch.float32) * 2.0**-24


# The whole chain from counter to output as one kernel on a GPU (compiled, checked against eager once).
_BITS_TILE = FusedFunction(_bits_tile)
_UNIFORM_TILE = FusedFunction(_uniform_tile)


def _tile(start, gamma, r0: int, r1: int, first: int, cols: int, uniform_float: bool) -> torch.Tensor:
    """Draws ``first + 1 .. first + cols`` of streams ``r0 .. r1 - 1``: one call of the fused function.

    Wrap-around arithmetic is associative, so ``start + (first + 1 + i) * gamma`` is summed as
    ``(start + (first + 1) * gamma) + i * gamma``. Both operands are fresh tensors, not views: the compiled
    kernel's guards on a view's base would otherwise recompile it for each kind of slice.
    """
    base = start[r0:r1] + gamma[r0:r1] * (first + 1)
    fused = _UNIFORM_TILE if uniform_float else _BITS_TILE
    return fused(base, gamma[r0:r1].clone(), cols)


def _fill_tiles(out, start, gamma, offset: int, uniform_float: bool, tile: int) -> None:
    """``out[b, i] = mix64(start[b] + (offset + i + 1) * gamma[b])`` (a uniform or 63 bits of it) tile by
    tile (any device)."""
    batch, n = out.shape
    cols = max(1, min(n, tile // batch))
    rows = max(1, min(batch, tile // cols))
    for r0 in range(0, batch, rows):
        r1 = min(r0 + rows, batch)
        for c0 in range(0, n, cols):
            c1 = min(c0 + cols, n)
            out[r0:r1, c0:c1] = _tile(start, gamma, r0, r1, offset + c0, c1 - c0, uniform_float)


def _draw_tiles(start, gamma, n: int, offset: int, uniform_float: bool, tile: int) -> torch.Tensor:
    """The ``(B, n)`` draws off the CPU: one tile is the output itself; more are written into one."""
    batch = start.shape[0]
    if batch * n <= tile:
        return _tile(start, gamma, 0, batch, offset, n, uniform_float)
    out = torch.empty((batch, n), dtype=torch.float32 if uniform_float else torch.int64, device=start.device)
    _fill_tiles(out, start, gamma, offset, uniform_float, tile)
    return out


def _fill_host(out, start, gamma, offset: int, uniform_float: bool, tile: int) -> None:
    """:func:`_fill_tiles` for a CPU tensor: NumPy uint64 arithmetic (wrap-around, logical shifts) on tiles of
    ``out``, written in place; the same integers as :func:`_fill_tiles`."""
    batch, n = out.shape
    cols = max(1, min(n, tile))
    rows = max(1, min(batch, tile // cols))
    dest = out.numpy() if uniform_float else out.numpy().view(np.uint64)
    start = start.reshape(-1).numpy().view(np.uint64)
    gamma = gamma.reshape(-1).numpy().view(np.uint64)
    counter = np.arange(offset + 1, offset + 1 + cols, dtype=np.uint64)
    z = np.empty((rows, cols), dtype=np.uint64)
    tmp = np.empty_like(z)
    steps = np.empty((rows, cols), dtype=np.uint64)
    for r0 in range(0, batch, rows):
        r1 = min(r0 + rows, batch)
        g, base = gamma[r0:r1, None], start[r0:r1, None].copy()
        stride = g * np.uint64(cols)
        ss = steps[: r1 - r0]
        np.multiply(counter, g, out=ss)  # (i + 1) * gamma for the first tile's columns
        for c0 in range(0, n, cols):
            width = min(cols, n - c0)
            zz, tt = z[: r1 - r0, :width], tmp[: r1 - r0, :width]
            np.add(ss[:, :width], base, out=zz)
            np.right_shift(zz, 30, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, _MIX_U64[0], out=zz)
            np.right_shift(zz, 27, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, _MIX_U64[1], out=zz)
            target = dest[r0:r1, c0 : c0 + width]
            if uniform_float:  # the top 24 bits (unchanged by the last xorshift) times 2**-24, exact
                np.right_shift(zz, 40, out=tt)
                np.multiply(tt, 2.0**-24, out=target, casting="unsafe")
            else:
                np.right_shift(zz, 31, out=tt)
                np.bitwise_xor(zz, tt, out=zz)
                np.right_shift(zz, 1, out=target)
            np.add(base, stride, out=base)
