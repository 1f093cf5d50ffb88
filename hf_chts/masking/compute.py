"""Sparse compute: a masked ``nn.Linear`` whose trainable weight is its link values.

In sparse compute a masked layer holds its weight as ``weight_values``, one entry per link (plus unused slots
at the end, see below), and its forward and backward run on sparse kernels (:mod:`hf_chts.sparse_ops`), so
the products, the gradient and the optimizer state cost what the links cost. To everything outside the
layer it looks as before:

- ``state_dict()`` holds ``weight`` (dense, exactly 0.0 at masked positions) and ``weight_mask``, the layout
  of dense compute, so checkpoints, compact export, PEFT, lm-eval and the CLI see no difference, and
  ``load_state_dict`` takes either mode's checkpoint;
- ``module.weight`` is a dense, read-only copy of the current weight (a new tensor at every access: read it
  at topology updates and exports, not in a training step); write the values through ``weight_values`` or
  go back to dense compute (:func:`to_dense_compute_`).

Storage: ``weight_values`` keeps the size it had when the layer switched to sparse compute (its capacity:
the link count at that time, the largest of a run whose density only decreases). When the mask changes
(:func:`relink_`, at topology updates), kept links keep their value and their optimizer state, new links
start at 0.0 with zero state, and slots past the current link count hold exactly 0.0 and get no gradient.
The parameter object never changes size, so an optimizer built once (as ``Trainer`` builds it) and DDP's
gradient buckets stay valid. A mask with more links than the capacity grows the storage (a new size: a
warning says the optimizer must be rebuilt).

While a dense-gradient capture is active (:func:`~hf_chts.masking.layers.set_grad_capture_`, at RigL's
update steps) the layer runs the dense product on the weight rebuilt from its link values, so the capture
sees the dense gradient; the gradient of the link values is the same.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..sparse_ops import (
    COMPUTE_MODES,
    LinkIndex,
    dense_from_links,
    link_values,
    links_kept_from,
    sparse_linear,
)
from .buffer import MASK_NAME, as_named_modules, layer_mask
from .layers import GRAD_CAPTURE_ATTR, MaskedLinear, install_grad_masks_
from .optim import inner_optimizer

logger = logging.getLogger(__name__)

__all__ = [
    "COMPUTE_MODES",
    "SPARSE_MAX_DENSITY_CPU",
    "VALUES_NAME",
    "auto_prefers_sparse",
    "dense_parameter_count",
    "is_sparse_compute",
    "link_count",
    "relink_",
    "set_compute_",
    "sparse_compute_blocker",
    "to_dense_compute_",
    "to_sparse_compute_",
    "write_weight_",
]

VALUES_NAME = "weight_values"
_INDEX_ATTR = "_hf_chts_link_index"  # (LinkIndex, mask._version it was built at) in the module's __dict__
_CHOICE_ATTR = "_hf_chts_compute_choice"  # (sparse, why) of the last set_compute_, in the module's __dict__


def is_sparse_compute(module: nn.Module) -> bool:
    """Whether ``module`` runs sparse compute (its trainable weight is ``weight_values``)."""
    return isinstance(module, _SparseComputeMixin)


def link_count(module: nn.Module) -> int:
    """Number of links of a sparse-compute layer (the used part of ``weight_values``)."""
    return _index(module).nnz


def _index(module: nn.Module) -> LinkIndex:
    return module.__dict__[_INDEX_ATTR][0]


def _store_index(module: nn.Module, index: LinkIndex) -> None:
    module.__dict__[_INDEX_ATTR] = (index, layer_mask(module)._version)


class _SparseComputeMixin:
    """The sparse-compute behaviour, mixed in front of a masked ``nn.Linear`` class."""

    @property
    def weight(self) -> torch.Tensor:
        index = _index(self)
        return dense_from_links(self._parameters[VALUES_NAME].detach()[: index.nnz], index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if layer_mask(self)._version != self.__dict__[_INDEX_ATTR][1]:
            relink_(self)  # the mask was written since the index was built (optimizer state: see relink_)
        index = _index(self)
        values = self._parameters[VALUES_NAME][: index.nnz]
        capture = self.__dict__.get(GRAD_CAPTURE_ATTR)
        if capture is not None and torch.is_grad_enabled():
            weight = dense_from_links(values, index)  # differentiable: the gradient of a scatter is a gather
            if weight.requires_grad:
                weight.register_hook(capture)
            return F.linear(x, weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return sparse_linear(x.to(values.dtype), values, index, self.bias)
        return sparse_linear(x.to(values.dtype), values, index, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # today's layout: weight (dense, 0.0 at masked positions), bias, weight_mask, in that order
        values = destination.pop(prefix + VALUES_NAME)
        index = _index(self)
        rest = {k: destination.pop(k) for k in (prefix + "bias", prefix + MASK_NAME) if k in destination}
        weight = dense_from_links(values[: index.nnz], index)
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        destination.update(rest)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key, index = prefix + "weight", None
        if key in state_dict:
            dense = state_dict.pop(key)
            mask = state_dict.get(prefix + MASK_NAME, layer_mask(self))
            index = LinkIndex.from_mask(mask.to(self._parameters[VALUES_NAME].device).bool())
            state_dict[prefix + VALUES_NAME] = _fit(self, link_values(dense.to(index.device), index), index)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        mask = layer_mask(self)
        if mask.device.type != "meta":  # the loaded mask's index: built above when a weight came in
            if index is None or index.device != mask.device:
                index = LinkIndex.from_mask(mask)
            _store_index(self, index)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        mask = layer_mask(self)
        entry = self.__dict__.get(_INDEX_ATTR)
        if entry is not None and entry[0].device != mask.device and mask.device.type != "meta":
            _store_index(self, LinkIndex.from_mask(mask))
        return out


def _fit(module: nn.Module, values: torch.Tensor, index: LinkIndex) -> torch.Tensor:
    """``values`` padded with 0.0 to the capacity of ``module.weight_values``; a load with more links than
    the capacity grows the storage first (before training, as a load usually is: a warning says so)."""
    param = module._parameters[VALUES_NAME]
    if index.nnz > param.numel():
        logger.warning(
            "hf_chts: the loaded weights have %d links, more than the %d a sparse-compute layer stored; its "
            "link values were reallocated, so an optimizer built before must be rebuilt.",
            index.nnz,
            param.numel(),
        )
        param.data = param.data.new_zeros(index.nnz)
    out = torch.zeros(param.numel(), dtype=values.dtype, device=values.device)
    out[: index.nnz] = values
    return out


_SPARSE_CLASSES: dict[type, type] = {}  # masked class -> its sparse-compute class
_DENSE_CLASSES: dict[type, type] = {}  # the reverse


def _sparse_class_for(cls: type) -> type:
    if cls not in _SPARSE_CLASSES:
        name = f"SparseCompute{cls.__name__}"
        _SPARSE_CLASSES[cls] = type(name, (_SparseComputeMixin, cls), {"__module__": __name__})
        _DENSE_CLASSES[_SPARSE_CLASSES[cls]] = cls
        globals()[name] = _SPARSE_CLASSES[cls]  # picklable by name
    return _SPARSE_CLASSES[cls]


def _param_state(optimizer: Any, param: torch.Tensor) -> dict | None:
    if optimizer is None:
        return None
    inner = inner_optimizer(optimizer)
    return inner.state.get(param)


def _swap_in_optimizer(optimizer: Any, old: torch.Tensor, new: torch.Tensor, convert) -> None:
    """Put ``new`` in place of ``old`` in the optimizer; state tensors shaped like ``old`` are converted."""
    if optimizer is None:
        return
    inner = inner_optimizer(optimizer)
    for group in inner.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = inner.state.pop(old, None)
    if state:
        inner.state[new] = {
            k: convert(v) if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()
        }


@torch.no_grad()
def to_sparse_compute_(modules, optimizer: Any = None) -> None:
    """Switch masked ``nn.Linear`` layers to sparse compute, in place (weights, and optimizer state if any).

    Args:
        modules: masked modules (a dict by name, an iterable, or one module) whose class derives from
            ``nn.Linear`` (a GPT-2 ``Conv1D`` is refused: its weight is stored transposed).
        optimizer (*optional*): an optimizer holding the layers' weights: each weight is replaced by the
            layer's ``weight_values`` in its parameter groups, and its state tensors shaped like the weight
            (momentum, Adam moments) keep their values at the links.
    """
    for name, module in as_named_modules(modules):
        if is_sparse_compute(module):
            continue
        if not isinstance(module, MaskedLinear):
            raise ValueError(
                f"Layer {name!r} is a {type(module).__name__}: sparse compute takes masked nn.Linear layers "
                "only. Keep it on dense compute (`compute='dense'`, or 'auto', which does so itself)."
            )
        weight = module._parameters["weight"]
        index = LinkIndex.from_mask(layer_mask(module))
        values = nn.Parameter(link_values(weight.detach(), index).clone(), requires_grad=weight.requires_grad)
        _swap_in_optimizer(optimizer, weight, values, lambda t, index=index: link_values(t, index).clone())
        del module._parameters["weight"]
        install_grad_masks_(module)  # drops the dense weight's gradient-masking hook: nothing left to mask
        module.__class__ = _sparse_class_for(type(module))
        module.register_parameter(VALUES_NAME, values)
        _store_index(module, index)


@torch.no_grad()
def to_dense_compute_(modules, optimizer: Any = None) -> None:
    """Switch sparse-compute layers back to a dense ``weight`` parameter, in place (the inverse of
    :func:`to_sparse_compute_`; the optimizer's references and state follow as there)."""
    for _, module in as_named_modules(modules):
        if not is_sparse_compute(module):
            continue
        index = _index(module)
        values = module._parameters.pop(VALUES_NAME)
        weight = nn.Parameter(dense_from_links(values.detach()[: index.nnz], index), values.requires_grad)
        _swap_in_optimizer(
            optimizer, values, weight, lambda t, index=index: dense_from_links(t[: index.nnz], index)
        )
        del module.__dict__[_INDEX_ATTR]
        module.__class__ = _DENSE_CLASSES[type(module)]  # the masked class it was made from
        module.register_parameter("weight", weight)
        install_grad_masks_(module)


@torch.no_grad()
def relink_(modules, optimizer: Any = None) -> int:
    """Re-index sparse-compute layers whose mask changed: kept links keep their value and optimizer state,
    new links start at 0.0 with zero state, unused slots are 0.0.

    A layer whose mask is unchanged since its index was built (the mask buffer's version counter tells,
    without reading it) is left alone. Returns the number of layers re-indexed.
    """
    changed = 0
    for _, module in as_named_modules(modules):
        if not is_sparse_compute(module):
            continue
        old, version = module.__dict__[_INDEX_ATTR]
        mask = layer_mask(module)
        if mask._version == version:
            continue
        new = LinkIndex.from_mask(mask)
        source, kept = links_kept_from(old, new)
        param = module._parameters[VALUES_NAME]
        state = _param_state(optimizer, param) or {}
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]
        capacity = max(param.numel(), new.nnz)
        if capacity > param.numel():
            logger.warning(
                "hf_chts: a sparse-compute layer grew to %d links beyond its storage of %d; its link values "
                "were reallocated, so an optimizer built before must be rebuilt.",
                new.nnz,
                param.numel(),
            )
        moved = [torch.where(kept, t[source], 0) for t in [param.data] + [state[k] for k in keys]]
        if capacity > param.numel():
            param.data = param.data.new_zeros(capacity)
            for k in keys:
                state[k] = state[k].new_zeros(capacity)
        for tensor, values in zip([param.data] + [state[k] for k in keys], moved, strict=True):
            tensor[new.nnz :] = 0
            tensor[: new.nnz] = values
        _store_index(module, new)
        changed += 1
    return changed


# ------------------------------------------------------------------------------ which layers run sparse
# The largest density at which sparse compute beats dense on a CPU in float32, measured per layer shape with
# benchmarks/bench_sparse_compute.py (benchmarks/results/sparse_compute_cpu.md); docs/DESIGN.md has the rule.
SPARSE_MAX_DENSITY_CPU = 0.15


def sparse_compute_blocker(module: nn.Module) -> str | None:
    """Why ``module`` cannot run sparse compute (a phrase naming the obstacle), or None when it can."""
    if is_sparse_compute(module):
        return None
    if not isinstance(module, MaskedLinear):
        return f"it is a {type(module).__name__} (sparse compute takes masked nn.Linear layers)"
    weight = module._parameters.get("weight")
    if weight is None:
        return "it has no weight parameter"
    if hasattr(weight, "device_mesh"):
        return "its weight is sharded (FSDP2)"
    if not weight.requires_grad:
        return "its weight is frozen (e.g. the base layer of a PEFT adapter)"
    return None


def auto_prefers_sparse(module: nn.Module) -> tuple[bool, str]:
    """The ``compute="auto"`` rule for one layer: ``(sparse, why)`` from its device, dtype and density."""
    mask = layer_mask(module)
    links = link_count(module) if is_sparse_compute(module) else int(mask.sum())
    density = links / mask.numel()  # exact: a float32 mean of 10% links reads 0.10000000149
    dtype = (
        module._parameters.get("weight") if not is_sparse_compute(module) else module.weight_values
    ).dtype
    where = f"{mask.device.type}, {str(dtype).replace('torch.', '')}"
    if mask.device.type != "cpu":
        return False, f"{where}: sparse kernels are not measured faster than dense on {mask.device.type} yet"
    if dtype != torch.float32:
        return False, f"{where}: sparse compute is measured in float32 only"
    if density > SPARSE_MAX_DENSITY_CPU:
        return False, f"{where}, density above {SPARSE_MAX_DENSITY_CPU:.0%}: dense products are as fast"
    return True, f"{where}, density at most {SPARSE_MAX_DENSITY_CPU:.0%}: sparse kernels are faster"


def set_compute_(modules, mode: str, *, optimizer: Any = None, blocker: str | None = None) -> dict[str, bool]:
    """Put masked layers on sparse or dense compute by ``mode`` (``SparseTrainingConfig.compute``), in place.

    Args:
        modules: masked modules by name.
        mode (`str`): ``"sparse"`` (every layer; a layer that cannot raises a ``ValueError`` naming it and the
            fix), ``"dense"``, or ``"auto"`` (:func:`auto_prefers_sparse` per layer; layers that cannot run
            sparse stay dense).
        optimizer (*optional*): an optimizer already holding the layers' weights: its references and state
            follow the switch (:func:`to_sparse_compute_`).
        blocker (`str`, *optional*): a reason the whole run cannot use sparse compute (e.g. FSDP2 or
            torch.compile): ``"auto"`` then keeps every layer dense, ``"sparse"`` raises.

    Returns:
        `dict[str, bool]`: per layer name, whether it now runs sparse compute. ``"auto"`` and ``"sparse"`` log
        the choice of every layer once (one line).
    """
    items = as_named_modules(modules)
    if mode == "dense":
        to_dense_compute_(dict(items), optimizer)
        return {name: False for name, _ in items}
    if mode not in COMPUTE_MODES:
        raise ValueError(
            f"Unknown compute {mode!r}; valid values are: {', '.join(map(repr, COMPUTE_MODES))}."
        )
    choice, why = {}, {}
    for name, module in items:
        reason = blocker or sparse_compute_blocker(module)
        if reason is not None:
            if mode == "sparse":
                raise ValueError(
                    f"compute='sparse' cannot run layer {name!r}: {reason}. Use compute='auto' (which keeps "
                    "such layers dense) or compute='dense'."
                )
            choice[name], why[name] = False, reason
        elif mode == "sparse":
            choice[name], why[name] = True, "compute='sparse'"
        else:
            choice[name], why[name] = auto_prefers_sparse(module)
    to_sparse_compute_({n: m for n, m in items if choice[n]}, optimizer)
    to_dense_compute_({n: m for n, m in items if not choice[n]}, optimizer)
    news = [n for n, m in items if m.__dict__.get(_CHOICE_ATTR) != (choice[n], why[n])]
    for name, module in items:
        module.__dict__[_CHOICE_ATTR] = (choice[name], why[name])
    if news:  # each layer's choice is logged once, and again only if it changes; layers alike in one group
        groups: dict[tuple[bool, str], list[str]] = {}
        for name in news:
            groups.setdefault((choice[name], why[name]), []).append(name)
        logger.info(
            "hf_chts: compute=%r: %d of %d sparse layers run sparse compute. %s",
            mode,
            sum(choice.values()),
            len(choice),
            " ".join(
                f"{'Sparse' if sparse else 'Dense'} ({reason}): {_names(names)}."
                for (sparse, reason), names in groups.items()
            ),
        )
    return choice


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@torch.no_grad()
def write_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Set a masked layer's weight (layout of ``weight``; masked positions are ignored) in either compute."""
    if is_sparse_compute(module):
        index = _index(module)
        values = module._parameters[VALUES_NAME]
        values[: index.nnz] = link_values(weight.to(values.device, values.dtype), index)
    else:
        module.weight.copy_(weight.to(module.weight.device, module.weight.dtype) * layer_mask(module))


def dense_parameter_count(model: nn.Module) -> int:
    """The number of parameters ``model`` has in the dense layout (what its ``state_dict`` holds): a
    sparse-compute layer counts its full ``weight``, not its link values."""
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            sparse = name == VALUES_NAME and is_sparse_compute(module)
            total += layer_mask(module).numel() if sparse else param.numel()
    return total
