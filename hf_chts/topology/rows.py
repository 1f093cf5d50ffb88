"""Row helpers of ``(B, N)`` stacks: counts, positions and scatters with host-side sizes, and the one place a
stacked update reads data back to the host (:func:`host_values`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["count_true", "host_values", "index_tensor", "row_positions", "scatter_rows"]


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
    idx = (index_tensor(starts, device)[:, None] + cols).clamp_(max=max(total - 1, 0))
    valid = cols < index_tensor(counts, device)[:, None]
    if not total:
        return torch.full((rows, width), fill, dtype=torch.long, device=device)
    return torch.where(valid, positions[idx], fill)


def index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor built on the host and sent to ``device`` without waiting for the device's queue."""
    out = torch.tensor(list(values), dtype=torch.long)
    if device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


def scatter_rows(rows: int, width: int, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A ``(rows, width)`` bool tensor, True at the flat ``positions``; ``rows * width`` is a sink."""
    out = torch.zeros(rows * width + 1, dtype=torch.bool, device=device)
    # index_fill_ takes the value as a kernel argument; `out[idx] = True` copies a CPU scalar to the device,
    # and every such copy waits for the device's queue to drain.
    out.index_fill_(0, positions.reshape(-1), True)
    return out[:-1].view(rows, width)
