"""Link removal (spec section 2a) over a :class:`~.stacks.LayerStack`: each layer keeps the best of its links.

- :func:`decay_prune`: the density decay, hard, by a decay score (``"ri"`` or ``"magnitude"``).
- :func:`remove_stack`: the update's removal, hard or soft (CHTs: ``score ** temperature``), by a removal
  score of :func:`~.scores.removal_scores`.
- :func:`keep_back`: EM_S's final prune ends at its target: removed links come back where chain removal took
  more than the prune.
- :func:`remove_links`: one layer, a stack of one, with scores given.

Every layer draws from its own stream (or generator), so a layer's selection depends on nothing but the
layer and its stream, whatever else is in the stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .._validation import check_mask_2d, check_positive_int
from .rows import scatter_rows
from .sampling import select_rows
from .scores import removal_scores
from .stacks import LayerStack, link_positions

__all__ = ["decay_prune", "keep_back", "keep_links", "remove_links", "remove_stack"]


def keep_links(
    mask: torch.Tensor,
    link_pos: torch.Tensor,
    values: torch.Tensor,
    nnz: Sequence[int],
    keep: Sequence[int],
    *,
    mode: str = "hard",
    temperature: float = 1.0,
    streams: Sequence[int] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Keep ``keep[b]`` of the ``nnz[b]`` links of every layer of a ``(B, n_out, n_in)`` stack, by score.

    ``link_pos`` (:func:`~.stacks.link_positions`) lists each layer's links in ascending position order and
    ``values`` (``(B, max(nnz))``) their scores, overwritten here; draw ``i`` of a layer's stream goes to its
    ``i``-th link. Returns the new ``(B, n_out, n_in)`` masks.
    """
    rows, n = mask.shape[0], mask[0].numel()
    chosen = select_rows(
        values,
        keep,
        mode=mode,
        temperature=temperature,
        lengths=nnz,
        streams=streams,
        generators=generators,
        overwrite=True,
    )
    picked = torch.where(chosen, link_pos, rows * n)
    return scatter_rows(rows, n, picked, mask.device).view(mask.shape)


def decay_prune(
    stack: LayerStack, weights: Mapping[str, torch.Tensor], decay: Sequence[int], *, score: str, streams
) -> None:
    """Density decay: every layer ``b`` loses its ``decay[b]`` lowest-scored links (hard selection)."""
    if any(decay):
        link_pos = link_positions(stack.mask, stack.nnz)
        # the whole stack's scores, read at the links only (and freed before the selection)
        values = removal_scores(stack.stacked(weights), score).view(-1)[link_pos]
        keep = [n - d for n, d in zip(stack.nnz, decay, strict=True)]
        stack.mask = keep_links(stack.mask, link_pos, values, stack.nnz, keep, streams=streams)
        stack.nnz = keep
    stack.decay = list(decay)


def remove_stack(
    stack: LayerStack,
    weights: Mapping[str, torch.Tensor],
    remove: Sequence[int],
    *,
    method: str,
    mode: str,
    temperature: float,
    streams,
    grads: Mapping[str, torch.Tensor] | None = None,
    mest_lambda: float = 1.0,
) -> None:
    """Every layer ``b`` loses ``remove[b]`` links, kept by ``removal_scores(weight, method)`` at its links.

    Magnitude and MEST scores are elementwise: only the links are scored. ``grads`` (dense gradients) are
    read by ``method="mest"`` only. Frees the stack's stacked tensors.
    """
    stack.removed = [0] * len(stack)
    if not any(remove):
        stack.release()
        return
    link_pos = link_positions(stack.mask, stack.nnz)
    weight = stack.stacked(weights).view(-1)[link_pos]
    grad = stack.stacked(grads).view(-1)[link_pos] if method == "mest" else None
    stack.release()
    values = removal_scores(weight, method, grad=grad, mest_lambda=mest_lambda)
    del weight, grad
    keep = [n - r for n, r in zip(stack.nnz, remove, strict=True)]
    stack.mask = keep_links(
        stack.mask, link_pos, values, stack.nnz, keep, mode=mode, temperature=temperature, streams=streams
    )
    stack.nnz, stack.removed = keep, list(remove)
    stack.release()


def keep_back(
    stack: LayerStack,
    weights: Mapping[str, torch.Tensor],
    missing: Sequence[int],
    nnz_before: Sequence[int],
    *,
    streams,
) -> None:
    """Every layer ``b`` gets back ``missing[b]`` of the links it lost in this update (``stack.old`` minus
    ``stack.mask``; ``nnz_before``: its links in ``old``).

    Links whose two neurons are still active (a non-empty row and a non-empty column, so chain removal stays
    at its fixed point) come first, each tier by weight magnitude. They keep their weights: nothing is grown.
    """
    if not any(missing):
        return
    rows = len(stack)
    pool = stack.old & ~stack.mask
    active = stack.mask.amax(dim=2, keepdim=True) & stack.mask.amax(dim=1, keepdim=True)
    magnitude = stack.stacked(weights, float_dtype=True).abs()
    scale = magnitude.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    # active candidates score in [2, 3], the others in [0, 1]: the tiers never mix
    scores = (magnitude / scale + 2.0 * active).masked_fill_(~pool, 0.0)
    numel = stack.shape[0] * stack.shape[1]
    excluded = [numel - (before - n) for before, n in zip(nnz_before, stack.nnz, strict=True)]
    kept = select_rows(
        scores.view(rows, -1),
        missing,
        mode="hard",
        exclude=(~pool).view(rows, -1),
        streams=streams,
        n_excluded=excluded,
    ).view(stack.mask.shape)
    stack.mask = stack.mask | kept
    stack.nnz = [n + k for n, k in zip(stack.nnz, missing, strict=True)]
    stack.release()


def remove_links(
    mask: torch.Tensor,
    scores: torch.Tensor,
    n_remove: int,
    *,
    mode: str = "hard",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Remove exactly ``n_remove`` existing links of one layer, keeping the others by score: the selection
    of :func:`remove_stack` on a stack of one.

    - ``"hard"``: keep the ``nnz - n_remove`` links with the highest scores (ties at a positive score go
      to the lowest flat index; links scored 0 are kept, if some must be, uniformly at random).
    - ``"soft"`` (CHTs): keep ``nnz - n_remove`` links drawn without replacement with probability
      proportional to ``score ** temperature`` (log space: ``1e-3 ** 9`` does not underflow).

    Args:
        mask (`torch.Tensor`): current mask, shape ``(n_out, n_in)``, bool (or 0/1).
        scores (`torch.Tensor`): removal scores of the same shape (:func:`~.scores.removal_scores`); only the
            values at existing links are read and they must be finite and non-negative.
        n_remove (`int`): number of links to remove, ``0 <= n_remove <= nnz``.
        mode (`str`, defaults to ``"hard"``): ``"hard"`` or ``"soft"``.
        temperature (`float`, defaults to 1.0): exponent ``T > 0`` of the soft mode.
        generator (`torch.Generator`, *optional*): source of randomness.

    Returns:
        `torch.BoolTensor`: the new mask, a subset of ``mask`` with exactly ``nnz - n_remove`` links.

    Example:
        >>> mask = torch.tensor([[True, True], [False, True]])
        >>> remove_links(mask, torch.tensor([[0.5, 0.1], [0.0, 0.9]]), 1)
        tensor([[ True, False],
                [False,  True]])
    """
    check_mask_2d(mask, "mask")
    if not isinstance(scores, torch.Tensor) or scores.shape != mask.shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"`scores` must be a tensor of the mask's shape {tuple(mask.shape)}, got {got}.")
    check_positive_int(n_remove, "n_remove", allow_zero=True)
    stack = mask.bool()[None]
    nnz = int(torch.count_nonzero(stack))
    if n_remove > nnz:
        raise ValueError(
            f"Cannot remove n_remove={n_remove} links: the mask holds only {nnz}; "
            f"lower `n_remove` to at most {nnz}."
        )
    # Select among the existing links only, so that scores elsewhere (e.g. MEST's dense gradient) never count.
    link_pos = link_positions(stack, [nnz])
    values = scores.reshape(-1).to(mask.device)[link_pos]
    new = keep_links(
        stack,
        link_pos,
        values,
        [nnz],
        [nnz - n_remove],
        mode=mode,
        temperature=temperature,
        generators=[generator],
    )
    return new[0]
