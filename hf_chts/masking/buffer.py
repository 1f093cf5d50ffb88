"""A layer's mask: the ``weight_mask`` buffer, its checks, and zeroing the weights it masks.

The lowest module of :mod:`hf_chts.masking`: every other one reads a layer's mask through
:func:`layer_mask` / :func:`has_mask`, validates a mask with :func:`check_mask`, cuts the local shard of a
replicated mask with :func:`local_mask` (FSDP2), and zeroes masked weights with :func:`apply_masks_`.
Knows no layer class and no model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

MASK_NAME = "weight_mask"

__all__ = [
    "MASK_NAME",
    "apply_masks_",
    "as_named_modules",
    "check_mask",
    "has_mask",
    "layer_mask",
    "local_mask",
    "local_tensor",
]


# ------------------------------------------------------------------------------ the mask of a layer
def has_mask(module: nn.Module) -> bool:
    """Whether ``module`` carries a ``weight_mask`` buffer (a masked layer, or one a checkpoint masked)."""
    return MASK_NAME in module._buffers


def layer_mask(module: nn.Module) -> torch.Tensor:
    """The live ``weight_mask`` buffer of ``module`` (bool, in the layout of ``weight``).

    The one accessor of a layer's mask.

    Read straight from the module's buffers (no ``nn.Module.__getattr__`` on the hot path); raises a
    ``KeyError`` naming the module's class when it has no mask.
    """
    try:
        return module._buffers[MASK_NAME]
    except KeyError:
        raise KeyError(
            f"{type(module).__name__} has no {MASK_NAME!r} buffer; it is not a masked layer."
        ) from None


def as_named_modules(modules) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs of ``modules``: a ``{name: module}`` mapping, an iterable or one module.

    An iterable's modules are named by their position (``"0"``, ``"1"``, ...), a single module ``"module"``;
    the names only serve as keys of ``extra_positions`` and in error messages.
    """
    if isinstance(modules, nn.Module):
        return [("module", modules)]
    if isinstance(modules, Mapping):
        return list(modules.items())
    return [(str(i), m) for i, m in enumerate(modules)]


# ------------------------------------------------------------------------------ shards and checks
def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a (possibly FSDP2-sharded) tensor; plain tensors are returned as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def local_mask(full_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of a replicated ``full_mask`` that matches the local shard of ``like`` (a DTensor or not)."""
    if not hasattr(like, "device_mesh"):
        return full_mask.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    mesh = like.device_mesh
    if full_mask.device.type != mesh.device_type:
        full_mask = full_mask.to(local_tensor(like).device)
    # src_data_rank=None: every rank cuts its shard from its own (identical) copy, no communication.
    return distribute_tensor(full_mask, mesh, like.placements, src_data_rank=None).to_local()


def check_mask(name: str, mask: torch.Tensor, module: nn.Module) -> None:
    """Refuse a mask for layer ``name`` that is not a bool tensor shaped like ``module.weight``.

    Raises:
        ValueError: naming the layer, what was given, what was expected and the fix.
    """
    expected = tuple(module.weight.shape)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"Mask of layer {name!r} must be a torch.Tensor, got {type(mask).__name__}.")
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"Mask of layer {name!r} has shape {tuple(mask.shape)}, expected {expected} (the shape of its "
            "weight; GPT-2 Conv1D weights are (n_in, n_out)). Pass masks in the layout of `module.weight`."
        )
    if mask.dtype != torch.bool:
        raise ValueError(
            f"Mask of layer {name!r} has dtype {mask.dtype}, expected torch.bool; convert it with "
            "`mask.bool()`."
        )


@torch.no_grad()
def apply_masks_(modules, extra_positions: Mapping[str, torch.Tensor] | None = None) -> None:
    """Set every masked weight to exactly 0.0 (also under FSDP2, shard by shard).

    Two ``torch._foreach_*`` ops for all modules together: the weights are multiplied by their 0/1 masks and
    then ``+ 0.0`` turns the ``-0.0`` of negative masked entries into ``+0.0``. (A NaN at a masked position
    would stay NaN; it cannot arise while the gradient and the optimizer state there are 0.)

    The callback calls this at topology updates, and after every optimizer step only for optimizers that are
    not known to keep masked weights at 0.0 (see :mod:`hf_chts.masking` and ``SparseTrainingConfig.remask``).

    Args:
        modules (`dict[str, nn.Module]`, iterable of modules, or one module): masked modules.
        extra_positions (`dict[str, torch.Tensor]`, *optional*): per module name, a bool tensor shaped like
            the weight marking further positions to zero (e.g. links grown at this update, which start at 0).
    """
    weights, keeps = [], []
    for name, module in as_named_modules(modules):
        mask = module._buffers.get(MASK_NAME)
        if mask is None:
            raise ValueError(f"Module {name!r} carries no `weight_mask`; sparsify it first (`sparsify_`).")
        weight = module._parameters.get("weight")
        if weight is None:
            continue  # sparse compute (hf_chts.masking.compute): only the links are stored
        keep = mask
        if extra_positions is not None and name in extra_positions:
            keep = mask & ~extra_positions[name].to(mask.device)
        weights.append(local_tensor(weight))
        keeps.append(local_mask(keep, weight))
    if weights:
        torch._foreach_mul_(weights, keeps)
        torch._foreach_add_(weights, 0.0)
