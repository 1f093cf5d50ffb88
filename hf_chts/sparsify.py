"""`sparsify_`: make a model's selected linear layers sparse, in place, with their initial masks.

The verb of the package for any model: select the layers (:func:`hf_chts.masking.find_sparse_modules`), draw
their initial masks (:func:`hf_chts.engine.initial_masks`, the one place masks are drawn) and attach them
(:func:`hf_chts.masking.make_masked_`). It sits above both the engine and the masking so neither imports the
other.

Example:

```python
>>> from torch import nn
>>> from hf_chts import SparseTrainingConfig
>>> from hf_chts.sparsify import sparsify_
>>> model = nn.Sequential(nn.ModuleList([nn.Linear(16, 8)]))
>>> modules = sparsify_(model, SparseTrainingConfig(method="chts", density=0.2))
>>> int(modules["0.0"].weight_mask.sum())
26
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import SparseTrainingConfig
from .engine import initial_masks
from .masking import (
    MASK_NAME,
    apply_masks_,
    find_sparse_modules,
    from_layer_view,
    is_masked,
    keep_masks_out_of_ddp_,
    layer_view_shape,
    make_masked_,
    unwrap_model,
)

__all__ = ["draw_masks", "sparsify_"]


def _device(module: nn.Module) -> torch.device:
    weight = module.weight
    to_local = getattr(weight, "to_local", None)
    return (to_local() if callable(to_local) else weight).device


def draw_masks(
    modules: Mapping[str, nn.Module],
    config: SparseTrainingConfig,
    *,
    generator: torch.Generator | None = None,
    csti_inputs: Any = None,
) -> dict[str, torch.Tensor]:
    """The initial masks of ``modules`` in the layout of their ``weight`` (``Conv1D`` transposed back).

    Per-layer densities depend on every shape (ERK), so pass all the sparse modules of the model at once.
    """
    if not modules:
        return {}
    shapes = {name: layer_view_shape(m) for name, m in modules.items()}
    device = _device(next(iter(modules.values())))
    masks = initial_masks(config, shapes, device=device, generator=generator, csti_inputs=csti_inputs)
    return {name: from_layer_view(m, masks[name]) for name, m in modules.items()}


def sparsify_(
    model: nn.Module,
    config: SparseTrainingConfig,
    *,
    generator: torch.Generator | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    csti_inputs: Any = None,
) -> dict[str, nn.Module]:
    """Make ``model``'s selected linear layers sparse, in place.

    Selects modules with :func:`~hf_chts.masking.find_sparse_modules` (``config.target_modules`` /
    ``config.exclude_modules``), swaps them to the masked forward, attaches ``weight_mask`` buffers
    initialised by ``config.init`` at the step-0 density of each layer (``config.initial_density`` spread by
    ``config.density_distribution``), and sets masked weights to 0.0. Modules that already carry
    ``weight_mask`` keep it.

    Args:
        model (`nn.Module`): the model.
        config (`SparseTrainingConfig`): the sparse-training settings.
        generator (`torch.Generator`, *optional*): draws every layer's mask in turn from this generator; by
            default each layer gets its own generator seeded from ``(config.seed, layer name)``.
        masks (`dict[str, torch.Tensor]`, *optional*): masks to use instead of drawing them (layout of
            ``weight``), e.g. the ones a ``TopologyEngine`` produced.
        csti_inputs (*optional*): calibration inputs (samples x n_features) of ``config.init == "csti"``.

    Returns:
        `dict[str, nn.Module]`: the sparse modules by name.
    """
    if not isinstance(config, SparseTrainingConfig):
        raise ValueError(f"`config` must be a SparseTrainingConfig, got {type(config).__name__}.")
    model = unwrap_model(model)
    modules = find_sparse_modules(model, config.target_modules, config.exclude_modules)
    todo = {name: m for name, m in modules.items() if MASK_NAME not in m._buffers}
    if masks is not None:
        missing = sorted(set(todo) - set(masks))
        if missing:
            raise ValueError(
                f"`masks` lacks {len(missing)} selected layers, e.g. {missing[:4]}; pass one mask per layer "
                "returned by `find_sparse_modules`."
            )
        drawn = {name: masks[name] for name in todo}
    elif todo:
        drawn = draw_masks(modules, config, generator=generator, csti_inputs=csti_inputs)
    else:
        drawn = {}
    for name, module in todo.items():
        make_masked_(module, drawn[name].to(_device(module)), name=name)
    for name, module in modules.items():
        if not is_masked(module):  # carried a buffer but a plain forward: switch to the masked forward
            make_masked_(module, name=name)
    apply_masks_(modules)
    keep_masks_out_of_ddp_(model)
    return modules
