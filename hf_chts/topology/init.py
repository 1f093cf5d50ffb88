"""Initial sparse topologies (docs/method.md section 1) and the per-layer density allocation.

Every model returns a boolean mask of shape ``(n_out, n_in)`` with exactly ``link_count(shape, density)``
links, ``mask[a, j] = True`` being a link from input neuron ``j`` to output neuron ``a``. All random choices
come from the counter-based streams of one key (:mod:`hf_chts.topology.rng`), and every selection compares
exactly computed values with ties broken by a random permutation of the positions, so the same key gives
the same mask on every device (docs/DESIGN.md, Randomness). Everything is vectorised: there is no Python
loop over neurons, only over fixed-size chunks of rows so that peak memory stays bounded on the largest
layers (a LLaMA-7B MLP layer has 45M positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._validation import check_choice, check_fraction, check_shape_2d, link_count
from . import rng

__all__ = ["DEGREE_DISTRIBUTIONS", "DENSITY_DISTRIBUTIONS", "INIT_METHODS", "allocate_densities", "init_mask"]

INIT_METHODS = ("er", "brf", "bsw", "bsf", "csti")
_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "er": {},
    "brf": {"r": 0.3, "degree_dist": "uniform"},
    "bsw": {"beta": 0.1},
    "bsf": {},
}
DEGREE_DISTRIBUTIONS = ("fixed", "uniform")
DENSITY_DISTRIBUTIONS = ("uniform", "erk")

# Entries of one chunk of a dense (rows x n) working matrix: bounds the temporaries of BRF and BSW
# (keys, sort values and indices: ~20 bytes per entry, i.e. ~80 MB per chunk).
_CHUNK_ENTRIES = 1 << 22
# BRF's chunks are larger (~12 bytes per entry in flight, ~100 MB): on CPU its cost is dominated by the
# number of passes, and fewer, larger chunks halve the per-operation overhead of the loop.
_BRF_CHUNK_ENTRIES = 1 << 23
# Elements per tile of the exactly rounded log on CPU (its temporaries stay in cache).
_CPU_TILE = 1 << 14


def init_mask(
    shape: Sequence[int],
    density: float,
    method: str = "brf",
    *,
    generator: torch.Generator | None = None,
    key: int | None = None,
    device: torch.device | str | None = None,
    **params: Any,
) -> torch.Tensor:
    """Build an initial sparse topology with exactly ``round(density * n_out * n_in)`` links.

    Methods (docs/method.md section 1):

    - ``"er"``: a uniformly random subset of the positions (Erdos-Renyi).
    - ``"brf"``: bipartite receptive field. The smaller side's neurons sit on a ring over the larger side,
      source ``i`` centred at ``floor(i * n_l / n_s)``; each draws its ``K_i`` targets without replacement
      with probability proportional to ``(1 + ring_distance) ** -((1 - r) / r)`` (``r = 0``: its ``K_i``
      nearest targets, ties broken at random; ``r = 1``: uniform). Params: ``r`` (float in [0, 1], default
      0.3), ``degree_dist`` (``"fixed"``: every ``K_i`` is the floor or ceil of the mean; ``"uniform"``:
      one link each, the rest spread by a multinomial capped at ``n_l``, the overflow handed to sources
      with room; with fewer links than sources, one link to each of a random subset; default
      ``"uniform"``).
    - ``"bsw"``: bipartite small world. A ring lattice where each neuron of the larger side links a
      contiguous window of the smaller side centred at its proportional position (degrees floor/ceil of the
      mean), then each link moves with probability ``beta`` to a uniformly random empty position. The
      moved links land on positions empty in the lattice; only when there are fewer of those than moved
      links (density above 0.5) may they also land on vacated positions. Param: ``beta`` (float in [0, 1],
      default 0.1).
    - ``"bsf"``: bipartite scale-free. Barabasi-Albert preferential attachment in its expected-degree form:
      the ``n_out + n_in`` nodes arrive in a random order and node number ``t`` (1-based) gets weight
      ``t ** -0.5``, the expected degree of a BA node; exactly the budget of links is then drawn without
      replacement with probability proportional to the product of the end points' weights (a Chung-Lu
      graph, sampled by Gumbel-top-k). Degrees follow a power law (exponent ~3), capped by the layer size.
    - ``"csti"``: correlated sparse topological initialisation, the top ``|Pearson correlation|`` of the
      input features on calibration inputs (:func:`hf_chts.topology.csti.csti_mask`). Param: ``inputs``
      (samples x features; required) or a precomputed ``correlation``.

    Args:
        shape (`tuple[int, int]`): ``(n_out, n_in)`` of the weight (``nn.Linear`` layout).
        density (`float`): fraction of links to keep, in (0, 1], as SparseTrainingConfig checks (not checked
            again here).
        method (`str`, *optional*, defaults to `"brf"`): one of ``"er"``, ``"brf"``, ``"bsw"``, ``"bsf"``,
            ``"csti"``.
        generator (`torch.Generator`, *optional*): draws the stream key (one 63-bit integer) when ``key``
            is not given. Without either, the key comes from torch's default RNG.
        key (`int`, *optional*): the stream key (e.g. :func:`hf_chts.topology.rng.stream_key` of the seed
            and the layer). Every random choice derives from it, so one key gives the same mask on every
            device. Give ``generator`` or ``key``, not both.
        device (`torch.device` or `str`, *optional*): where the mask is drawn and returned (default: the
            generator's device, else CPU). It does not change the mask.
        **params: the method's parameters listed above.

    Returns:
        `torch.Tensor`: boolean mask of shape ``(n_out, n_in)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = init_mask((768, 2048), 0.3, "brf", r=0.3, generator=g)
        >>> int(mask.sum()) == round(0.3 * 768 * 2048)
        True
    """
    if method == "csti":  # data-driven (calibration inputs): hf_chts.topology.csti
        from .csti import csti_init

        return csti_init(shape, density, generator=generator, key=key, device=device, **params)
    n_out, n_in = check_shape_2d(shape)
    check_choice("init method", method, INIT_METHODS)
    opts = _resolve_params(method, params)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
    if key is not None:
        if generator is not None:
            raise ValueError("Give `generator` or `key`, not both: the key alone decides the mask.")
        if isinstance(key, bool) or not isinstance(key, int):
            raise ValueError(f"`key` must be an int (see hf_chts.topology.rng.stream_key), got {key!r}.")
    else:
        # One 63-bit key from the generator (or torch's default RNG); everything else from the key.
        dev = generator.device if generator is not None else "cpu"
        key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=dev).item())
    if device is None:
        device = generator.device if generator is not None else "cpu"
    stream = _Stream(key, torch.device(device))
    n_links = link_count((n_out, n_in), density)
    if method == "er":
        return _er(n_out, n_in, n_links, stream)
    if method == "brf":
        return _brf(n_out, n_in, n_links, opts["r"], opts["degree_dist"], stream)
    if method == "bsw":
        return _bsw(n_out, n_in, n_links, opts["beta"], stream)
    return _bsf(n_out, n_in, n_links, stream)


def allocate_densities(
    shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]],
    density: float,
    distribution: str = "uniform",
) -> list[float] | dict[str, float]:
    """Split a global density over layers (docs/method.md section 4, per-layer allocation).

    ``"uniform"`` gives every layer ``density``. ``"erk"`` (Erdos-Renyi-Kernel) gives layer ``l`` a density
    proportional to ``(n_in + n_out) / (n_in * n_out)``, scaled so that the layers together hold
    ``density * sum(n_out * n_in)`` links; a layer that would exceed 1 is capped at 1 (dense) and its excess
    is spread over the uncapped layers, repeating until none exceeds 1.

    Args:
        shapes (`list[tuple[int, int]]` or `dict[str, tuple[int, int]]`): the ``(n_out, n_in)`` of each layer.
        density (`float`): global density in (0, 1], as SparseTrainingConfig checks (not checked again here).
        distribution (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"erk"``.

    Returns:
        `list[float]` in the order of ``shapes`` (a `dict` with the same keys when ``shapes`` is a mapping).

    Example:
        >>> allocate_densities([(768, 768), (2048, 768)], 0.1, "erk")  # the smaller layer gets more
        [0.1294..., 0.0889...]
    """
    check_choice("density distribution", distribution, DENSITY_DISTRIBUTIONS)
    names = list(shapes) if isinstance(shapes, Mapping) else None
    shape_list = [check_shape_2d(s) for s in (shapes.values() if isinstance(shapes, Mapping) else shapes)]
    if distribution == "uniform" or density == 1.0:
        out = [density] * len(shape_list)
    else:
        sizes = [n_out * n_in for n_out, n_in in shape_list]
        raw = [(n_out + n_in) / (n_out * n_in) for n_out, n_in in shape_list]
        budget = density * sum(sizes)
        dense: set[int] = set()
        while True:
            free = [i for i in range(len(sizes)) if i not in dense]
            scale = (budget - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in free)
            # Capping only raises the scale of the rest, so a capped layer never needs to be un-capped.
            newly = {i for i in free if scale * raw[i] > 1.0}
            if not newly:
                break
            dense |= newly
        out = [1.0 if i in dense else scale * raw[i] for i in range(len(sizes))]
    return dict(zip(names, out, strict=True)) if names is not None else out


# ------------------------------------------------------------------------------------------- helpers
def _resolve_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    defaults = _DEFAULT_PARAMS[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(map(repr, defaults)) if defaults else "none"
        raise ValueError(
            f"Unknown parameter(s) {', '.join(map(repr, unknown))} for init method {method!r}; "
            f"valid parameters are: {valid}."
        )
    opts = {**defaults, **params}
    if method == "brf":
        opts["r"] = check_fraction(opts["r"], "r")
        check_choice("degree_dist", opts["degree_dist"], DEGREE_DISTRIBUTIONS)
    elif method == "bsw":
        opts["beta"] = check_fraction(opts["beta"], "beta")
    return opts


class _Stream:
    """The random draws of one mask: the counter-based streams of ``(key, phase)`` (:mod:`.rng`)."""

    def __init__(self, key: int, device: torch.device) -> None:
        self.key, self.device = key, device

    def phase_key(self, phase: Any) -> int:
        return rng.stream_key(self.key, phase)

    def uniform(self, phase: Any, shape: int | tuple[int, ...], offset: int = 0) -> torch.Tensor:
        return rng.uniform(self.phase_key(phase), shape, offset=offset, device=self.device)

    def bits(self, phase: Any, shape: int | tuple[int, ...], offset: int = 0) -> torch.Tensor:
        return rng.random_bits(self.phase_key(phase), shape, offset=offset, device=self.device)

    def tiebreak(self, phase: Any, n: int) -> torch.Tensor:
        """Distinct int64 values in ``[0, 2**32)`` for positions ``0..n-1`` (``n <= 2**32``): a random affine
        permutation ``(i * a + b) mod 2**32``, so that exact ties among keys do not always favour one side."""
        if n > 1 << 32:
            raise ValueError(f"A selection over {n} positions is beyond the supported 2**32.")
        k = self.phase_key(phase)
        a, b = (k & ((1 << 31) - 1)) | 1, (k >> 31) & ((1 << 32) - 1)
        return torch.arange(n, device=self.device).mul_(a).add_(b).bitwise_and_((1 << 32) - 1)


def _f32(value: float) -> float:
    """``value`` rounded to float32, so that every device multiplies by exactly the same constant."""
    return float(torch.tensor(value, dtype=torch.float32))


_LN2 = _f32(math.log(2.0))
# log m = 2 atanh(s) = sum_k 2 s^(2k+1) / (2k+1), s = (m - 1) / (m + 1); for m in [0.5, 1), |s| <= 1/3 and
# seven terms leave a truncation error below 2e-8 (float32's ulp at 0.69 is 6e-8).
_ATANH_SERIES = [_f32(2.0 / (2 * k + 1)) for k in range(7)]


def _log(x: torch.Tensor) -> torch.Tensor:
    """Natural log of a positive float32 tensor from exactly rounded operations only.

    ``torch.log`` may differ by an ulp between CPU and CUDA; ``frexp``, ``+``, ``*`` and ``/`` are exactly
    rounded (IEEE 754) everywhere, and each runs as its own kernel here (no fused multiply-add), so this gives
    the same bits on every device. Accurate to a few float32 ulps (absolute ~1e-7 just above 1). On CPU it
    runs tile by tile so that its ~20 passes stay in cache.
    """
    if x.device.type != "cpu" or x.numel() <= _CPU_TILE:
        return _log_tile(x)
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _CPU_TILE):
        out[start : start + _CPU_TILE] = _log_tile(flat[start : start + _CPU_TILE])
    return out.view(x.shape)


def _log_tile(x: torch.Tensor) -> torch.Tensor:
    m, e = torch.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    s = m.sub_(1.0)
    s = s.div_(s + 2.0)  # (m - 1) / (m + 1)
    z = s * s
    poly = z * _ATANH_SERIES[-1]
    for coeff in reversed(_ATANH_SERIES[1:-1]):
        poly.add_(coeff).mul_(z)
    poly.add_(_ATANH_SERIES[0]).mul_(s)
    return e.to(torch.float32).mul_(_LN2).add_(poly)


def _exponential(u: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates ``-log(1 - u)`` (exact ``1 - u`` for the 24-bit uniforms of :mod:`.rng`), >= 0."""
    return _log(torch.sub(1.0, u)).neg_().clamp_(min=0.0)  # log(1) may round to -1e-8


def _sortable(
    keys: torch.Tensor, tiebreak: torch.Tensor, *, smallest: bool = False, signed: bool = True
) -> torch.Tensor:
    """Distinct int64 keys, largest first, in the order of the float32 ``keys`` (reversed if ``smallest``),
    exact ties ordered by ``tiebreak`` (distinct, < 2**32, broadcast against ``keys``).

    With every key distinct, a top-k picks the same set on every device (ties would be broken by the
    device's kernel). ``signed=False`` promises ``keys >= 0``, whose IEEE bits are already in order.
    """
    bits = keys.contiguous().view(torch.int32)
    if signed:
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # IEEE order as integers (negatives reversed)
    else:
        # -0.0 is the one negative bit pattern of keys >= 0 (an exponential variate of 0 is -log(1) = -0.0):
        # it sorts as +0.0. Left negative, `bits * -2**32` below would overflow int64, which devices resolve
        # differently.
        bits = bits.clamp(min=0)
    return torch.add(tiebreak, bits.to(torch.int64), alpha=-(1 << 32) if smallest else 1 << 32)


def _random_order(n: int, stream: _Stream, phase: Any) -> torch.Tensor:
    """A uniformly random permutation of ``0..n-1`` (sorting distinct random keys)."""
    keys = _sortable(stream.uniform(phase, n), stream.tiebreak(phase, n), signed=False)
    return torch.sort(keys).indices


def _top_k_flat(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape as ``keys``) of the ``k`` largest keys: exactly ``k`` even with ties."""
    flat = keys.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=keys.device)
    if k >= flat.numel():
        out.fill_(True)
    elif k > 0:
        out.index_fill_(0, torch.topk(flat, k, sorted=False).indices, True)  # no host copy of `True`
    return out.view(keys.shape)


def _rows_per_chunk(n_cols: int, entries: int | None = None) -> int:
    return max(1, (_CHUNK_ENTRIES if entries is None else entries) // max(n_cols, 1))


def _select_by_rank(
    keys: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row ``i`` of ``keys`` (rows x n), mark its ``counts[i]`` largest entries (a per-row top-k).

    No full sort: one ``topk`` with ``k = max(counts)`` picks a superset of every row's winners, then a small
    second ``topk`` over those picks drops, per row, the ``max(counts) - counts[i]`` weakest of them. Each
    row gets exactly ``counts[i]`` distinct entries and none of its unmarked keys beats a marked one (ties at
    the boundary are broken arbitrarily, as a sort would). When most entries win, the complement (the
    ``n - counts[i]`` smallest keys) is selected instead, which is the smaller ``topk``.
    """
    n = keys.shape[1]
    if out is None:
        out = torch.empty(keys.shape, dtype=torch.bool, device=keys.device)
    k_max, k_min = int(counts.max()), int(counts.min())
    largest, chosen = True, True
    if n - k_min < k_max:  # fewer losers than winners: pick the losers
        counts = n - counts
        k_max, k_min = n - k_min, n - k_max
        largest, chosen = False, False
    out.fill_(not chosen)
    if k_max == 0:
        return out
    vals, idx = torch.topk(keys, k_max, dim=1, largest=largest, sorted=False)
    out.scatter_(1, idx, chosen)
    extra = k_max - k_min
    if extra:
        # Per row, the `k_max - counts` weakest picks (first in this order) go back to unpicked.
        weakest = torch.topk(vals, extra, dim=1, largest=not largest, sorted=True).indices
        keep = torch.arange(extra, device=keys.device)[None, :] >= (k_max - counts)[:, None]
        out.scatter_(1, idx.gather(1, weakest), keep if chosen else ~keep)
    return out


def _er(n_out: int, n_in: int, n_links: int, stream: _Stream) -> torch.Tensor:
    n = n_out * n_in
    keys = _sortable(stream.uniform("er", n), stream.tiebreak("er", n), signed=False)
    return _top_k_flat(keys, n_links).view(n_out, n_in)


# --------------------------------------------------------------------------------------------- BRF
def _brf(n_out: int, n_in: int, n_links: int, r: float, degree_dist: str, stream: _Stream) -> torch.Tensor:
    # The smaller side S is the source side; with n_out == n_in the outputs are the sources.
    sources_are_rows = n_out <= n_in
    n_s, n_l = (n_out, n_in) if sources_are_rows else (n_in, n_out)
    dev = stream.device
    degrees = _source_degrees(n_s, n_l, n_links, degree_dist, stream)
    # The weight of target j for source i depends only on the ring offset (j - c_i) mod n_l: one profile
    # over the offsets, doubled so that every source's row is a contiguous window of it (no per-entry
    # distance arithmetic, only a row gather). Computed on the CPU (n_l values), so it is the same
    # everywhere whatever the device's log and exp.
    offset = torch.arange(n_l, dtype=torch.float64)
    dist = torch.minimum(offset, n_l - offset)
    alpha = (1.0 - r) / r if r > 0 else math.inf
    if r == 0:
        # Pure receptive field: keys distance plus a jitter in [0, 0.5) that breaks ties at random but
        # never reorders two different distances, smallest first.
        profile, mode = dist, "jitter"
    elif alpha == 0:
        profile, mode = None, "uniform"
    elif alpha * math.log1p(n_l // 2) <= 60.0:
        # Exponential race in linear form: target j fires at E_j / w_j = E_j * (1 + delta)^alpha, E ~ Exp(1);
        # the K_i earliest are an exact weighted sample without replacement (docs/method.md section 2c).
        # As keys: E * (1 + delta)^alpha = E / w, smallest first (the weight ratio fits float32).
        profile, mode = dist.log1p().mul_(alpha).exp_(), "race"
    else:
        # Same race, in log form (Gumbel-top-k) for weight ratios beyond float32: log w - log E.
        profile, mode = dist.log1p().mul_(-alpha), "gumbel"
    windows = w = None
    if profile is not None:
        doubled = profile.to(torch.float32).repeat(2).to(dev)
        windows = doubled.unfold(0, n_l, 1)  # windows[m] = profile[m : m + n_l]
    # Every source row has its own stream, so a row's draws do not depend on the chunking.
    row_keys = stream.bits("rows", n_s)
    tiebreak = stream.tiebreak("ties", n_l)
    # Rows in order of degree, so that a chunk's degrees are close and its top-k barely exceeds each K_i.
    order = torch.sort(degrees, stable=True).indices
    out = torch.empty(n_s, n_l, dtype=torch.bool, device=dev)
    step = _rows_per_chunk(n_l, _BRF_CHUNK_ENTRIES)
    picked = torch.empty(min(step, n_s), n_l, dtype=torch.bool, device=dev)
    for start in range(0, n_s, step):
        rows = order[start : start + step]
        m = rows.numel()
        k = rng.uniform(row_keys[rows], n_l)
        if windows is not None:
            shifts = (n_l - (rows * n_l) // n_s) % n_l  # row i is profile[(j - c_i) mod n_l]
            w = windows.index_select(0, shifts)
        if mode == "jitter":
            k = k.mul_(0.5).add_(w)  # distance + jitter, smallest first
        elif mode == "race":
            k = _exponential(k).mul_(w)  # E / w, smallest first
        elif mode == "gumbel":
            k = w - _log(_exponential(k).clamp_(min=2.0**-30))  # log w - log E, largest first
        w = None  # free the chunk's weights before the next chunk gathers its own
        keys = _sortable(k, tiebreak, smallest=mode != "gumbel", signed=mode == "gumbel")
        del k
        out.index_copy_(0, rows, _select_by_rank(keys, degrees[rows], picked[:m]))
    return out if sources_are_rows else out.t().contiguous()


def _source_degrees(n_s: int, n_l: int, n_links: int, degree_dist: str, stream: _Stream) -> torch.Tensor:
    """Degrees ``K_i`` of the ``n_s`` sources: sum exactly ``n_links``, each at most ``n_l``."""
    dev = stream.device
    if degree_dist == "fixed" or n_links <= n_s:
        # "fixed", or too few links to give every source one: floor/ceil of the mean, extras at random.
        base, extra = divmod(n_links, n_s)
        degrees = torch.full((n_s,), base, dtype=torch.int64, device=dev)
        if extra:
            degrees[_random_order(n_s, stream, "extra")[:extra]] += 1
        return degrees
    # "uniform": one link each, the rest spread uniformly at random (a multinomial), then capped at n_l.
    degrees = torch.ones(n_s, dtype=torch.int64, device=dev)
    _scatter_uniform(degrees, torch.arange(n_s, device=dev), n_links - n_s, stream, "spread")
    return _cap_degrees(degrees, n_l, stream)


def _scatter_uniform(
    counts: torch.Tensor, bins: torch.Tensor, total: int, stream: _Stream, phase: Any
) -> None:
    """Add ``total`` balls thrown uniformly at random into ``bins`` (indices of ``counts``), in chunks."""
    n_bins = bins.numel()
    for start in range(0, total, _CHUNK_ENTRIES):
        n = min(_CHUNK_ENTRIES, total - start)
        # 63 random bits modulo n_bins: uniform up to a bias of n_bins / 2**63.
        draws = stream.bits(phase, n, offset=start).remainder_(n_bins)
        counts.index_add_(0, bins, torch.bincount(draws, minlength=n_bins))


def _cap_degrees(degrees: torch.Tensor, cap: int, stream: _Stream) -> torch.Tensor:
    """Clip degrees at ``cap`` and hand the overflow to sources with room, keeping the total exact."""
    for attempt in range(8):
        overflow = int((degrees - cap).clamp_(min=0).sum())
        if overflow == 0:
            return degrees
        degrees.clamp_(max=cap)
        _scatter_uniform(degrees, (degrees < cap).nonzero().squeeze(1), overflow, stream, ("cap", attempt))
    overflow = int((degrees - cap).clamp_(min=0).sum())
    if overflow:
        # Rare tail (densities close to 1): fill the remaining room of the sources in a random order.
        degrees.clamp_(max=cap)
        order = _random_order(degrees.numel(), stream, "cap_order")
        room = cap - degrees[order]
        before = torch.cumsum(room, 0) - room
        degrees[order] += (overflow - before).clamp_(min=0).minimum(room)
    return degrees


# --------------------------------------------------------------------------------------------- BSW
def _bsw(n_out: int, n_in: int, n_links: int, beta: float, stream: _Stream) -> torch.Tensor:
    dev = stream.device
    # The larger side L owns the windows; with n_out == n_in the outputs do.
    windows_on_rows = n_out >= n_in
    n_l, n_s = (n_out, n_in) if windows_on_rows else (n_in, n_out)
    # Degrees floor/ceil of the mean, the ceil ones spread evenly (a deterministic lattice).
    ids = torch.arange(n_l + 1, device=dev)
    degrees = ((ids * n_links) // n_l).diff()
    centres = (ids[:-1] * n_s) // n_l
    starts = centres - (degrees - 1) // 2
    slots = torch.arange(n_s, device=dev)
    lattice = torch.empty(n_l, n_s, dtype=torch.bool, device=dev)
    step = _rows_per_chunk(n_s)
    for start in range(0, n_l, step):
        stop = min(start + step, n_l)
        offset = (slots[None, :] - starts[start:stop, None]).remainder_(n_s)
        lattice[start:stop] = offset < degrees[start:stop, None]
    if not windows_on_rows:
        lattice = lattice.t().contiguous()
    if beta == 0 or n_links == 0:
        return lattice
    flat = lattice.view(-1)
    links = flat.nonzero().squeeze(1)
    moved = links[stream.uniform("move", links.numel()) < beta]
    n_moved = moved.numel()
    if n_moved == 0:
        return lattice
    kept = flat.clone()
    kept.index_fill_(0, moved, False)
    # Land on positions empty in the lattice (a moved link really moves); only if there are too few of
    # those are the vacated positions allowed too.
    blocked = flat if flat.numel() - n_links >= n_moved else kept
    keys = stream.uniform("land", flat.numel()).masked_fill_(blocked, -1.0)
    kept |= _top_k_flat(_sortable(keys, stream.tiebreak("land", flat.numel())), n_moved)
    return kept.view(n_out, n_in)


# --------------------------------------------------------------------------------------------- BSF
def _bsf(n_out: int, n_in: int, n_links: int, stream: _Stream) -> torch.Tensor:
    # Random arrival order over all n_out + n_in nodes; the t-th arrival has BA expected degree ~ t^-1/2.
    # Sampling by weight w_a * w_j without replacement is the race E / (w_a * w_j), smallest first, with
    # 1 / w = sqrt(t) (computed on the CPU: the same everywhere).
    cpu = _Stream(stream.key, torch.device("cpu"))
    arrival = _random_order(n_out + n_in, cpu, "arrival").to(torch.float64).add_(1.0)
    inv_w = arrival.sqrt_().to(torch.float32).to(stream.device)
    keys = _exponential(stream.uniform("race", (n_out, n_in)))
    keys.mul_(inv_w[:n_out, None]).mul_(inv_w[None, n_out:])
    tiebreak = stream.tiebreak("ties", n_out * n_in).view(n_out, n_in)
    return _top_k_flat(_sortable(keys, tiebreak, smallest=True, signed=False), n_links)
