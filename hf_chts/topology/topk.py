"""Exact top-k of every row of a ``(B, N)`` stack, each row with its own ``k``, ties to the lowest index.

On a GPU the k-th value of each row comes from a radix select and the ties are counted by one scan; on a CPU
a small strided sample brackets each long row's k-th value, so that only the entries inside the bracket are
sorted. Either way the host reads a constant number of times per call, never once per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .rows import count_true, host_values, index_tensor, row_positions

__all__ = ["topk_rows"]

# Size of the strided sample used to bracket the k-th largest value before the exact selection.
_BRACKET_SAMPLE = 1 << 16


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
    hi = ordered.gather(1, index_tensor(hi_pos, device)[:, None])
    lo = ordered.gather(1, index_tensor(lo_pos, device)[:, None])
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
    hi = torch.where(index_tensor(hi_none, device)[:, None].bool(), inf, hi)
    lo = torch.where(index_tensor(lo_none, device)[:, None].bool(), -inf, lo)
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
        idx = index_tensor(missed, device)
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
    valid = cols < index_tensor(n_band, device)[:, None]
    band_vals = torch.where(valid, values.view(-1)[band_pos], -inf)
    # Stable descending order: among equal values the lower position (and every padding slot last) wins.
    order = torch.sort(band_vals, dim=1, descending=True, stable=True).indices[:, :need_max]
    take = cols[:need_max] < index_tensor(need, device)[:, None]
    picked = torch.where(take, band_pos.gather(1, order), sink)
    out = torch.zeros(sink + 1, dtype=torch.bool, device=device)
    out[:sink] = flat_above
    out.index_fill_(0, picked.reshape(-1), True)
    return out[:-1].view(rows, n)


def topk_rows(values: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """``(B, N)`` bool: the ``ks[b]`` largest entries of every row ``b`` (``0 <= ks[b] <= N``), ties to the
    lowest index; any real values, infinities included.

    Example:
        >>> topk_rows(torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.0]]), [2, 1])
        tensor([[False,  True,  True],
                [ True, False, False]])
    """
    rows, n = values.shape
    out = torch.zeros(rows, n, dtype=torch.bool, device=values.device)
    full = [b for b, k in enumerate(ks) if k >= n]
    if full:
        out.index_fill_(0, index_tensor(full, values.device), True)
    partial = [b for b, k in enumerate(ks) if 0 < k < n]
    if not partial:
        return out
    if values.device.type == "cpu" and n > 4 * _BRACKET_SAMPLE:
        # On a CPU kthvalue over tens of millions of entries is slow; a bracket costs a few passes.
        sub = values if len(partial) == rows else values[index_tensor(partial, values.device)]
        chosen = _topk_rows_bracket(sub, [ks[b] for b in partial])
        if len(partial) == rows:
            return chosen
        out[index_tensor(partial, values.device)] = chosen
        return out
    by_k: dict[int, list[int]] = {}
    for b in partial:
        by_k.setdefault(ks[b], []).append(b)
    for k, members in by_k.items():
        if len(members) == rows:
            return _topk_rows_kth(values, k)
        idx = index_tensor(members, values.device)
        out[idx] = _topk_rows_kth(values[idx], k)
    return out
