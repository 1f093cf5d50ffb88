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
- :func:`select_rows`: the same selection on every row of a ``(B, N)`` stack at once, each row with its own
  ``k`` and its own generator, with a constant number of host synchronisations per call (not per row). Row
  ``b`` of the result is exactly the selection :func:`select_indices` makes on row ``b`` alone.

The scored functions accept ``exclude``, a boolean tensor of the same shape marking entries that can never
be chosen (for regrowth: the links that already exist).

Selecting 13M of 45M entries with ``torch.topk`` takes seconds on a CPU; here a strided sample brackets the
k-th largest key, so one selection costs a few passes over the data (see :func:`_select_largest`).

On a GPU the soft keys are one fused kernel (uniforms -> keys, written over the uniforms; docs/DESIGN.md,
Fused kernels), checked on first use against the eager ops, from which it may differ by an ulp of a
``log``; :func:`select_rows` and :func:`select_indices` use the same kernel.

Random numbers are drawn on the generator's device (the default generator of ``weights``' device when
``generator`` is None), so a CPU generator gives the same draw whatever device the weights live on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .._validation import check_choice, check_finite_nonnegative, check_positive_int
from ._fused import FusedFunction

__all__ = [
    "count_true",
    "host_values",
    "row_positions",
    "sample_uniform",
    "sample_without_replacement",
    "select_indices",
    "select_rows",
    "topk_indices",
]

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


def _soft_keys(u: torch.Tensor, values: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Exponential-race keys ``T * log(w) - log(E)`` from uniforms ``u`` (``E = -log(u)``), out of place:
    the ops of :func:`select_rows`' soft branch, as one fused kernel on a GPU (``temperature`` a float32
    0-d tensor: a new value does not recompile)."""
    log_e = u.clamp(min=torch.finfo(torch.float32).tiny).log().neg().log()
    return _log_weights(values).mul(temperature).sub(log_e)


def _soft_keys_compare(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """Compiled soft keys against eager ones: the same infinities, finite keys within a few ulps (a
    compiled ``log`` may round differently by an ulp)."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return "output dtype or shape differs from the eager result"
    finite = expected.isfinite()
    if not torch.equal(finite, actual.isfinite()) or not torch.equal(actual[~finite], expected[~finite]):
        return "infinite keys differ from the eager ones"
    error = (actual[finite].double() - expected[finite].double()).abs()
    if not bool((error <= 2.0**-18 + 2.0**-20 * expected[finite].double().abs()).all()):
        return "soft keys differ from the eager ones by more than a few ulps"
    return None


_SOFT_KEYS = FusedFunction(_soft_keys, compare=_soft_keys_compare)
# Elements of the first fused call on a device, which also runs the eager ops (temporaries ~3x the input).
_SOFT_KEYS_CHECK = 1 << 22


def _fused_soft_keys_(u: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """``u`` (1-D or 2-D) overwritten with the soft keys of ``values`` by the fused kernel; returns ``u``.

    A large first call is checked on a contiguous slice of its columns first (the same kernel), so that the
    eager check's temporaries stay small; then the whole runs checked.
    """
    scale = torch.full((), float(temperature), dtype=torch.float32, device=u.device)
    if not _SOFT_KEYS.verified(u.device) and u.numel() > _SOFT_KEYS_CHECK:
        rows = u.shape[0] if u.dim() == 2 else 1
        cols = (slice(None), slice(0, max(2, _SOFT_KEYS_CHECK // rows)))
        cols = cols if u.dim() == 2 else cols[1:]
        probe = u[cols].clone()
        _SOFT_KEYS(probe, values[cols].clone(), scale, out=probe)
    return _SOFT_KEYS(u, values, scale, out=u)


def _soft_keys_(
    u: torch.Tensor, values: torch.Tensor, temperature: float, *, reuse_values: bool = False
) -> torch.Tensor:
    """Exponential-race keys ``T * log(w) - log(E)``, ``E = -log(u)``, from uniforms ``u`` (overwritten).

    On a GPU one fused kernel writes the keys over ``u``; elsewhere in-place ops turn ``u`` into ``log(E)``
    and return the keys in a new tensor, or in ``values``' own memory with ``reuse_values`` (float32
    ``values`` the caller does not read again). The same values either way, up to an ulp of a compiled
    ``log``.
    """
    if _SOFT_KEYS.uses_compiled(u.device):
        return _fused_soft_keys_(u, values, temperature)
    # u in [0, 1); clamping 0 to the smallest normal keeps E = -log(u) finite (a 1-in-2**24 event per entry).
    u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_()  # log(E)
    logw = values.log_() if reuse_values else _log_weights(values)  # the same values as _log_weights
    if temperature != 1.0:
        logw.mul_(temperature)
    return logw.sub_(u)  # zero weights give -inf: they never beat a positive one


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
    above.index_fill_(0, chosen, True)
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
    return _soft_keys_(_uniform(weights.numel(), weights.device, generator), weights, temperature)


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


# ------------------------------------------------------------------------------ stacked (batched) selection
def host_values(tensor: torch.Tensor) -> list:
    """``tensor.tolist()`` through an explicit host copy: the one place a stacked selection reads data back.

    On a GPU this is one synchronisation; on a CPU it is a cheap copy that op counters still see.
    """
    return tensor.detach().to("cpu", copy=True).tolist()


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries of each ``mask[b]`` (int64, shape ``(B,)``), in one op on a GPU.

    On a CPU one ``count_nonzero`` per slice is ~10x faster than a reduction over the trailing dimensions of
    the stack (PyTorch's CPU reductions of bool tensors along a dimension are slow).
    """
    if mask.device.type == "cpu":
        return torch.stack([torch.count_nonzero(x) for x in mask.unbind(0)])
    return torch.count_nonzero(mask.reshape(mask.shape[0], -1), dim=1)


def row_positions(mask: torch.Tensor, counts: Sequence[int], fill: int = 0) -> torch.Tensor:
    """``(B, max(counts))`` long: the flat positions (into ``mask.view(-1)``) of the True entries of every
    row of a ``(B, N)`` bool ``mask``, ascending, padded with ``fill``; ``counts[b]`` is row ``b``'s count.

    Sizes come from the host, so nothing is read back (``nonzero_static``).
    """
    rows, n = mask.shape
    width = max(counts) if counts else 0
    device = mask.device
    if device.type == "cpu":
        # One row at a time with NumPy's nonzero: ~10x faster than nonzero_static on a CPU, where reading
        # the data costs nothing. The same result: the first ``width`` positions, then ``fill``.
        out = torch.empty(rows, width, dtype=torch.long)
        dest = out.numpy()
        for b in range(rows):
            found = np.flatnonzero(mask[b].numpy())[:width]
            np.add(found, b * n, out=dest[b, : found.size])
            dest[b, found.size :] = fill
        return out
    total = sum(counts)
    positions = torch.nonzero_static(mask.reshape(-1), size=total).squeeze(1)
    if all(count == width for count in counts):
        return positions.view(rows, width)
    starts, acc = [], 0
    for count in counts:
        starts.append(acc)
        acc += count
    cols = torch.arange(width, device=device)
    idx = (_index_tensor(starts, device)[:, None] + cols).clamp_(max=max(total - 1, 0))
    valid = cols < _index_tensor(counts, device)[:, None]
    if not total:
        return torch.full((rows, width), fill, dtype=torch.long, device=device)
    return torch.where(valid, positions[idx], fill)


def _row_aminmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row minimum and maximum of a ``(B, N)`` tensor (NaN propagates)."""
    if values.device.type == "cpu":
        pairs = [torch.aminmax(x) for x in values.unbind(0)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return torch.aminmax(values, dim=1)


def _index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor built on the host and sent to ``device`` without waiting for the device's queue."""
    out = torch.tensor(list(values), dtype=torch.long)
    if device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


def _scatter_rows(rows: int, width: int, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ``(rows, width)`` bool tensor, True at the flat ``positions``; ``rows * width`` is a sink."""
    out = torch.zeros(rows * width + 1, dtype=torch.bool, device=device)
    # index_fill_ takes the value as a kernel argument; `out[idx] = True` copies a CPU scalar to the device,
    # and every such copy waits for the device's queue to drain.
    out.index_fill_(0, positions.reshape(-1), True)
    return out[:-1].view(rows, width)


def _topk_rows_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-``k`` of every row (same ``k``), ties to the lowest index, without reading data back.

    The k-th largest value of each row comes from ``kthvalue``; everything above it is taken, then the
    lowest-index entries equal to it, counted with a cumulative sum.
    """
    kth = _kth_largest(values, k, by_topk=values.device.type != "cpu")
    chosen = values > kth
    need = k - count_true(chosen).unsqueeze(1)
    ties = values == kth
    return chosen.logical_or_(ties.logical_and_(_row_ranks(ties) <= need))


def _kth_largest(values: torch.Tensor, k: int, *, by_topk: bool) -> torch.Tensor:
    """``(B, 1)``: the ``k``-th largest value of every row of ``values`` (``1 <= k <= N``).

    On a GPU ``kthvalue`` runs one thread block per row, while ``topk`` (a multi-block radix select) is
    10-100x faster on long rows; on a CPU ``kthvalue`` is the faster. Both give the same value: the k-th
    value does not depend on how ties are broken.
    """
    n = values.shape[1]
    if not by_topk:
        return torch.kthvalue(values, n - k + 1, dim=1, keepdim=True).values
    if k <= n - k + 1:
        return torch.topk(values, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    return torch.topk(values, n - k + 1, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)


def _row_ranks(flags: torch.Tensor) -> torch.Tensor:
    """Per row of a ``(B, N)`` bool tensor, the running count of True entries (an inclusive cumsum).

    One scan over the flattened stack, less each row's count before its start: a scan along long rows runs
    one thread block per row on a GPU, the flat scan uses the whole device.
    """
    flat = flags.reshape(-1).cumsum(0, dtype=torch.int64 if flags.numel() >= 2**31 else torch.int32)
    flat = flat.view(flags.shape)
    return flat - (flat[:, :1] - flags[:, :1].to(flat.dtype))


def _descending_order_stats(sample: torch.Tensor, hi_pos: list[int], lo_pos: list[int]):
    """``(B, 1)`` entries ``hi_pos[b]`` and ``lo_pos[b]`` of every row of ``sample`` sorted descending.

    On a CPU (float32 / float64) two selections per row (``numpy.partition``, linear time) instead of a sort
    (~5x faster); elsewhere one batched sort. The values are the same either way.
    """
    device = sample.device
    if device.type == "cpu" and sample.dtype in (torch.float32, torch.float64):
        s = sample.shape[1]
        out = torch.empty(2, sample.shape[0], 1, dtype=sample.dtype)
        for b, row in enumerate(sample.detach().numpy()):
            # descending position p is ascending position s - 1 - p
            hi_at, lo_at = s - 1 - hi_pos[b], s - 1 - lo_pos[b]
            part = np.partition(row, (lo_at, hi_at))
            out[0, b, 0], out[1, b, 0] = float(part[hi_at]), float(part[lo_at])
        return out[0], out[1]
    ordered = torch.sort(sample, dim=1, descending=True).values
    hi = ordered.gather(1, _index_tensor(hi_pos, device)[:, None])
    lo = ordered.gather(1, _index_tensor(lo_pos, device)[:, None])
    return hi, lo


def _topk_rows_bracket(values: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Exact top-``ks[b]`` of every long row, bracketing each row's k-th value by a strided sample.

    One host read (the counts above and inside every row's bracket) for the whole stack; only the entries
    inside the brackets are sorted. Rows whose bracket misses fall back to ``kthvalue`` (a second read).
    """
    rows, n = values.shape
    device = values.device
    stride = n // _BRACKET_SAMPLE
    sample = values[:, ::stride]
    s = sample.shape[1]
    hi_pos, lo_pos, hi_none, lo_none = [], [], [], []
    for k in ks:
        rank = k * s / n
        margin = 5.0 * math.sqrt(rank * (1.0 - rank / s)) + 2.0
        hi, lo = math.floor(rank - margin), math.ceil(rank + margin)
        hi_none.append(hi < 0)
        lo_none.append(lo >= s)
        hi_pos.append(min(max(hi, 0), s - 1))
        lo_pos.append(min(max(lo, 0), s - 1))
    inf = torch.full((), float("inf"), dtype=values.dtype, device=device)
    hi, lo = _descending_order_stats(sample, hi_pos, lo_pos)
    hi = torch.where(_index_tensor(hi_none, device)[:, None].bool(), inf, hi)
    lo = torch.where(_index_tensor(lo_none, device)[:, None].bool(), -inf, lo)
    above = values > hi
    band = (values >= lo).logical_xor_(above)  # hi >= lo, so ``above`` lies inside ``values >= lo``
    counts = host_values(torch.stack([count_true(above), count_true(band)]))
    n_above, n_band = counts
    missed = [b for b, k in enumerate(ks) if not n_above[b] < k <= n_above[b] + n_band[b]]
    if missed:
        # A structured or heavily tied row: the exact k-th value is a zero-width bracket.
        for b in missed:
            kth = torch.kthvalue(values[b], n - ks[b] + 1).values
            above[b] = values[b] > kth
            band[b] = values[b] == kth
        idx = _index_tensor(missed, device)
        fixed = host_values(torch.stack([count_true(above[idx]), count_true(band[idx])]))
        for j, b in enumerate(missed):
            n_above[b], n_band[b] = fixed[0][j], fixed[1][j]
    need = [k - a for k, a in zip(ks, n_above, strict=True)]
    total, width, need_max = sum(n_band), max(n_band), max(need)
    sink = rows * n
    flat_above = above.view(-1)
    if need_max == 0 or total == 0:
        return above
    band_pos = row_positions(band, n_band)  # ascending within each row, padded with position 0
    del band
    cols = torch.arange(width, device=device)
    valid = cols < _index_tensor(n_band, device)[:, None]
    band_vals = torch.where(valid, values.view(-1)[band_pos], -inf)
    # Stable descending order: among equal values the lower position (and every padding slot last) wins.
    order = torch.sort(band_vals, dim=1, descending=True, stable=True).indices[:, :need_max]
    take = cols[:need_max] < _index_tensor(need, device)[:, None]
    picked = torch.where(take, band_pos.gather(1, order), sink)
    out = torch.zeros(sink + 1, dtype=torch.bool, device=device)
    out[:sink] = flat_above
    out.index_fill_(0, picked.reshape(-1), True)
    return out[:-1].view(rows, n)


def _topk_rows(values: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """``(B, N)`` bool: the ``ks[b]`` largest entries of every row ``b``, ties to the lowest index."""
    rows, n = values.shape
    out = torch.zeros(rows, n, dtype=torch.bool, device=values.device)
    full = [b for b, k in enumerate(ks) if k >= n]
    if full:
        out.index_fill_(0, _index_tensor(full, values.device), True)
    partial = [b for b, k in enumerate(ks) if 0 < k < n]
    if not partial:
        return out
    if values.device.type == "cpu" and n > 4 * _BRACKET_SAMPLE:
        # On a CPU kthvalue over tens of millions of entries is slow; a bracket costs a few passes.
        sub = values if len(partial) == rows else values[_index_tensor(partial, values.device)]
        chosen = _topk_rows_bracket(sub, [ks[b] for b in partial])
        if len(partial) == rows:
            return chosen
        out[_index_tensor(partial, values.device)] = chosen
        return out
    by_k: dict[int, list[int]] = {}
    for b in partial:
        by_k.setdefault(ks[b], []).append(b)
    for k, members in by_k.items():
        if len(members) == rows:
            return _topk_rows_kth(values, k)
        idx = _index_tensor(members, values.device)
        out[idx] = _topk_rows_kth(values[idx], k)
    return out


def select_rows(
    scores: torch.Tensor | None,
    k: Sequence[int],
    *,
    mode: str = "hard",
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    lengths: Sequence[int] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    streams: Sequence[int] | None = None,
    n_excluded: Sequence[int] | None = None,
    shape: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """:func:`select_indices` on every row of a ``(B, N)`` stack at once; returns a ``(B, N)`` bool mask.

    Row ``b`` selects ``k[b]`` entries among its first ``lengths[b]`` ones (all ``N`` by default) that
    ``exclude`` does not mark, by the same rule and with the same random draws as
    ``select_indices(scores[b, :lengths[b]], k[b], ..., generator=generators[b])``: the result of a row
    depends only on that row and its generator, never on the other rows of the stack. Random numbers are
    drawn only for the rows that need them (soft rows, and hard rows with fewer positive scores than
    ``k[b]``), ``lengths[b]`` of them from ``generators[b]``, as :func:`select_indices` draws them.

    With ``streams`` (one counter-based stream key per row, :func:`hf_chts.topology.rng.stream_key`) instead
    of generators, row ``b`` draws the first ``lengths[b]`` values of its stream, all rows in one op, and
    the result is the same on every device and whatever the other rows are.

    The number of host synchronisations is a small constant per call: one read of the per-row counts
    (positive, available, invalid entries), and on a CPU one more for rows longer than 262,144 entries.

    Args:
        scores (`torch.Tensor` or None): ``(B, N)`` non-negative finite scores; None means all zero (a
            uniform draw among the non-excluded entries, as SET regrowth does); then ``shape`` and ``device``
            are required.
        k (`Sequence[int]`): entries to select per row.
        mode, temperature: as in :func:`select_indices`.
        exclude (`torch.Tensor`, *optional*): ``(B, N)`` bool; True entries are never chosen.
        lengths (`Sequence[int]`, *optional*): valid prefix length of each row (padded stacks).
        generators (`Sequence[torch.Generator | None]`, *optional*): one per row.
        streams (`Sequence[int]`, *optional*): one counter-based stream key per row (instead of
            ``generators``).
        n_excluded (`Sequence[int]`, *optional*): the number of True entries of ``exclude`` in each row's
            valid prefix, when the caller knows it (saves a pass over ``exclude``).
        overwrite (`bool`, *optional*, defaults to False): ``scores`` may be overwritten (the caller does not
            read it afterwards): the selection keys are then computed in its memory, which saves two copies
            of the stack. The selection is the same.

    Returns:
        `torch.BoolTensor` of shape ``(B, N)`` with exactly ``k[b]`` True entries in row ``b``.

    Example:
        >>> scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.0]])
        >>> select_rows(scores, [2, 1])
        tensor([[False,  True,  True],
                [ True, False, False]])
    """
    check_choice("mode", mode, _SELECTION_MODES)
    temperature = _check_temperature(temperature)
    if scores is None:
        if shape is None or device is None:
            raise ValueError("`select_rows(None, ...)` needs `shape=(B, N)` and `device=`.")
        rows, n = (int(v) for v in shape)
        device = torch.device(device)
    else:
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"`scores` must be a 2-D (B, N) tensor, got {got}.")
        if scores.is_complex() or scores.dtype == torch.bool:
            raise ValueError(f"`scores` must be a real tensor, got dtype {scores.dtype}.")
        rows, n = scores.shape
        device = scores.device
    ks = [check_positive_int(int(v), "k", allow_zero=True) for v in k]
    if len(ks) != rows:
        raise ValueError(f"`k` has {len(ks)} entries for a stack of {rows} rows; give one per row.")
    lengths = [n] * rows if lengths is None else [int(v) for v in lengths]
    if len(lengths) != rows or any(not 0 <= v <= n for v in lengths):
        raise ValueError(f"`lengths` must give one length in [0, {n}] per row, got {lengths}.")
    if streams is not None:
        if generators is not None:
            raise ValueError("Pass `generators` or `streams`, not both.")
        streams = [int(v) for v in streams]
        if len(streams) != rows:
            raise ValueError(f"`streams` has {len(streams)} keys for {rows} rows; give one per row.")
    generators = [None] * rows if generators is None else list(generators)
    if len(generators) != rows:
        raise ValueError(f"`generators` has {len(generators)} entries for {rows} rows; give one per row.")
    if exclude is not None and (not isinstance(exclude, torch.Tensor) or tuple(exclude.shape) != (rows, n)):
        got = tuple(exclude.shape) if isinstance(exclude, torch.Tensor) else type(exclude).__name__
        raise ValueError(f"`exclude` must be a boolean tensor of shape {(rows, n)}, got {got}.")

    # Entries that can never be chosen: excluded ones and the padding after each row's length.
    blocked = None if exclude is None else exclude.to(device=device, dtype=torch.bool)
    if any(v < n for v in lengths):
        pad = torch.arange(n, device=device) >= _index_tensor(lengths, device)[:, None]
        blocked = pad if blocked is None else blocked | pad
    if scores is None:
        values = None
        n_positive, bad = [0] * rows, [False] * rows
        reads = []
    else:
        values = scores if scores.is_floating_point() else scores.float()
        overwrite = overwrite or values is not scores  # a converted copy is ours to overwrite
        if blocked is not None:
            values = values.masked_fill_(blocked, 0) if overwrite else values.masked_fill(blocked, 0)
            overwrite = True
        positive = values > 0
        low, high = _row_aminmax(values)  # NaN propagates into both
        reads = [count_true(positive), ~((low >= 0) & torch.isfinite(high))]
    if n_excluded is not None and blocked is not None:
        n_excluded = [int(v) for v in n_excluded]
        available = [length - e for length, e in zip(lengths, n_excluded, strict=True)]
    elif blocked is None:
        available = list(lengths)
    else:
        reads.append(count_true(blocked))
    if reads:
        read = host_values(torch.stack([r.to(torch.int64) for r in reads]))
        if values is not None:
            n_positive, bad = read[0], read[1]
        if len(read) > (0 if values is None else 2):
            available = [n - v for v in read[-1]]
    for b in range(rows):
        if bad[b]:
            check_finite_nonnegative(values[b], "scores")
        _check_k(
            ks[b], available[b], "entries are available" if blocked is None else "entries are not excluded"
        )

    # Rows that take all their available entries, or none, need no keys and no random numbers.
    active = [b for b in range(rows) if 0 < ks[b] < available[b]]
    fill = [b for b in active if n_positive[b] < ks[b]]
    ranked = [b for b in active if n_positive[b] >= ks[b]]
    draw = fill + ranked if mode == "soft" else fill
    uniforms = None
    if draw and streams is not None:
        from .rng import uniform  # the prefix of each row's stream; padding draws are never read

        draw = sorted(draw)
        drawn = uniform(_index_tensor([streams[b] for b in draw], device), (n,), device=device)
        if len(draw) == rows:
            uniforms = drawn
        else:
            uniforms = torch.zeros(rows, n, dtype=torch.float32, device=device)
            uniforms[_index_tensor(draw, device)] = drawn
    elif draw:
        uniforms = torch.zeros(rows, n, dtype=torch.float32, device=device)
        for b in sorted(draw):
            row = uniforms[b, : lengths[b]]
            if generators[b] is not None and generators[b].device != device:
                row.copy_(_uniform(lengths[b], device, generators[b]))
            else:
                row.uniform_(generator=generators[b])
    every = len(active) == rows
    # Hard keys are the scores themselves (float64 stays float64), soft keys float32.
    key_dtype = torch.float32
    if values is not None and mode == "hard":
        key_dtype = torch.promote_types(values.dtype, torch.float32)
    keys = None if every and not fill else torch.full((rows, n), -3.0, dtype=key_dtype, device=device)
    if ranked:
        whole = len(ranked) == rows
        idx = None if whole else _index_tensor(ranked, device)
        if mode == "soft":
            u = uniforms if whole else uniforms[idx]
            reuse = whole and overwrite and values.dtype == torch.float32
            part = _soft_keys_(u, values if whole else values[idx], temperature, reuse_values=reuse)
        elif blocked is None:
            part = values if whole else values[idx]
        else:
            part = values.masked_fill_(blocked, -1) if whole else values[idx].masked_fill_(blocked[idx], -1)
        if whole:
            keys = part
        else:
            keys[idx] = part.to(key_dtype)
    if fill:
        # Every positive entry, then the rest uniformly among the non-blocked zero entries.
        idx = _index_tensor(fill, device)
        fill_keys = uniforms[idx]
        if values is not None:
            fill_keys.masked_fill_(positive[idx], 2.0)
        if blocked is not None:
            fill_keys.masked_fill_(blocked[idx], -1.0)
        keys[idx] = fill_keys.to(key_dtype)
    if keys is None:
        keys = torch.full((rows, n), -3.0, dtype=key_dtype, device=device)
    uniforms = u = values = part = None  # only the keys are needed from here on
    take = [ks[b] if b in active else 0 for b in range(rows)]
    chosen = _topk_rows(keys, take)
    whole_rows = [b for b in range(rows) if ks[b] > 0 and ks[b] >= available[b]]
    if whole_rows:
        idx = _index_tensor(whole_rows, device)
        if blocked is None:
            chosen.index_fill_(0, idx, True)
        else:
            chosen[idx] = ~blocked[idx]
    return chosen
