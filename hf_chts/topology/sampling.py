"""Hard top-k and soft weighted sampling without replacement, at any size (spec sections 2, 2b, 2c).

All functions work on the *flattened* input and return flat indices, sorted ascending, into it.

- :func:`topk_indices`: the ``k`` largest scores; ties go to the lowest flat index (deterministic).
- :func:`sample_without_replacement`: ``k`` entries drawn one after another, each with probability
  proportional to ``weight ** temperature`` among the entries not drawn yet. It uses the exponential race
  (Gumbel-top-k): ``key = T * log(w) - log(E)`` with ``E ~ Exp(1)``; the ``k`` largest keys are an exact
  sample. Working in log space keeps ``w ** T`` meaningful when it would underflow (``1e-3 ** 9`` is 0 in
  float32), and there is no cap on the number of entries (``torch.multinomial`` refuses more than 2**24).
- :func:`sample_uniform`: ``k`` entries uniformly at random among the True entries of a boolean tensor.
- :func:`select_indices`: the one entry point used by link removal and regrowth: hard or soft selection,
  with the rule that when fewer than ``k`` entries have a positive weight, the remaining ones are drawn
  uniformly at random among the zero-weight entries.

The scored functions accept ``exclude``, a boolean tensor of the same shape marking entries that can never
be chosen (for regrowth: the links that already exist).

Selecting 13M of 45M entries with ``torch.topk`` takes seconds on a CPU; here a strided sample brackets the
k-th largest key, so one selection costs a few passes over the data (see :func:`_select_largest`).

Random numbers are drawn on the generator's device (the default generator of ``weights``' device when
``generator`` is None), so a CPU generator gives the same draw whatever device the weights live on.
"""

from __future__ import annotations

import math

import torch

from .._validation import check_choice, check_finite_nonnegative, check_positive_int

__all__ = ["sample_uniform", "sample_without_replacement", "select_indices", "topk_indices"]

_SELECTION_MODES = ("hard", "soft")
# Size of the strided sample used to bracket the k-th largest key before the exact selection.
_BRACKET_SAMPLE = 1 << 16


def _flat(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    return tensor.reshape(-1)


def _flat_exclude(
    exclude: torch.Tensor | None, values: torch.Tensor, shape: torch.Size
) -> torch.Tensor | None:
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor) or exclude.shape != shape:
        got = tuple(exclude.shape) if isinstance(exclude, torch.Tensor) else type(exclude).__name__
        raise ValueError(f"`exclude` must be a boolean tensor of shape {tuple(shape)}, got {got}.")
    return exclude.reshape(-1).to(device=values.device, dtype=torch.bool)


def _check_k(k: int, available: int, what: str) -> int:
    check_positive_int(k, "k", allow_zero=True)
    if k > available:
        raise ValueError(
            f"Cannot select k={k} entries: only {available} {what}; lower `k` to at most {available}."
        )
    return k


def _check_temperature(temperature: float) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
    ):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
    if temperature <= 0:
        raise ValueError(
            f"`temperature` must be > 0 (1.0 samples proportionally to the score), got {temperature}."
        )
    return float(temperature)


def _uniform(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` float32 uniforms in [0, 1), drawn on the generator's device and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    out = torch.empty(n, dtype=torch.float32, device=gen_device)
    out.uniform_(generator=generator)
    return out.to(device)


def _log_weights(values: torch.Tensor) -> torch.Tensor:
    """``log(w)`` as float32, taken in float64 first when the input is float64 (1e-300 stays finite)."""
    if values.dtype == torch.float64:
        return torch.log(values).float()
    return torch.log(values.float())


def _select_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the ``k`` largest entries of 1-D ``values``; ties go to the lowest index.

    A full ``torch.topk`` of 13M out of 45M entries takes seconds on a CPU. Instead, a small strided sample
    brackets the k-th largest value; one pass counts what lies above the bracket and an exact sort runs only
    on the few entries inside it. If the bracket misses (structured or heavily tied values), the exact
    k-th value from ``torch.kthvalue`` serves as a zero-width bracket.
    """
    n = values.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    if k == n:
        return torch.arange(n, device=values.device)

    picked = None
    if n > 4 * _BRACKET_SAMPLE:
        sample = values[:: n // _BRACKET_SAMPLE]
        s = sample.numel()
        ordered = torch.sort(sample, descending=True).values
        rank = k * s / n  # expected number of sample entries above the k-th largest value
        margin = 5.0 * math.sqrt(rank * (1.0 - rank / s)) + 2.0
        hi_pos, lo_pos = math.floor(rank - margin), math.ceil(rank + margin)
        hi = ordered[hi_pos] if hi_pos >= 0 else None
        lo = ordered[lo_pos] if lo_pos < s else None
        picked = _select_in_bracket(values, k, lo, hi)
    if picked is None:
        kth = torch.kthvalue(values, n - k + 1).values
        picked = _select_in_bracket(values, k, kth, kth)
    return picked


def _select_in_bracket(
    values: torch.Tensor, k: int, lo: torch.Tensor | None, hi: torch.Tensor | None
) -> torch.Tensor | None:
    """Select the ``k`` largest given ``lo <= k-th largest <= hi``; None when the bracket is wrong."""
    if hi is None:
        above = torch.zeros_like(values, dtype=torch.bool)
        n_above = 0
    else:
        above = values > hi
        n_above = int(torch.count_nonzero(above))
    if n_above >= k:
        return None
    if lo is None:
        band = ~above
    else:
        band = values >= lo
        band.logical_xor_(above)  # ``above`` lies inside ``values >= lo``: this removes it
    band_idx = band.nonzero().squeeze(1)
    del band
    need = k - n_above
    if band_idx.numel() < need:
        return None
    band_vals = values[band_idx]
    # The need-th largest value inside the band: take everything above it, then the lowest-index ties.
    kth = torch.kthvalue(band_vals, band_vals.numel() - need + 1).values
    band_above = band_vals > kth
    n_ties_taken = need - int(torch.count_nonzero(band_above))
    ties = (band_vals == kth).nonzero().squeeze(1)[:n_ties_taken]
    chosen = torch.cat([band_idx[band_above], band_idx[ties]])
    above[chosen] = True
    return above.nonzero().squeeze(1)


def topk_indices(scores: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` highest scores (hard selection), sorted ascending.

    Ties are broken deterministically: among equal scores the lowest flat index wins.

    Args:
        scores (`torch.Tensor`): scores of any shape; NaN is refused, infinities are allowed.
        k (`int`): how many entries to select, ``0 <= k <= numel`` (minus the excluded entries).
        exclude (`torch.Tensor`, *optional*): bool, ``scores``' shape; True entries are never chosen.

    Returns:
        `torch.LongTensor` of shape ``(k,)``.

    Example:
        >>> topk_indices(torch.tensor([[0.1, 0.9], [0.5, 0.5]]), 2)
        tensor([1, 2])
    """
    values = _flat(scores, "scores")
    if values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"`scores` must be a real tensor, got dtype {values.dtype}.")
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise ValueError("`scores` contains NaN values; scores must be numbers.")
    excl = _flat_exclude(exclude, values, scores.shape)
    available = values.numel() if excl is None else values.numel() - int(torch.count_nonzero(excl))
    _check_k(k, available, "entries are available" if excl is None else "entries are not excluded")
    if excl is not None:
        # Select among allowed entries only: no score (not even -inf) can tie with an excluded one.
        allowed = (~excl).nonzero().squeeze(1)
        return allowed[_select_largest(values[allowed], k)]
    return _select_largest(values, k)


def _gumbel_keys(
    weights: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Exponential-race keys ``T * log(w) - log(E)``, ``E ~ Exp(1)``: the k largest form an exact sample."""
    keys = _uniform(weights.numel(), weights.device, generator)
    # u in [0, 1); clamping 0 to the smallest normal keeps E = -log(u) finite (a 1-in-2**24 event per entry).
    keys.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_()  # log(E)
    logw = _log_weights(weights)
    if temperature != 1.0:
        logw.mul_(temperature)
    return logw.sub_(keys)  # zero weights give -inf: they never beat a positive one


def _uniform_fill(
    positive: torch.Tensor, excl: torch.Tensor | None, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """All positive entries plus ``k - n_positive`` uniformly random non-excluded zero entries."""
    keys = _uniform(positive.numel(), positive.device, generator)
    keys.masked_fill_(positive, 2.0)  # above every uniform: always taken
    if excl is not None:
        keys.masked_fill_(excl, -1.0)  # below every uniform: never taken
    return _select_largest(keys, k)


def _check_weights(values: torch.Tensor) -> None:
    """Refuse NaN, infinite and negative weights; one fast min/max pass, the full check only on failure."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)  # NaN propagates into both
    if not (bool(low >= 0) and bool(torch.isfinite(high))):
        check_finite_nonnegative(values, "weights")


def _prepare_weights(
    weights: torch.Tensor, k: int, exclude: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    values = _flat(weights, "weights")
    if values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"`weights` must be a real tensor, got dtype {values.dtype}.")
    if not values.is_floating_point():
        values = values.float()
    excl = _flat_exclude(exclude, values, weights.shape)
    if excl is not None:
        # Excluded entries may hold anything (e.g. scores at existing links); only the rest is checked.
        values = values.masked_fill(excl, 0)
    _check_weights(values)
    available = values.numel() if excl is None else values.numel() - int(torch.count_nonzero(excl))
    _check_k(k, available, "entries are available" if excl is None else "entries are not excluded")
    positive = values > 0
    return values, excl, positive, int(torch.count_nonzero(positive))


def sample_without_replacement(
    weights: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``k`` distinct entries with probability proportional to ``weights ** temperature`` (soft).

    Exact successive sampling without replacement (Gumbel-top-k / exponential race, spec 2c), for any number
    of entries. Zero weights are never drawn while positive ones remain; when fewer than ``k`` entries are
    positive, all of them are taken and the rest are drawn uniformly among the zero-weight entries (spec 2b).

    Args:
        weights (`torch.Tensor`): non-negative, finite weights of any shape and device.
        k (`int`): number of entries to draw, ``0 <= k <= numel`` (minus the excluded entries).
        temperature (`float`, defaults to 1.0): exponent ``T > 0``; computed in log space, so ``T = 9`` on
            weights around 1e-3 still samples correctly. Large ``T`` approaches hard top-k.
        exclude (`torch.Tensor`, *optional*): bool, ``weights``' shape; True entries are never drawn.
        generator (`torch.Generator`, *optional*): source of randomness; draws happen on its device.

    Returns:
        `torch.LongTensor` of shape ``(k,)``: flat indices into ``weights``, sorted ascending.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_without_replacement(torch.tensor([0.0, 1.0, 3.0, 0.0]), 2, generator=g)
        tensor([1, 2])
    """
    temperature = _check_temperature(temperature)
    values, excl, positive, n_positive = _prepare_weights(weights, k, exclude)
    if n_positive < k:
        return _uniform_fill(positive, excl, k, generator)
    del positive
    return _select_largest(_gumbel_keys(values, temperature, generator), k)


def sample_uniform(
    candidates: torch.Tensor, k: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``k`` distinct entries uniformly at random among the True entries of ``candidates``.

    Args:
        candidates (`torch.Tensor`): boolean tensor of any shape; True entries may be drawn.
        k (`int`): number of entries to draw, ``0 <= k <=`` number of True entries.
        generator (`torch.Generator`, *optional*): source of randomness; draws happen on its device.

    Returns:
        `torch.LongTensor` of shape ``(k,)``: flat indices into ``candidates``, sorted ascending.

    Example:
        >>> sample_uniform(torch.tensor([True, False, True]), 2)
        tensor([0, 2])
    """
    flat = _flat(candidates, "candidates")
    if flat.dtype != torch.bool:
        raise ValueError(f"`candidates` must be a boolean tensor, got dtype {flat.dtype}.")
    _check_k(k, int(torch.count_nonzero(flat)), "entries are candidates")
    keys = _uniform(flat.numel(), flat.device, generator)
    keys.masked_fill_(~flat, -1.0)  # below every uniform: never drawn
    return _select_largest(keys, k)


def select_indices(
    scores: torch.Tensor,
    k: int,
    *,
    mode: str = "hard",
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Select ``k`` entries by score, hard (top-k) or soft (sampling proportional to ``score ** T``).

    Both modes follow the same rule for scarce scores: when fewer than ``k`` non-excluded entries have a
    positive score, all of them are taken and the rest are drawn uniformly among the zero-score entries.
    In hard mode the randomness is used only for that fill; ties among positive scores go to the lowest index.

    Args:
        scores (`torch.Tensor`): non-negative, finite scores of any shape.
        k (`int`): number of entries to select.
        mode (`str`, defaults to ``"hard"``): ``"hard"`` or ``"soft"``.
        temperature (`float`, defaults to 1.0): exponent of the soft mode (ignored in hard mode).
        exclude (`torch.Tensor`, *optional*): bool, ``scores``' shape; True entries are never chosen.
        generator (`torch.Generator`, *optional*): source of randomness.

    Returns:
        `torch.LongTensor` of shape ``(k,)``: flat indices, sorted ascending.

    Example:
        >>> select_indices(torch.tensor([0.2, 0.0, 0.7]), 1, mode="hard")
        tensor([2])
    """
    check_choice("mode", mode, _SELECTION_MODES)
    if mode == "soft":
        return sample_without_replacement(
            scores, k, temperature=temperature, exclude=exclude, generator=generator
        )
    _check_temperature(temperature)
    values, excl, positive, n_positive = _prepare_weights(scores, k, exclude)
    if n_positive < k:
        return _uniform_fill(positive, excl, k, generator)
    del positive
    if excl is not None:
        values = values.masked_fill(excl, -1)  # scores are >= 0: excluded entries rank last
    return _select_largest(values, k)
