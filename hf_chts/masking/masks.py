"""A model's masks by layer name: read them, set them (masking layers as needed), keep them out of DDP.

:func:`get_masks` returns the live ``weight_mask`` buffers of every masked layer, :func:`set_masks_` copies
masks in (checking every one first, turning plain layers into masked ones) and
:func:`keep_masks_out_of_ddp_` spares DDP the broadcast of masks every rank already holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .buffer import MASK_NAME, apply_masks_, check_mask, has_mask, layer_mask
from .layers import is_masked, make_masked_
from .selection import unwrap_model

__all__ = ["get_masks", "keep_masks_out_of_ddp_", "set_masks_"]


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``weight_mask`` buffers of every masked module, by module name, in the layout of ``weight``.

    These are the live buffers, not copies: ``.clone()`` them to keep a snapshot.
    """
    model = unwrap_model(model)
    return {name: layer_mask(m) for name, m in model.named_modules() if has_mask(m)}


def keep_masks_out_of_ddp_(model: nn.Module) -> list[str]:
    """Keep ``model``'s ``weight_mask`` buffers out of DDP's broadcasts; returns their names.

    DDP broadcasts every buffer from rank 0 before each forward (``broadcast_buffers=True``, the default);
    for the masks that is one copy of every sparse layer's shape per step (6.5 GB at LLaMA-7B) for nothing:
    every rank draws the same masks from the same counter-based streams, loads the same checkpoint, and gets
    each topology update's masks from the callback's own broadcast. DDP reads the list
    ``model._ddp_params_and_buffers_to_ignore`` (names relative to the module it wraps) when it is built, so
    call this on the module that will be wrapped, before wrapping; names already in the list are kept. A
    model without masks is left as it is.
    """
    names = [f"{name}.{MASK_NAME}" if name else MASK_NAME for name in get_masks(model)]
    if not names:
        return names
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    known = set(ignored)
    model._ddp_params_and_buffers_to_ignore = ignored + [n for n in names if n not in known]
    return names


def set_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor], *, apply: bool = True) -> None:
    """Copy ``masks`` into the modules' ``weight_mask`` buffers (masking modules that are not masked yet).

    Args:
        model (`nn.Module`): the model.
        masks (`dict[str, torch.Tensor]`): module name -> bool tensor shaped like that module's ``weight``.
        apply (`bool`, defaults to `True`): also set the newly masked weights to 0.0.

    Raises:
        ValueError: on an unknown module name, a wrong shape or a non-bool dtype, naming the layer, what was
            expected and what was given. Nothing is modified when any mask is invalid.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            known = [n for n, m in modules.items() if has_mask(m)][:8]
            raise ValueError(
                f"No module named {name!r} in {type(model).__name__} to receive a mask; masked modules "
                f"include {known}. Use the names returned by `get_masks(model)`."
            )
        check_mask(name, mask, modules[name])
    for name, mask in masks.items():
        module = modules[name]
        if not is_masked(module):
            make_masked_(module, name=name)
        with torch.no_grad():
            layer_mask(module).copy_(mask)
    if apply:
        apply_masks_({name: modules[name] for name in masks})
