"""Link regrowth (spec section 2b) over a :class:`~.stacks.LayerStack`: links added among the empty positions.

- ``"random"`` (SET): uniform over the empty positions.
- ``"gradient"`` (RigL): by ``|grad W|`` of the dense gradient; hard top-k by default.
- ``"ch"`` (CHT hard, CHTs soft): by the Cannistraci-Hebb link-prediction scores of the current mask
  (section 3, :func:`hf_chts.topology.link_prediction.ch_scores`).

In every method exactly ``grow[b]`` links are added to layer ``b``, never on an existing link. When fewer
candidates than that have a positive score, the rest are drawn uniformly among the zero-score candidates.
:func:`regrow_stack` is the phase of a topology update; :func:`regrow_links` is one layer, a stack of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .._validation import check_mask_2d, check_positive_int
from .link_prediction import ch_scores
from .rows import count_true
from .sampling import select_rows
from .stacks import LayerStack

__all__ = ["REGROWTH_METHODS", "regrow_links", "regrow_stack"]

REGROWTH_METHODS = ("random", "gradient", "ch")


def regrow_stack(
    stack: LayerStack,
    grow: Sequence[int],
    *,
    method: str,
    mode: str = "hard",
    grads: Mapping[str, torch.Tensor] | None = None,
    scores: torch.Tensor | None = None,
    ch_variant: str = "CH2_L3n",
    ch_precision: str = "exact",
    streams: Sequence[int] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    reset_returning_links: bool = False,
) -> None:
    """Grow ``grow[b]`` links in every layer ``b`` of a stack (``method`` one of :data:`REGROWTH_METHODS`).

    Sets ``stack.mask`` (old links and grown ones), ``stack.regrown``, ``stack.returned`` (a device count of
    the grown links that were in ``stack.old``: removed and regrown in this update) and ``stack.grown``: the
    links new to the layer, or every grown link with ``reset_returning_links``. ``stack.old`` is dropped.

    Args:
        grads (`Mapping[str, Tensor]`, *optional*): dense gradients by layer name, for ``"gradient"``.
        scores (`torch.Tensor`, *optional*): precomputed ``(B, n_out, n_in)`` non-negative scores for
            ``"gradient"`` or ``"ch"``, overwritten here.
        ch_variant, ch_precision: the predictor of ``"ch"`` (:func:`~.link_prediction.ch_scores`).
        streams, generators: one counter-based stream key, or one generator, per layer.
    """
    stack.regrown = [0] * len(stack)
    stack.grown = None
    if not any(grow):
        return
    rows = len(stack)
    flat = stack.mask.view(rows, -1)
    if method == "random":
        mode = "hard"
    elif scores is not None:
        scores = scores.view(rows, -1)
    elif method == "gradient":
        scores = stack.stacked(grads, float_dtype=True).abs_().view(rows, -1)
    else:
        scores = ch_scores(stack.mask, ch_variant, precision=ch_precision, nnz=[int(n) for n in stack.nnz])
        scores = scores.view(rows, -1)
    grown = select_rows(
        scores,
        grow,
        mode=mode,
        exclude=flat,
        streams=streams,
        generators=generators,
        n_excluded=stack.nnz,
        shape=tuple(flat.shape),
        device=stack.device,
        overwrite=True,  # the scores are this update's own
    ).view(stack.mask.shape)
    del scores
    stack.release()
    stack.mask = stack.mask | grown
    stack.returned = count_true(grown & stack.old)  # links removed and regrown in this update
    if not reset_returning_links:
        # only the links that are new to the layer are "grown": grown & ~old, in place and in one pass
        # (for bools, ``a > b`` is ``a & ~b``; a boolean masked_fill_ is ~50x slower on a CPU)
        torch.gt(grown, stack.old, out=grown)
    stack.grown, stack.old = grown, None  # the old masks are not needed any more
    stack.regrown = list(grow)


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
    """Grow exactly ``n_grow`` new links at positions where ``mask`` is 0: :func:`regrow_stack` on a stack
    of one.

    Args:
        mask (`torch.Tensor`): current mask (after removal), shape ``(n_out, n_in)``, bool (or 0/1).
        n_grow (`int`): number of links to add, ``0 <= n_grow <=`` number of empty positions.
        method (`str`, defaults to ``"random"``): one of :data:`REGROWTH_METHODS`.
        mode (`str`, defaults to ``"hard"``): ``"hard"`` takes the top-k scores, ``"soft"`` draws without
            replacement with probability proportional to the score. Ignored by ``"random"``.
        grad (`torch.Tensor`, *optional*): dense gradient of the weight, same shape; required by
            ``"gradient"`` unless ``scores`` is given.
        ch_variant (`str`, defaults to ``"CH2_L3n"``): link predictor used by ``"ch"``, one of
            :data:`~hf_chts.topology.link_prediction.CH_VARIANTS`.
        ch_precision (`str`, defaults to ``"exact"``): precision of its products with the node weights
            (see :func:`~hf_chts.topology.link_prediction.ch_scores`).
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
    if method not in REGROWTH_METHODS:
        raise ValueError(f"Unknown regrowth method {method!r}; valid values are: {REGROWTH_METHODS}.")
    check_positive_int(n_grow, "n_grow", allow_zero=True)
    existing = mask.bool()
    nnz = int(torch.count_nonzero(existing))
    n_candidates = existing.numel() - nnz
    if n_grow > n_candidates:
        raise ValueError(
            f"Cannot grow n_grow={n_grow} links: only {n_candidates} positions of the "
            f"{tuple(mask.shape)} mask are empty; lower `n_grow` to at most {n_candidates}."
        )
    if method == "random" and scores is not None:
        raise ValueError("`scores` has no effect with method='random'; use method='gradient' or 'ch'.")
    if method == "gradient" and scores is None:
        if grad is None:
            raise ValueError(
                "method='gradient' (RigL) needs the dense gradient of the weight: pass `grad=` "
                "(or precomputed `scores=`), or use method='random'."
            )
        _check_same_shape(grad, mask.shape, "grad")
    if scores is not None:
        _check_same_shape(scores, mask.shape, "scores")
        scores = scores.detach().to(existing.device, copy=True)[None]  # the selection overwrites it
    stack = LayerStack(["layer"], existing[None], nnz=[nnz])
    regrow_stack(
        stack,
        [n_grow],
        method=method,
        mode=mode,
        grads={"layer": grad} if grad is not None else None,
        scores=scores,
        ch_variant=ch_variant,
        ch_precision=ch_precision,
        generators=[generator],
        reset_returning_links=True,
    )
    grown = stack.grown[0] if stack.grown is not None else torch.zeros_like(existing)
    return stack.mask[0], grown


def _check_same_shape(tensor: torch.Tensor, shape: torch.Size, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must be a tensor of the mask's shape {tuple(shape)}, got {got}.")
