"""The optimizer side of masking: which optimizers keep masked weights at 0.0, and zeroing their state.

Masked weights stay exactly 0.0 through an optimizer step when the gradient and the optimizer state are 0
there and the optimizer's rule is element-wise (:data:`ZERO_PRESERVING_OPTIMIZERS`,
:func:`keeps_masked_weights_zero`); :func:`zero_optimizer_state_` zeroes that state at masked and newly grown
positions, and :func:`remask_every_step` decides whether weights must be re-masked after every step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from .buffer import as_named_modules, layer_mask, local_mask, local_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "ZERO_PRESERVING_OPTIMIZERS",
    "keeps_masked_weights_zero",
    "remask_every_step",
    "zero_optimizer_state_",
]


ZERO_PRESERVING_OPTIMIZERS: tuple[str, ...] = (
    "torch.optim.adadelta.Adadelta",
    "torch.optim.adagrad.Adagrad",
    "torch.optim.adam.Adam",
    "torch.optim.adamax.Adamax",
    "torch.optim.adamw.AdamW",
    "torch.optim.nadam.NAdam",
    "torch.optim.radam.RAdam",
    "torch.optim.rmsprop.RMSprop",
    "torch.optim.sgd.SGD",
    "transformers.optimization.Adafactor",
)


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer itself: an ``AcceleratedOptimizer`` (it holds one as ``.optimizer``) unwrapped."""
    return getattr(optimizer, "optimizer", optimizer)


def keeps_masked_weights_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` leaves a weight at exactly 0.0 when its gradient and optimizer state are 0 there.

    True for the classes in :data:`ZERO_PRESERVING_OPTIMIZERS` (an ``AcceleratedOptimizer`` is unwrapped):
    with masked gradients and the state zeroed at masked positions (:func:`zero_optimizer_state_`), masked
    weights then stay 0.0 without re-masking. Optimizers that mix positions (Shampoo, Muon, GaLore's
    projections) or are simply unknown return False: re-mask after every step with :func:`apply_masks_`.
    """
    inner = inner_optimizer(optimizer)
    cls = type(inner)
    return f"{cls.__module__}.{cls.__qualname__}" in ZERO_PRESERVING_OPTIMIZERS


def remask_every_step(mode: str, optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether masked weights must be zeroed after every optimizer step, for ``SparseTrainingConfig.remask``.

    ``"every_step"`` / ``"update_steps"`` decide it; ``"auto"`` re-masks unless the optimizer is known to keep
    masked weights at 0.0 (:func:`keeps_masked_weights_zero`), and says so when it re-masks.
    """
    if mode != "auto":
        return mode == "every_step"
    if optimizer is not None and keeps_masked_weights_zero(optimizer):
        return False
    logger.info(
        "hf_chts: %s is not known to keep masked weights at 0.0; they are zeroed after every optimizer step "
        "(set remask='update_steps' to skip this if it does).",
        type(inner_optimizer(optimizer)).__name__,
    )
    return True


@torch.no_grad()
def zero_optimizer_state_(
    optimizer: torch.optim.Optimizer,
    modules,
    extra_positions: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Zero the optimizer state of sparse weights at masked (and ``extra_positions``) entries.

    Every state tensor shaped exactly like the weight is zeroed there: Adam/AdamW ``exp_avg`` and
    ``exp_avg_sq``, SGD ``momentum_buffer``, Adafactor's unfactored ``exp_avg`` / ``exp_avg_sq``. State
    tensors of another shape are left as they are: scalars such as ``step``, and Adafactor's factored second
    moment (``exp_avg_sq_row`` / ``exp_avg_sq_col``, one value per row / column). Those are running means over
    a whole row or column, which a single link does not own; since the gradient at a masked link is exactly 0,
    a masked weight still receives a zero update from them.

    Args:
        optimizer (`torch.optim.Optimizer`): the optimizer (an ``AcceleratedOptimizer`` is unwrapped).
        modules (`dict[str, nn.Module]`): masked modules by name.
        extra_positions (`dict[str, torch.Tensor]`, *optional*): per module name, bool tensors shaped like the
            weight of further positions to zero (the links grown at this update).

    Returns:
        The number of state tensors touched.
    """
    inner = inner_optimizer(optimizer)
    state = inner.state
    touched = 0
    for name, module in as_named_modules(modules):
        weight = module._parameters.get("weight")
        if weight is None:
            continue  # sparse compute: relink_ carries the state of the link values
        param_state = state.get(weight)
        if not param_state:
            continue
        zero = ~layer_mask(module)
        if extra_positions is not None and name in extra_positions:
            zero = zero | extra_positions[name].to(zero.device)
        local_zero = None
        for value in param_state.values():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(weight.shape):
                if local_zero is None:
                    local_zero = local_mask(zero, value)
                local_tensor(value).masked_fill_(local_zero, 0)
                touched += 1
    return touched
