"""Initial sparse topologies (ALGORITHM.md section 1) and the per-layer density allocation.

Every model returns a boolean mask of shape ``(n_out, n_in)`` with exactly ``link_count(shape, density)``
links, ``mask[a, j] = True`` being a link from input neuron ``j`` to output neuron ``a``. All random choices
come from one explicit ``torch.Generator``, on the generator's device, so the same seed gives the same mask.
Everything is vectorised: there is no Python loop over neurons, only over fixed-size chunks of rows so that
peak memory stays bounded on the largest layers (a LLaMA-7B MLP layer has 45M positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._validation import check_choice, check_density, check_fraction, check_shape_2d, link_count

__all__ = ["INIT_METHODS", "allocate_densities", "init_mask"]

INIT_METHODS = ("er", "brf", "bsw", "bsf")
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


def init_mask(
    shape: Sequence[int],
    density: float,
    method: str = "brf",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    **params: Any,
) -> torch.Tensor:
    """Build an initial sparse topology with exactly ``round(density * n_out * n_in)`` links.

    Methods (ALGORITHM.md section 1):

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

    Args:
        shape (`tuple[int, int]`): ``(n_out, n_in)`` of the weight (``nn.Linear`` layout).
        density (`float`): fraction of links to keep, in (0, 1].
        method (`str`, *optional*, defaults to `"brf"`): one of ``"er"``, ``"brf"``, ``"bsw"``, ``"bsf"``.
        generator (`torch.Generator`, *optional*): source of every random choice; the mask is generated on
            its device. Without one, a CPU generator (or one on ``device``) seeded from torch's default RNG.
        device (`torch.device` or `str`, *optional*): where the returned mask lives (default: the
            generator's device).
        **params: the method's parameters listed above.

    Returns:
        `torch.Tensor`: boolean mask of shape ``(n_out, n_in)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mask = init_mask((768, 2048), 0.3, "brf", r=0.3, generator=g)
        >>> int(mask.sum()) == round(0.3 * 768 * 2048)
        True
    """
    n_out, n_in = check_shape_2d(shape)
    density = check_density(density)
    check_choice("init method", method, INIT_METHODS)
    opts = _resolve_params(method, params)
    if generator is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's default RNG
        generator = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
    n_links = link_count((n_out, n_in), density)
    if method == "er":
        mask = _er(n_out, n_in, n_links, generator)
    elif method == "brf":
        mask = _brf(n_out, n_in, n_links, opts["r"], opts["degree_dist"], generator)
    elif method == "bsw":
        mask = _bsw(n_out, n_in, n_links, opts["beta"], generator)
    else:
        mask = _bsf(n_out, n_in, n_links, generator)
    return mask if device is None else mask.to(device)


def allocate_densities(
    shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]],
    density: float,
    distribution: str = "uniform",
) -> list[float] | dict[str, float]:
    """Split a global density over layers (ALGORITHM.md section 4, per-layer allocation).

    ``"uniform"`` gives every layer ``density``. ``"erk"`` (Erdos-Renyi-Kernel) gives layer ``l`` a density
    proportional to ``(n_in + n_out) / (n_in * n_out)``, scaled so that the layers together hold
    ``density * sum(n_out * n_in)`` links; a layer that would exceed 1 is capped at 1 (dense) and its excess
    is spread over the uncapped layers, repeating until none exceeds 1.

    Args:
        shapes (`list[tuple[int, int]]` or `dict[str, tuple[int, int]]`): the ``(n_out, n_in)`` of each layer.
        density (`float`): global density in (0, 1].
        distribution (`str`, *optional*, defaults to `"uniform"`): ``"uniform"`` or ``"erk"``.

    Returns:
        `list[float]` in the order of ``shapes`` (a `dict` with the same keys when ``shapes`` is a mapping).

    Example:
        >>> allocate_densities([(768, 768), (2048, 768)], 0.1, "erk")  # the smaller layer gets more
        [0.1294..., 0.0889...]
    """
    density = check_density(density)
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


def _top_k_flat(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape as ``keys``) of the ``k`` largest keys: exactly ``k`` even with ties."""
    flat = keys.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=keys.device)
    if k >= flat.numel():
        out.fill_(True)
    elif k > 0:
        out[torch.topk(flat, k, sorted=False).indices] = True
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


def _er(n_out: int, n_in: int, n_links: int, g: torch.Generator) -> torch.Tensor:
    keys = torch.rand(n_out, n_in, generator=g, device=g.device)
    return _top_k_flat(keys, n_links)


# --------------------------------------------------------------------------------------------- BRF
def _brf(n_out: int, n_in: int, n_links: int, r: float, degree_dist: str, g: torch.Generator) -> torch.Tensor:
    # The smaller side S is the source side; with n_out == n_in the outputs are the sources.
    sources_are_rows = n_out <= n_in
    n_s, n_l = (n_out, n_in) if sources_are_rows else (n_in, n_out)
    dev = g.device
    degrees = _source_degrees(n_s, n_l, n_links, degree_dist, g)
    # The weight of target j for source i depends only on the ring offset (j - c_i) mod n_l: one profile
    # over the offsets, doubled so that every source's row is a contiguous window of it (no per-entry
    # distance arithmetic, only a row gather).
    offset = torch.arange(n_l, device=dev, dtype=torch.float64)
    dist = torch.minimum(offset, n_l - offset)
    alpha = (1.0 - r) / r if r > 0 else math.inf
    if r == 0:
        # Pure receptive field: keys -distance plus a jitter in [0, 0.5) that breaks ties at random but
        # never reorders two different distances.
        profile, mode = -dist, "jitter"
    elif alpha == 0:
        profile, mode = None, "uniform"
    elif alpha * math.log1p(n_l // 2) <= 60.0:
        # Exponential race in linear form: target j fires at E_j / w_j = E_j * (1 + delta)^alpha, E ~ Exp(1);
        # the K_i earliest are an exact weighted sample without replacement (ALGORITHM.md section 2c).
        # As keys: log(U) * (1 + delta)^alpha = -E / w, largest first (the weight ratio fits float32).
        profile, mode = dist.log1p().mul_(alpha).exp_(), "race"
    else:
        # Same race, in log form (Gumbel-top-k) for weight ratios beyond float32: log w - log E.
        profile, mode = dist.log1p().mul_(-alpha), "gumbel"
    windows = w = None
    if profile is not None:
        windows = profile.to(torch.float32).repeat(2).unfold(0, n_l, 1)  # windows[m] = profile[m : m + n_l]
    # Rows in order of degree, so that a chunk's degrees are close and its top-k barely exceeds each K_i.
    order = torch.sort(degrees, stable=True).indices
    out = torch.empty(n_s, n_l, dtype=torch.bool, device=dev)
    step = _rows_per_chunk(n_l, _BRF_CHUNK_ENTRIES)
    keys = torch.empty(min(step, n_s), n_l, device=dev)
    picked = torch.empty(min(step, n_s), n_l, dtype=torch.bool, device=dev)
    for start in range(0, n_s, step):
        rows = order[start : start + step]
        m = rows.numel()
        k = keys[:m]
        torch.rand(k.shape, generator=g, device=dev, out=k)
        if windows is not None:
            shifts = (n_l - (rows * n_l) // n_s) % n_l  # row i is profile[(j - c_i) mod n_l]
            w = windows.index_select(0, shifts)
        if mode == "jitter":
            torch.add(w, k, alpha=0.5, out=k)
        else:
            # E = -log(U) ~ Exp(1) (U = 0, probability 2^-24, stands for the tail E > -log(2^-24)).
            k.log_()  # -E
            if mode == "race":
                k.mul_(w)  # -E / w
            elif mode == "gumbel":
                k.neg_().log_().neg_().add_(w)  # log w - log E
        w = None  # free the chunk's weights before the next chunk gathers its own
        out.index_copy_(0, rows, _select_by_rank(k, degrees[rows], picked[:m]))
    return out if sources_are_rows else out.t().contiguous()


def _source_degrees(n_s: int, n_l: int, n_links: int, degree_dist: str, g: torch.Generator) -> torch.Tensor:
    """Degrees ``K_i`` of the ``n_s`` sources: sum exactly ``n_links``, each at most ``n_l``."""
    dev = g.device
    if degree_dist == "fixed" or n_links <= n_s:
        # "fixed", or too few links to give every source one: floor/ceil of the mean, extras at random.
        base, extra = divmod(n_links, n_s)
        degrees = torch.full((n_s,), base, dtype=torch.int64, device=dev)
        if extra:
            degrees[torch.randperm(n_s, generator=g, device=dev)[:extra]] += 1
        return degrees
    # "uniform": one link each, the rest spread uniformly at random (a multinomial), then capped at n_l.
    degrees = torch.ones(n_s, dtype=torch.int64, device=dev)
    _scatter_uniform(degrees, torch.arange(n_s, device=dev), n_links - n_s, g)
    return _cap_degrees(degrees, n_l, g)


def _scatter_uniform(counts: torch.Tensor, bins: torch.Tensor, total: int, g: torch.Generator) -> None:
    """Add ``total`` balls thrown uniformly at random into ``bins`` (indices of ``counts``), in chunks."""
    n_bins = bins.numel()
    for start in range(0, total, _CHUNK_ENTRIES):
        n = min(_CHUNK_ENTRIES, total - start)
        draws = torch.randint(0, n_bins, (n,), generator=g, device=counts.device)
        counts.index_add_(0, bins, torch.bincount(draws, minlength=n_bins))


def _cap_degrees(degrees: torch.Tensor, cap: int, g: torch.Generator) -> torch.Tensor:
    """Clip degrees at ``cap`` and hand the overflow to sources with room, keeping the total exact."""
    for _ in range(8):
        overflow = int((degrees - cap).clamp_(min=0).sum())
        if overflow == 0:
            return degrees
        degrees.clamp_(max=cap)
        _scatter_uniform(degrees, (degrees < cap).nonzero().squeeze(1), overflow, g)
    overflow = int((degrees - cap).clamp_(min=0).sum())
    if overflow:
        # Rare tail (densities close to 1): fill the remaining room of the sources in a random order.
        degrees.clamp_(max=cap)
        order = torch.randperm(degrees.numel(), generator=g, device=degrees.device)
        room = cap - degrees[order]
        before = torch.cumsum(room, 0) - room
        degrees[order] += (overflow - before).clamp_(min=0).minimum(room)
    return degrees


# --------------------------------------------------------------------------------------------- BSW
def _bsw(n_out: int, n_in: int, n_links: int, beta: float, g: torch.Generator) -> torch.Tensor:
    dev = g.device
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
    moved = links[torch.rand(links.numel(), generator=g, device=dev) < beta]
    n_moved = moved.numel()
    if n_moved == 0:
        return lattice
    kept = flat.clone()
    kept[moved] = False
    # Land on positions empty in the lattice (a moved link really moves); only if there are too few of
    # those are the vacated positions allowed too.
    blocked = flat if flat.numel() - n_links >= n_moved else kept
    keys = torch.rand(flat.numel(), generator=g, device=dev).masked_fill_(blocked, -1.0)
    kept |= _top_k_flat(keys, n_moved)
    return kept.view(n_out, n_in)


# --------------------------------------------------------------------------------------------- BSF
def _bsf(n_out: int, n_in: int, n_links: int, g: torch.Generator) -> torch.Tensor:
    dev = g.device
    # Random arrival order over all n_out + n_in nodes; the t-th arrival has BA expected degree ~ t^-1/2.
    arrival = torch.randperm(n_out + n_in, generator=g, device=dev).to(torch.float32) + 1.0
    log_w = arrival.log_().mul_(-0.5)
    keys = torch.empty(n_out, n_in, device=dev).exponential_(generator=g).log_().neg_()
    keys.add_(log_w[:n_out, None]).add_(log_w[None, n_out:])
    return _top_k_flat(keys, n_links)
