"""PEFT on sparse models: which layers a ``PeftModel`` lets the callback evolve, a masked merge, ShiRA masks.

- LoRA (or any PEFT adapter) wraps a sparse layer without changing it: the adapter's ``base_layer`` is the
  masked module itself, so the masked forward, the ``weight_mask`` buffer and the zeros stay as they are, and
  ``get_peft_model`` freezes the base. See docs/peft.md.
- :func:`callback_modules` is what :class:`~hf_chts.callback.CHTssCallback` calls on a ``PeftModel``: frozen
  sparse layers are never evolved (their topology is part of the base checkpoint); trainable ones are.
- :func:`merge_and_unload` folds the adapters into the base, then sets every masked weight back to 0.0, so
  the result is a sparse model that saves and reloads as before.
- :func:`shira_mask_fn` gives PEFT's ShiRA adapter (``ShiraConfig.mask_fn``) a brain-inspired sparse
  topology (BRF, ER, BSW, BSF) with exactly ShiRA's number of trainable entries.

``peft`` is an optional dependency (``pip install "hf_chts[peft]"``); it is imported only inside the
functions that need it.

Example:

```python
>>> from peft import LoraConfig, get_peft_model  # doctest: +SKIP
>>> import hf_chts
>>> peft_model = get_peft_model(sparse_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
>>> # ... train ...
>>> merged = hf_chts.merge_and_unload(peft_model)  # a SparseLlamaForCausalLM, masked weights 0.0
>>> merged.save_pretrained("out")
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .masking import apply_masks_, has_mask, is_masked, layer_mask, layer_view_shape, unwrap_model

logger = logging.getLogger(__name__)

# The first PEFT release whose ShiraConfig accepts a custom `mask_fn`.
SHIRA_MIN_PEFT = "0.17.0"

__all__ = ["SHIRA_MIN_PEFT", "callback_modules", "is_peft_model", "merge_and_unload", "shira_mask_fn"]


def _import_peft(feature: str):
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"{feature} needs PEFT: `pip install 'hf_chts[peft]'` "
            f"(or `pip install 'peft>={SHIRA_MIN_PEFT}'`)."
        ) from err
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (checked without importing PEFT when it is not loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _tuner_base_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{adapter layer name: its base layer}`` for every PEFT tuner layer (LoRA, ShiRA, ...) in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: module.get_base_layer()
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def callback_modules(model: nn.Module, modules: dict[str, nn.Module], carried: bool) -> dict[str, nn.Module]:
    """The sparse layers of a ``PeftModel`` that ``CHTssCallback`` evolves: the trainable ones only.

    Args:
        model (`peft.PeftModel`): the model the Trainer trains.
        modules (`dict[str, nn.Module]`): the sparse layers the callback selected, by name.
        carried (`bool`): whether the model already carried masks (a sparse base); without them there is no
            sparse layer to keep: the base of a ``PeftModel`` is frozen, and the adapter's own factors are not
            sparse layers.

    Returns:
        `dict[str, nn.Module]`: the layers to evolve; empty when there are none (the callback then does
        nothing: the frozen base keeps the masks it was trained with).

    Raises:
        ValueError: when a trainable sparse layer is also the base of an adapter (e.g. a LoRA target whose
            weight was unfrozen): evolving its topology while the adapter learns a dense update on top of it
            would make the merged model lose that update wherever the mask moves.
    """
    if not carried:
        logger.warning(
            "hf_chts: the base of this PeftModel carries no masks, so CHTssCallback has nothing to evolve "
            "and does nothing. Make the base sparse first (SparseLlamaForCausalLM or `hf_chts.sparsify_`), "
            "then call `get_peft_model`."
        )
        return {}
    bases = {id(base): name for name, base in _tuner_base_layers(model).items()}
    frozen = [name for name, m in modules.items() if not m.weight.requires_grad]
    trainable = {name: m for name, m in modules.items() if m.weight.requires_grad}
    conflicts = [name for name, m in trainable.items() if id(m) in bases]
    if conflicts:
        raise ValueError(
            f"Sparse layer {conflicts[0]!r} ({len(conflicts)} in all) is the base of a PEFT adapter and its "
            "weight is trainable, so CHTssCallback would evolve its topology while the adapter learns a "
            "dense update on top of it; merging would then drop the update wherever the mask moved. Either "
            "freeze it (`get_peft_model` does; keep the base frozen) to fine-tune on a fixed topology, "
            "or remove that layer from the adapter's `target_modules` to let the callback evolve it."
        )
    if frozen:
        logger.warning(
            "hf_chts: PeftModel: %d frozen sparse layers keep their masks and are not evolved (e.g. %s); "
            "%d trainable sparse layers are evolved.",
            len(frozen),
            frozen[0],
            len(trainable),
        )
    if not trainable:
        logger.warning("hf_chts: no trainable sparse layer in this PeftModel; CHTssCallback does nothing.")
    return trainable


@torch.no_grad()
def merge_and_unload(
    peft_model: nn.Module, *, safe_merge: bool = False, adapter_names: list[str] | None = None
) -> nn.Module:
    """Fold PEFT adapters into a sparse base and set the masked weights back to 0.0.

    PEFT's own ``merge_and_unload`` adds each adapter's update (dense for LoRA) to the base weight, which
    would fill the masked positions. This runs it, then re-applies every ``weight_mask``: the result keeps
    the base's topology exactly and saves / reloads as a sparse model. The part of the update outside the
    mask is dropped; its share is logged per merge (docs/peft.md measures what it does to the outputs).

    Args:
        peft_model (`peft.PeftModel`): a PEFT model whose base model carries ``weight_mask`` buffers.
        safe_merge (`bool`, defaults to `False`): passed to PEFT (checks the merged weights for NaNs).
        adapter_names (`list[str]`, *optional*): adapters to merge (default: the active ones).

    Returns:
        `nn.Module`: the base model with the adapters merged and the wrappers removed, masked weights 0.0.

    Raises:
        ValueError: when ``peft_model`` is not a ``PeftModel``, when its base is not sparse (use PEFT's
            ``peft_model.merge_and_unload()`` for a dense merge), or when a ``weight_mask`` is not a bool
            tensor of its weight's shape (naming the layer); nothing is changed then.
    """
    _import_peft("hf_chts.merge_and_unload")
    if not is_peft_model(peft_model):
        raise ValueError(
            f"merge_and_unload expects a peft.PeftModel, got {type(peft_model).__name__}; wrap the sparse "
            "model with `peft.get_peft_model` first."
        )
    base = unwrap_model(peft_model.get_base_model())
    masked = [m for m in base.modules() if has_mask(m)]
    if not masked:
        raise ValueError(
            f"The base model ({type(base).__name__}) carries no `weight_mask` buffers: it is not sparse, so "
            "there is no sparsity to keep and nothing was changed. Use PEFT's "
            "`peft_model.merge_and_unload()` for a dense merge."
        )
    _check_masks_before_merge(base)  # PEFT merges in place: refuse before any layer changes
    before = {id(m): m.weight.detach().clone() for m in masked}
    merged = peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    modules = {name: m for name, m in merged.named_modules() if has_mask(m)}
    kept_sq = dropped_sq = 0.0
    for module in modules.values():
        delta = module.weight.detach().float() - before[id(module)].float()
        mask = layer_mask(module)
        kept_sq += float(delta[mask].square().sum())
        dropped_sq += float(delta[~mask].square().sum())
        if not is_masked(module):  # a plain forward after unwrapping: switch back to the masked forward
            from .masking import make_masked_

            make_masked_(module)
        weight = module._parameters.get("weight")
        if weight is not None:  # masked_fill, not a product: a NaN at a masked position becomes 0.0 too
            weight.data.masked_fill_(~mask.to(weight.device), 0.0)
    apply_masks_(modules)
    total = kept_sq + dropped_sq
    if total > 0:
        logger.info(
            "hf_chts: merged the adapters into %d sparse layers; %.1f%% of the update's squared norm lies "
            "outside the masks and was dropped.",
            len(modules),
            100.0 * dropped_sq / total,
        )
    return merged


def _check_masks_before_merge(base: nn.Module) -> None:
    """Refuse a ``weight_mask`` that is not a bool tensor of its weight's shape, naming the layer and the fix.

    Checked for every layer before PEFT merges any: its merge changes the weights in place, so a bad mask
    found half-way would leave every layer merged (dense) and the model's sparsity lost.
    """
    for name, module in base.named_modules():
        if not has_mask(module):
            continue
        mask, weight = layer_mask(module), getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else None
        if mask.dtype != torch.bool or (shape is not None and tuple(mask.shape) != shape):
            raise ValueError(
                f"Layer {name!r} has a weight_mask of dtype {mask.dtype} and shape {tuple(mask.shape)}; "
                f"expected torch.bool of the weight's shape {shape}. Nothing was merged. Fix the mask "
                f"(e.g. `module.weight_mask = (mask != 0)` with the weight's shape), or reload the sparse "
                "base from its checkpoint, then merge again."
            )


def shira_mask_fn(init: str = "brf", *, seed: int = 0, **params: Any) -> Callable[..., torch.Tensor]:
    """A ``ShiraConfig.mask_fn`` that draws ShiRA's sparse adapter with a brain-inspired topology.

    ShiRA trains ``r * (n_in + n_out)`` entries of each target weight (as many parameters as a rank-``r``
    LoRA). The returned function draws exactly that many positions with
    :func:`hf_chts.topology.init.init_mask` (``"brf"`` bipartite receptive field, ``"er"`` uniform, ``"bsw"``
    small world, ``"bsf"`` scale free; see docs/peft.md). Layers draw in turn from one generator seeded with
    ``seed``, so the same model and seed give the same adapter.

    Args:
        init (`str`, defaults to `"brf"`): topology: ``"brf"``, ``"er"``, ``"bsw"`` or ``"bsf"``.
        seed (`int`, defaults to 0): seed of the generator.
        **params: the topology's parameters (BRF ``r`` (the randomness, not ShiRA's ``r``) and
            ``degree_dist``; BSW ``beta``).

    Returns:
        A function ``mask_fn(base_layer, r, **kwargs) -> mask`` (``(n_out, n_in)``, 0/1 in the base weight's
        dtype, on its device), as ShiRA expects.

    Raises:
        ImportError: when the installed PEFT has no ShiRA adapter, naming the version that has it.

    Example:

    ```python
    >>> from peft import ShiraConfig, get_peft_model  # doctest: +SKIP
    >>> config = ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], mask_type="brf")
    >>> config.mask_fn = shira_mask_fn("brf", r=0.3)
    >>> peft_model = get_peft_model(model, config)
    ```
    """
    peft = _import_peft("shira_mask_fn")
    if not hasattr(peft, "ShiraConfig"):
        raise ImportError(
            f"PEFT {peft.__version__} has no ShiRA adapter; ShiraConfig with `mask_fn` arrived in peft "
            f"{SHIRA_MIN_PEFT}: `pip install 'peft>={SHIRA_MIN_PEFT}'`."
        )
    from .topology.init import INIT_METHODS, init_mask

    if init not in INIT_METHODS:
        raise ValueError(f"`init` must be one of {sorted(INIT_METHODS)}, got {init!r}.")
    if not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    init_mask(
        (4, 4), 0.5, init, generator=torch.Generator().manual_seed(0), **params
    )  # reject bad params now
    generator = torch.Generator().manual_seed(seed)

    def mask_fn(base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        n_out, n_in = layer_view_shape(base_layer)
        n_links = r * (n_out + n_in)
        if n_links > n_out * n_in:
            raise ValueError(
                f"ShiRA r={r} asks for {n_links} entries of a {n_out}x{n_in} weight ({n_out * n_in} in all); "
                f"lower `r` to at most {n_out * n_in // (n_out + n_in)}."
            )
        mask = init_mask((n_out, n_in), n_links / (n_out * n_in), init, generator=generator, **params)
        weight = base_layer.weight
        return mask.to(device=weight.device, dtype=weight.dtype)

    return mask_fn
