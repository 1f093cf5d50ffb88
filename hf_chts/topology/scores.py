"""Link-removal scores (spec section 2a): magnitude, relative importance (RI) and MEST.

Scores are only meaningful at existing links; a masked weight is exactly 0, so elsewhere they are 0
(except MEST, whose dense-gradient term is non-zero everywhere and simply ignored by the removal step).
"""

from __future__ import annotations

import math

import torch

from .._validation import check_choice, check_mask_2d

__all__ = ["DECAY_SCORES", "REMOVAL_METHODS", "removal_scores"]

REMOVAL_METHODS = ("magnitude", "ri", "mest")
# The scores density-decay pruning may use (no gradient: it runs at every decay step).
DECAY_SCORES = ("ri", "magnitude")


def _check_nonnegative_number(value: float, name: str, *, strict: bool) -> float:
    bound = "> 0" if strict else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}.")
    if value < 0 or (strict and value == 0):
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return float(value)


def removal_scores(
    weight: torch.Tensor,
    method: str = "magnitude",
    *,
    grad: torch.Tensor | None = None,
    mest_lambda: float = 0.01,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Score each link of a layer for removal: the lowest scores are the first to go.

    - ``"magnitude"``: ``|W|``.
    - ``"ri"`` (relative importance): ``|W| / (colsum(|W|) + eps) + |W| / (rowsum(|W|) + eps)``, where
      ``colsum`` sums over the rows (shape ``1 x n_in``) and ``rowsum`` over the columns (``n_out x 1``):
      a link counts more when it carries a large share of its input's or its output's total strength.
    - ``"mest"``: ``|W| + mest_lambda * |grad|``, with ``grad`` the dense gradient of the weight.

    Args:
        weight (`torch.Tensor`): the masked weight, shape ``(n_out, n_in)``, or a stack
            ``(B, n_out, n_in)`` of layers of one shape (each scored on its own); any float dtype, any device.
        method (`str`, defaults to ``"magnitude"``): one of ``"magnitude"``, ``"ri"``, ``"mest"``.
        grad (`torch.Tensor`, *optional*): dense gradient of ``weight`` (same shape); required for ``"mest"``.
        mest_lambda (`float`, defaults to 0.01): weight of the gradient term of MEST, ``>= 0``.
        eps (`float`, defaults to 1e-5): keeps RI finite for empty rows and columns, ``> 0``.

    Returns:
        `torch.Tensor`: float32 scores of ``weight``'s shape, on its device.

    Example:
        >>> removal_scores(torch.tensor([[1.0, -3.0], [0.0, 2.0]]), "ri").round(decimals=3)
        tensor([[1.2500, 1.3500],
                [0.0000, 1.4000]])
    """
    check_choice("removal method", method, REMOVAL_METHODS)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3):
        check_mask_2d(weight, "weight")  # raises, naming what was passed
    magnitude = weight.detach().float().abs()
    if method == "magnitude":
        return magnitude
    if method == "ri":
        eps = _check_nonnegative_number(eps, "eps", strict=True)
        col_total = magnitude.sum(dim=-2, keepdim=True)  # 1 x n_in: strength of each input neuron
        row_total = magnitude.sum(dim=-1, keepdim=True)  # n_out x 1: strength of each output neuron
        # magnitude / (col_total + eps) + magnitude / (row_total + eps), with one temporary fewer
        by_col = magnitude / (col_total + eps)
        return by_col.add_(magnitude.div_(row_total + eps))
    mest_lambda = _check_nonnegative_number(mest_lambda, "mest_lambda", strict=False)
    if grad is None:
        raise ValueError(
            "method='mest' needs the dense gradient: pass `grad=` (e.g. the weight's .grad accumulated over "
            "the last steps), or use method='magnitude'."
        )
    if not isinstance(grad, torch.Tensor) or grad.shape != weight.shape:
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"`grad` must be a tensor of the weight's shape {tuple(weight.shape)}, got {got}.")
    return magnitude.add_(grad.detach().to(magnitude.device).float().abs(), alpha=mest_lambda)
