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

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import SparseTrainingConfig, record_settings_
from .distributed import Collectives, broadcast_from_rank0_
from .engine import TopologyEngine, initial_masks
from .masking import (
    MASK_NAME,
    apply_masks_,
    find_sparse_modules,
    from_layer_view,
    has_mask,
    install_grad_masks_,
    is_masked,
    keep_masks_out_of_ddp_,
    layer_mask,
    layer_view_shape,
    make_masked_,
    relink_,
    set_compute_,
    unwrap_model,
)
from .stats import masks_density

__all__ = ["draw_masks", "run_modules", "sparsify_", "start_masks_"]

logger = logging.getLogger(__name__)


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
    apply_compute: bool = True,
) -> dict[str, nn.Module]:
    """Make ``model``'s selected linear layers sparse, in place.

    Selects modules with :func:`~hf_chts.masking.find_sparse_modules` (``config.target_modules`` /
    ``config.exclude_modules``), swaps them to the masked forward, attaches ``weight_mask`` buffers
    initialised by ``config.init`` at the step-0 density of each layer (``config.initial_density`` spread by
    ``config.density_distribution``), and sets masked weights to 0.0. Modules that already carry
    ``weight_mask`` keep it. A transformers model records ``config`` in ``model.config.sparsity``, so
    ``save_pretrained`` writes the settings into ``config.json``.

    Args:
        model (`nn.Module`): the model.
        config (`SparseTrainingConfig`): the sparse-training settings.
        generator (`torch.Generator`, *optional*): draws every layer's mask in turn from this generator; by
            default each layer gets its own generator seeded from ``(config.seed, layer name)``.
        masks (`dict[str, torch.Tensor]`, *optional*): masks to use instead of drawing them (layout of
            ``weight``), e.g. the ones a ``TopologyEngine`` produced.
        csti_inputs (*optional*): calibration inputs (samples x n_features) of ``config.init == "csti"``.
        apply_compute (`bool`, *optional*, defaults to `True`): put the layers on the compute that
            ``config.compute`` asks for (:func:`~hf_chts.masking.set_compute_`; build the optimizer
            afterwards: sparse compute replaces a layer's ``weight`` parameter by ``weight_values``).
            ``False`` leaves them on dense compute (the callback switches them itself, with the optimizer).

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
    record_settings_(model, config)  # save_pretrained writes them into config.json
    if apply_compute:
        set_compute_(modules, config.compute)
    return modules


def run_modules(model: nn.Module, config: SparseTrainingConfig) -> tuple[dict[str, nn.Module], bool]:
    """The layers a run trains sparse, and whether the model already carries their masks.

    A model with ``weight_mask`` buffers (``sparsify_``-ed, a ``SparseLlama*``, or loaded from a sparse
    checkpoint) keeps exactly those layers, switched to the masked forward where a plain layer holds the
    buffer; otherwise ``config.target_modules`` / ``config.exclude_modules`` select them.
    """
    carried = any(has_mask(m) for m in model.modules())
    if not carried:
        return find_sparse_modules(model, config.target_modules, config.exclude_modules), False
    modules = {name: m for name, m in model.named_modules() if has_mask(m)}
    for name, module in modules.items():
        if not is_masked(module):  # a buffer but a plain forward (e.g. loaded into nn.Linear)
            make_masked_(module, name=name)
    return modules, True


@torch.no_grad()
def start_masks_(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    engine: TopologyEngine,
    collectives: Collectives | None = None,
    *,
    carried: bool,
    masks: Mapping[str, torch.Tensor] | None = None,
    fresh: bool = True,
) -> float:
    """Put the masks a run starts with into ``modules`` on every rank, masked weights at 0.0 (in place).

    Args:
        model (`nn.Module`): the model of ``modules``.
        modules: the run's sparse layers (:func:`run_modules`).
        engine (`TopologyEngine`): the run's engine; it draws the initial topology.
        collectives (`Collectives`, *optional*): the run's collectives; every rank then takes rank 0's masks
            (drawn from the same seed everywhere, so this only makes identity certain).
        carried (`bool`): whether the model carries masks already.
        masks: masks to resume with (layout of ``weight``); they go straight in, since drawing initial masks
            first would zero weights the checkpoint holds at positions that are links again by now.
        fresh (`bool`): the run is at step 0. Carried masks that do not fit the run's step-0 schedule (drawn
            for another setting, or a dense all-True start) are then re-drawn, with a warning.

    Returns:
        `float`: the global density of the masks (links / positions over all layers).
    """
    _place_masks(model, modules, engine, carried=carried, masks=masks, fresh=fresh)
    if collectives is not None:
        broadcast_from_rank0_(collectives, [layer_mask(m) for m in modules.values()])
    apply_masks_(modules)
    relink_(modules)  # sparse-compute layers whose mask was set here re-index their links
    install_grad_masks_(modules)  # weights replaced since masking (e.g. loaded) get the hook back
    density = masks_density(layer_mask(m) for m in modules.values())
    config = engine.config
    logger.warning(  # the one start-up line: a Trainer user sees WARNING, not INFO
        "hf_chts: %d sparse layers, method=%s, global density %.4f (target %.4f, %s schedule), update every "
        "%d steps until step %d of %d.",
        len(modules),
        config.method,
        density,
        config.density,
        config.density_schedule,
        config.update_interval,
        engine.t_end,
        engine.max_steps,
    )
    return density


def _place_masks(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    engine: TopologyEngine,
    *,
    carried: bool,
    masks: Mapping[str, torch.Tensor] | None,
    fresh: bool,
) -> None:
    config = engine.config
    if masks is not None:
        if not carried:
            sparsify_(model, config, masks=masks, apply_compute=False)
            return
        for name, module in modules.items():
            layer_mask(module).copy_(masks[name].to(layer_mask(module).device))
        return
    if carried and not fresh:
        return
    if carried:
        counts = [(n, int(layer_mask(m).sum()), engine.target_nnz(n, 0)) for n, m in modules.items()]
        mismatch = [item for item in counts if item[1] != item[2]]
        if not mismatch:
            return
    first = next(iter(modules.values()))
    init = engine.init_masks(layer_mask(first).device if carried else _device(first))
    drawn = {name: from_layer_view(m, init[name]) for name, m in modules.items()}
    if not carried:
        sparsify_(model, config, masks=drawn, apply_compute=False)
        return
    for name, module in modules.items():
        layer_mask(module).copy_(drawn[name])
    name, nnz, target = mismatch[0]
    logger.warning(
        "hf_chts: the model's masks do not fit the step-0 schedule of %r (layer %r has %d links, expected "
        "%d); drew the initial topology of this run for %d layers.",
        config.method,
        name,
        nnz,
        target,
        len(modules),
    )


def compute_blocker(args: Any, *, drawn_after_wrap: bool = False) -> str | None:
    """What rules out sparse compute for a whole ``Trainer`` run (from its ``TrainingArguments``), or None.

    ``drawn_after_wrap``: the masks were drawn after the Trainer wrapped the model for DDP, whose gradient
    buckets then hold the dense weights.
    """
    if args is not None:
        if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            return "the run shards its weights with FSDP"
        if getattr(args, "deepspeed", None):
            return "the run uses DeepSpeed"
        if getattr(args, "torch_compile", False):
            return "the run uses torch.compile, which does not trace the sparse kernels"
    if drawn_after_wrap:
        return (
            "the masks were drawn after the Trainer wrapped the model for DDP (make the model sparse with "
            "`sparsify_(model, config)` before building the Trainer)"
        )
    return None


def set_carried_compute_(model: nn.Module, config: SparseTrainingConfig, args: Any, optimizer: Any) -> bool:
    """Put the masked layers a model carries on ``config.compute`` before a Trainer wraps it; whether it had
    any."""
    masked = {name: m for name, m in model.named_modules() if has_mask(m) and is_masked(m)}
    if not masked:
        return False
    set_compute_(masked, config.compute, optimizer=optimizer, blocker=compute_blocker(args))
    return True
