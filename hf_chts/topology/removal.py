"""Link removal (spec section 2a): keep the best ``nnz - n_remove`` existing links, hard or soft."""

from __future__ import annotations

import torch

from .._validation import check_mask_2d, check_positive_int
from .sampling import select_indices

__all__ = ["remove_links"]


def remove_links(
    mask: torch.Tensor,
    scores: torch.Tensor,
    n_remove: int,
    *,
    mode: str = "hard",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Remove exactly ``n_remove`` existing links of a layer, keeping the others by score.

    - ``"hard"``: keep the ``nnz - n_remove`` links with the highest scores (ties at a positive score go
      to the lowest flat index; links scored 0 are kept, if some must be, uniformly at random).
    - ``"soft"`` (CHTs): keep ``nnz - n_remove`` links drawn without replacement with probability
      proportional to ``score ** temperature``, computed in log space so that a high temperature on small
      scores (``1e-3 ** 9`` underflows float32) still samples correctly. Higher temperatures approach hard.

    Args:
        mask (`torch.Tensor`): current mask, shape ``(n_out, n_in)``, bool (or 0/1).
        scores (`torch.Tensor`): removal scores of the same shape, e.g. from
            :func:`~hf_chts.topology.scores.removal_scores`; only the values at existing links are read and
            they must be finite and non-negative.
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
    flat_mask = mask.reshape(-1).bool()
    existing = flat_mask.nonzero().squeeze(1)
    nnz = existing.numel()
    if n_remove > nnz:
        raise ValueError(
            f"Cannot remove n_remove={n_remove} links: the mask holds only {nnz}; "
            f"lower `n_remove` to at most {nnz}."
        )
    # Select among the existing links only, so that scores elsewhere (e.g. MEST's dense gradient) never count.
    values = scores.reshape(-1).to(mask.device)[existing]
    keep = select_indices(values, nnz - n_remove, mode=mode, temperature=temperature, generator=generator)
    new_mask = torch.zeros_like(flat_mask)
    new_mask.index_fill_(0, existing[keep], True)
    return new_mask.view(mask.shape)
