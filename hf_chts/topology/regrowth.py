"""Link regrowth (spec section 2b): add links among the empty positions of a mask.

- ``"random"`` (SET): uniform over the empty positions.
- ``"gradient"`` (RigL): by ``|grad W|`` of the dense gradient; hard top-k by default.
- ``"ch"`` (CHT hard, CHTs soft): by the Cannistraci-Hebb link-prediction scores of the current mask
  (section 3, :func:`hf_chts.topology.link_prediction.ch_scores`).

In every method exactly ``n_grow`` links are added, never on an existing link. When fewer than ``n_grow``
candidates have a positive score, the rest are drawn uniformly among the zero-score candidates.
"""

from __future__ import annotations

import torch

from .._validation import check_choice, check_mask_2d, check_positive_int
from .sampling import sample_uniform, select_indices

__all__ = ["REGROWTH_METHODS", "regrow_links"]

REGROWTH_METHODS = ("random", "gradient", "ch")
_MODES = ("hard", "soft")


def _check_same_shape(tensor: torch.Tensor, shape: torch.Size, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must be a tensor of the mask's shape {tuple(shape)}, got {got}.")


def regrow_links(
    mask: torch.Tensor,
    n_grow: int,
    *,
    method: str = "random",
    mode: str = "hard",
    grad: torch.Tensor | None = None,
    ch_variant: str = "CH2_L3n",
    ch_precision: str = "exact",
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow exactly ``n_grow`` new links at positions where ``mask`` is 0.

    Args:
        mask (`torch.Tensor`): current mask (after removal), shape ``(n_out, n_in)``, bool (or 0/1).
        n_grow (`int`): number of links to add, ``0 <= n_grow <=`` number of empty positions.
        method (`str`, defaults to ``"random"``): ``"random"``, ``"gradient"`` or ``"ch"``.
        mode (`str`, defaults to ``"hard"``): ``"hard"`` takes the top-k scores, ``"soft"`` draws without
            replacement with probability proportional to the score. Ignored by ``"random"``.
        grad (`torch.Tensor`, *optional*): dense gradient of the weight, same shape; required by
            ``"gradient"`` unless ``scores`` is given.
        ch_variant (`str`, defaults to ``"CH2_L3n"``): link predictor used by ``"ch"``: a node-based L3n
            variant of :func:`~hf_chts.topology.link_prediction.ch_scores`, or ``"CH3_L3p"`` (path-based,
            :func:`~hf_chts.topology.ch3_l3p.ch3_l3p_scores`).
        ch_precision (`str`, defaults to ``"exact"``): precision of its products with the node weights
            (``"exact"``, ``"tf32"`` or ``"bf16"``; see :func:`~hf_chts.topology.link_prediction.ch_scores`).
        scores (`torch.Tensor`, *optional*): precomputed non-negative regrowth scores (same shape) for
            ``"gradient"`` or ``"ch"``; only the values at empty positions are read.
        generator (`torch.Generator`, *optional*): source of randomness.

    Returns:
        `tuple[torch.BoolTensor, torch.BoolTensor]`: ``(new_mask, grown_mask)``, where ``grown_mask`` marks
        the ``n_grow`` new links and ``new_mask = mask | grown_mask``.

    Example:
        >>> mask = torch.tensor([[True, False], [False, False]])
        >>> grad = torch.tensor([[5.0, -2.0], [0.1, 1.0]])
        >>> new_mask, grown = regrow_links(mask, 1, method="gradient", grad=grad)
        >>> grown
        tensor([[False,  True],
                [False, False]])
    """
    check_mask_2d(mask, "mask")
    check_choice("regrowth method", method, REGROWTH_METHODS)
    check_choice("regrowth mode", mode, _MODES)
    check_positive_int(n_grow, "n_grow", allow_zero=True)
    existing = mask.bool()
    n_candidates = existing.numel() - int(torch.count_nonzero(existing))
    if n_grow > n_candidates:
        raise ValueError(
            f"Cannot grow n_grow={n_grow} links: only {n_candidates} positions of the "
            f"{tuple(mask.shape)} mask are empty; lower `n_grow` to at most {n_candidates}."
        )

    if method == "random":
        if scores is not None:
            raise ValueError("`scores` has no effect with method='random'; use method='gradient' or 'ch'.")
        chosen = sample_uniform(~existing, n_grow, generator=generator)
    else:
        if scores is None:
            if method == "gradient":
                if grad is None:
                    raise ValueError(
                        "method='gradient' (RigL) needs the dense gradient of the weight: pass `grad=` "
                        "(or precomputed `scores=`), or use method='random'."
                    )
                _check_same_shape(grad, mask.shape, "grad")
                scores = grad.detach().to(existing.device).float().abs()
            elif ch_variant == "CH3_L3p":  # the path-based predictor (hf_chts.topology.ch3_l3p)
                from .ch3_l3p import ch3_l3p_scores

                scores = ch3_l3p_scores(existing)
            else:
                from .link_prediction import ch_scores  # lazy: the predictor is heavy and optional here

                scores = ch_scores(existing, variant=ch_variant, precision=ch_precision)
        _check_same_shape(scores, mask.shape, "scores")
        chosen = select_indices(
            scores.to(existing.device), n_grow, mode=mode, exclude=existing, generator=generator
        )

    grown = torch.zeros(existing.numel(), dtype=torch.bool, device=existing.device)
    grown.index_fill_(0, chosen, True)
    grown = grown.view(existing.shape)
    return existing | grown, grown
