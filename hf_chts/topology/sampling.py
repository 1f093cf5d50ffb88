"""Hard top-k and soft weighted sampling without replacement, at any size (spec sections 2, 2b, 2c).

:func:`select_rows` is the selection every removal and regrowth runs: on each row of a ``(B, N)`` stack it
takes ``k[b]`` entries, hard (the largest scores; ties to the lowest index) or soft (drawn one after another
with probability proportional to ``score ** temperature``). Soft selection is the exponential race
(Gumbel-top-k): ``key = T * log(w) - log(E)``, ``E ~ Exp(1)``, whose ``k`` largest keys are an exact sample;
log space keeps ``w ** T`` meaningful where it would underflow (``1e-3 ** 9`` is 0 in float32), and there is
no cap on the number of entries (``torch.multinomial`` refuses more than 2**24). When fewer than ``k[b]``
entries have a positive score, all of them are taken and the rest drawn uniformly among the zero ones.
Selecting 13M of 45M entries with ``torch.topk`` takes seconds on a CPU; here a strided sample brackets the
k-th largest key, so one selection costs a few passes over the data.

The one-tensor entry points (:func:`select_indices`, :func:`sample_without_replacement`,
:func:`sample_uniform`, :func:`topk_indices`) are the same selection on a stack of one, returning flat
indices sorted ascending.

On a GPU the soft keys are one fused kernel (docs/DESIGN.md, Fused kernels), checked on first use against
the eager ops, from which it may differ by an ulp of a ``log``. Random numbers come from a counter-based
stream per row (:mod:`.rng`) or from a generator, drawn on the generator's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import check_choice, check_finite_nonnegative, check_positive_int
from ._fused import FusedFunction
from .rows import count_true, host_values, index_tensor
from .topk import topk_rows

__all__ = [
    "SELECTION_MODES",
    "sample_uniform",
    "sample_without_replacement",
    "select_indices",
    "select_rows",
    "topk_indices",
]

# The selection modes: top-k ("hard") or sampling proportional to ``score ** T`` ("soft").
SELECTION_MODES = ("hard", "soft")


def _check_k(k: int, available: int, what: str) -> int:
    check_positive_int(k, "k", allow_zero=True)
    if k > available:
        raise ValueError(
            f"Cannot select k={k} entries: only {available} {what}; lower `k` to at most {available}."
        )
    return k


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


# ------------------------------------------------------------------------------ stacked (batched) selection
def _row_aminmax(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row minimum and maximum of a ``(B, N)`` tensor (NaN propagates)."""
    if values.device.type == "cpu":
        pairs = [torch.aminmax(x) for x in values.unbind(0)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    return torch.aminmax(values, dim=1)


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
    check_choice("mode", mode, SELECTION_MODES)
    temperature = float(temperature)
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
        pad = torch.arange(n, device=device) >= index_tensor(lengths, device)[:, None]
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
        drawn = uniform(index_tensor([streams[b] for b in draw], device), (n,), device=device)
        if len(draw) == rows:
            uniforms = drawn
        else:
            uniforms = torch.zeros(rows, n, dtype=torch.float32, device=device)
            uniforms[index_tensor(draw, device)] = drawn
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
        idx = None if whole else index_tensor(ranked, device)
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
        idx = index_tensor(fill, device)
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
    chosen = topk_rows(keys, take)
    whole_rows = [b for b in range(rows) if ks[b] > 0 and ks[b] >= available[b]]
    if whole_rows:
        idx = index_tensor(whole_rows, device)
        if blocked is None:
            chosen.index_fill_(0, idx, True)
        else:
            chosen[idx] = ~blocked[idx]
    return chosen


# ------------------------------------------------------------------------------ one tensor: a stack of one
def _one_row(tensor: torch.Tensor, name: str, exclude: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``tensor`` and ``exclude`` as ``(1, N)`` rows (the flattened tensor)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if exclude is not None and (not isinstance(exclude, torch.Tensor) or exclude.shape != tensor.shape):
        got = tuple(exclude.shape) if isinstance(exclude, torch.Tensor) else type(exclude).__name__
        raise ValueError(f"`exclude` must be a boolean tensor of shape {tuple(tensor.shape)}, got {got}.")
    row = tensor.reshape(1, -1)
    return row, None if exclude is None else exclude.reshape(1, -1).to(device=row.device, dtype=torch.bool)


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

    :func:`select_rows` on a stack of one row (the flattened ``scores``), returned as flat indices. Both modes
    follow the same rule for scarce scores: when fewer than ``k`` non-excluded entries have a positive score,
    all of them are taken and the rest are drawn uniformly among the zero-score entries. In hard mode the
    randomness is used only for that fill; ties among positive scores go to the lowest index.

    Args:
        scores (`torch.Tensor`): non-negative, finite scores of any shape.
        k (`int`): number of entries to select.
        mode (`str`, defaults to ``"hard"``): one of :data:`SELECTION_MODES`.
        temperature (`float`, defaults to 1.0): exponent ``T`` of the soft mode (ignored in hard mode), finite
            and > 0 as SparseTrainingConfig checks (``temperature_start`` / ``temperature_end``; not checked
            again here); computed in log space, so ``T = 9`` on scores around 1e-3 still samples correctly.
        exclude (`torch.Tensor`, *optional*): bool, ``scores``' shape; True entries are never chosen.
        generator (`torch.Generator`, *optional*): source of randomness; draws happen on its device.

    Returns:
        `torch.LongTensor` of shape ``(k,)``: flat indices, sorted ascending.

    Example:
        >>> select_indices(torch.tensor([0.2, 0.0, 0.7]), 1, mode="hard")
        tensor([2])
    """
    row, excl = _one_row(scores, "scores", exclude)
    check_positive_int(k, "k", allow_zero=True)
    chosen = select_rows(row, [k], mode=mode, temperature=temperature, exclude=excl, generators=[generator])
    return chosen[0].nonzero().squeeze(1)


def sample_without_replacement(
    weights: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``k`` distinct entries with probability proportional to ``weights ** temperature``:
    :func:`select_indices` in soft mode (exact successive sampling without replacement, for any number of
    entries; zero weights are drawn, uniformly, only once the positive ones are exhausted).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_without_replacement(torch.tensor([0.0, 1.0, 3.0, 0.0]), 2, generator=g)
        tensor([1, 2])
    """
    return select_indices(
        weights, k, mode="soft", temperature=temperature, exclude=exclude, generator=generator
    )


def sample_uniform(
    candidates: torch.Tensor, k: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``k`` distinct entries uniformly at random among the True entries of a boolean ``candidates``;
    flat indices, sorted ascending.

    Example:
        >>> sample_uniform(torch.tensor([True, False, True]), 2)
        tensor([0, 2])
    """
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool:
        got = candidates.dtype if isinstance(candidates, torch.Tensor) else type(candidates).__name__
        raise ValueError(f"`candidates` must be a boolean tensor, got {got}.")
    row = candidates.reshape(1, -1)
    check_positive_int(k, "k", allow_zero=True)
    chosen = select_rows(
        None, [k], exclude=~row, shape=tuple(row.shape), device=row.device, generators=[generator]
    )
    return chosen[0].nonzero().squeeze(1)


def topk_indices(scores: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``k`` highest scores (hard selection), sorted ascending; ties go to the lowest
    flat index. Unlike :func:`select_indices`, any real scores are ranked (negative and infinite ones too).

    Args:
        scores (`torch.Tensor`): scores of any shape; NaN is refused.
        k (`int`): how many entries to select, ``0 <= k <= numel`` (minus the excluded entries).
        exclude (`torch.Tensor`, *optional*): bool, ``scores``' shape; True entries are never chosen.

    Example:
        >>> topk_indices(torch.tensor([[0.1, 0.9], [0.5, 0.5]]), 2)
        tensor([1, 2])
    """
    row, excl = _one_row(scores, "scores", exclude)
    if row.is_complex() or row.dtype == torch.bool:
        raise ValueError(f"`scores` must be a real tensor, got dtype {row.dtype}.")
    values = row[0] if row.is_floating_point() else row[0].double()
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise ValueError("`scores` contains NaN values; scores must be numbers.")
    allowed = None if excl is None else (~excl[0]).nonzero().squeeze(1)
    if allowed is not None:  # select among the allowed entries only: nothing ties with an excluded one
        values = values[allowed]
    what = "entries are available" if excl is None else "entries are not excluded"
    _check_k(k, values.numel(), what)
    chosen = topk_rows(values[None], [k])[0].nonzero().squeeze(1)
    return chosen if allowed is None else allowed[chosen]
