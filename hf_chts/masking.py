"""Which modules are sparse, their ``weight_mask`` buffers, the masked forward and optimizer-state zeroing.

A sparse module is an ``nn.Linear`` or a GPT-2 style ``transformers.pytorch_utils.Conv1D`` that carries a
persistent ``torch.bool`` buffer named ``weight_mask`` shaped exactly like its ``weight`` (see docs/DESIGN.md,
"Masks"). The module's class is swapped in place to a masked subclass (:class:`MaskedLinear`,
:class:`MaskedConv1D`).

The masked forward costs what the dense one costs, plus one in-place multiply of each weight's gradient:

- **Masked weights are exactly 0.0** whenever a forward runs. Every entry point keeps them so:
  :func:`sparsify_`, :func:`set_masks_`, :func:`make_masked_`, ``load_state_dict`` (a checkpoint whose masked
  weights are non-zero is zeroed on load), the callback at the start of training and at every topology
  update. The forward therefore uses ``weight`` itself (no masked copy): it equals ``weight * weight_mask``.
- **The gradient is masked once, in backward.** A post-accumulate-grad hook on the weight multiplies
  ``weight.grad`` by the mask in place, right after autograd accumulated it and before DDP's reducer sees it,
  so the gradient at masked positions is exactly 0 before any clipping, with gradient accumulation, under
  DDP and ``torch.compile`` (the hook runs eagerly after the compiled backward). Where the hook cannot sit
  on the tensor the forward uses (FSDP2 all-gathers into a separate unsharded parameter; a weight replaced
  behind the module's back), the forward routes the weight through an identity autograd function whose
  backward masks the gradient: the same result, one view op more.
- **Masked weights stay exactly 0.0 through the optimizer step** when the gradient and the optimizer state
  are 0 there, for the element-wise optimizers listed in :data:`ZERO_PRESERVING_OPTIMIZERS` (AdamW, SGD with
  momentum and weight decay, Adafactor, ...): their update at such a position is exactly 0. Any other
  optimizer (e.g. Shampoo, Muon, GaLore, which mix positions) needs :func:`apply_masks_` after every step,
  which the callback does unless told otherwise (``SparseTrainingConfig.remask``).

Rule for code that writes weights directly (``weight.data.normal_()``, a hand-made optimizer): call
:func:`apply_masks_` afterwards.

Masks survive ``copy.deepcopy``, ``torch.save`` (the classes are importable), ``save_pretrained`` (the mask
is an ordinary persistent buffer: ``<module name>.weight_mask`` in ``model.safetensors``) and ``model.to()``
(bool buffers keep their dtype; the gradient hook follows the weight).

Example:

```python
>>> import torch
>>> from hf_chts.masking import MaskedLinear
>>> layer = MaskedLinear(4, 3, bias=False)
>>> layer.weight_mask.shape, layer.weight_mask.dtype
(torch.Size([3, 4]), torch.bool)
```
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

MASK_NAME = "weight_mask"
# Attributes in a masked module's instance ``__dict__`` (never buffers or parameters, so never in a state
# dict): the gradient-masking hook of its weight (:class:`_GradMask`, also set on the weight tensor it sits
# on), the dense-gradient capture hook of :func:`set_grad_capture_` and the handle of that hook when it sits
# on the weight itself.
_MASK_HOOK_ATTR = "_hf_chts_grad_mask"
_GRAD_HOOK_ATTR = "_hf_chts_grad_hook"
_GRAD_HANDLE_ATTR = "_hf_chts_grad_hook_handle"

__all__ = [
    "MASK_NAME",
    "ZERO_PRESERVING_OPTIMIZERS",
    "MaskedConv1D",
    "MaskedLinear",
    "apply_masks_",
    "find_sparse_modules",
    "from_layer_view",
    "get_masks",
    "has_mask",
    "install_grad_masks_",
    "is_masked",
    "keeps_masked_weights_zero",
    "layer_mask",
    "layer_view",
    "layer_view_shape",
    "make_masked_",
    "masked_weight",
    "remask_every_step",
    "set_grad_capture_",
    "set_masks_",
    "unmask_",
    "unwrap_model",
    "zero_optimizer_state_",
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


# ------------------------------------------------------------------------------ masked forward
class _MaskGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by the mask in backward (one view op, one multiply)."""

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class _GradMask:
    """Post-accumulate-grad hook of one sparse weight: ``weight.grad *= weight_mask`` in place.

    The weight it sits on is tagged with it (an attribute of the Python tensor object) and it remembers the
    address of that tensor's C++ object, which changes when ``torch.utils.swap_tensors`` moves the hook away;
    :meth:`covers` tells the forward whether the tensor it is about to use carries this hook. No reference
    to the weight is kept: a replaced weight is freed as usual.
    """

    __slots__ = ("cdata", "handle", "module_ref")

    def __init__(self, module: nn.Module, weight: torch.Tensor):
        self.module_ref = weakref.ref(module)
        self.cdata = weight._cdata
        self.handle = weight.register_post_accumulate_grad_hook(self)
        # The hook dict lives on the Python object, the link to it on the C++ tensor: after
        # ``swap_tensors`` the dict stays here unlinked. Assigning it (re)links it to the current C++ tensor.
        weight._post_accumulate_grad_hooks = weight._post_accumulate_grad_hooks
        setattr(weight, _MASK_HOOK_ATTR, self)

    def __call__(self, weight: torch.Tensor) -> None:
        module = self.module_ref()
        grad = weight.grad
        if module is None or grad is None:
            return
        with torch.no_grad():
            grad.mul_(layer_mask(module))

    def covers(self, weight: torch.Tensor) -> bool:
        if getattr(weight, _MASK_HOOK_ATTR, None) is not self:
            return False
        # Under torch.compile the tag (guarded by dynamo) is enough; eagerly, also check the C++ tensor.
        return torch.compiler.is_compiling() or weight._cdata == self.cdata

    def remove(self) -> None:
        self.handle.remove()

    def __reduce__(self):
        # A pickled or deep-copied tensor does not carry the hook, so it does not carry the tag either.
        return (type(None), ())


def _is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def install_grad_masks_(modules) -> int:
    """(Re-)attach the gradient-masking hook to the current ``weight`` of each masked module; idempotent.

    :func:`make_masked_` attaches it, and the masked classes re-attach it after ``model.to()``,
    ``copy.deepcopy``, unpickling and ``load_state_dict(assign=True)``. Call this after replacing a weight by
    other means (e.g. ``module.weight = nn.Parameter(...)``): until then the forward still masks the gradient,
    through the identity function, at the cost of one view op per layer. Weights that do not require a
    gradient and FSDP2-sharded weights (whose gradient the hook would never see) get no hook.

    Returns:
        The number of modules whose weight carries the hook.
    """
    covered = 0
    for _, module in _modules_items(modules):
        weight = module._parameters.get("weight")
        mark = module.__dict__.get(_MASK_HOOK_ATTR)
        if mark is not None and weight is not None and mark.covers(weight):
            covered += 1
            continue
        if mark is not None:
            mark.remove()
            del module.__dict__[_MASK_HOOK_ATTR]
        if (
            weight is None
            or MASK_NAME not in module._buffers
            or not weight.requires_grad
            or _is_sharded(weight)
        ):
            continue
        module.__dict__[_MASK_HOOK_ATTR] = _GradMask(module, weight)
        covered += 1
    return covered


def _forward_weight(module: nn.Module) -> torch.Tensor:
    """The weight the masked forward multiplies with: ``weight`` itself (its masked entries are 0.0).

    When the gradient-masking hook does not cover this tensor, the weight goes through :class:`_MaskGrad` so
    that its gradient is masked inside backward; a dense-gradient capture hook (:func:`set_grad_capture_`)
    that could not sit on the weight itself is then registered on that function's output.
    """
    weight = module.weight
    capture = module.__dict__.get(_GRAD_HOOK_ATTR)
    mark = module.__dict__.get(_MASK_HOOK_ATTR)
    if mark is not None and mark.covers(weight):
        if capture is None or module.__dict__.get(_GRAD_HANDLE_ATTR) is not None:
            return weight
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight
    masked = _MaskGrad.apply(weight, layer_mask(module))
    if capture is not None:
        masked.register_hook(capture)
    return masked


def masked_weight(module: nn.Module) -> torch.Tensor:
    """The effective weight ``module.weight * module.weight_mask``, as a new tensor.

    The masked forward does not build this product (see the module docstring): it uses ``weight`` itself,
    whose masked entries are kept at exactly 0.0, so both give the same output. This function is for code
    that wants the product explicitly; when a dense-gradient capture is active (:func:`set_grad_capture_`)
    its hook is registered on the product, which receives the dense gradient.
    """
    weight = module.weight * module.weight_mask
    hook = module.__dict__.get(_GRAD_HOOK_ATTR)
    if hook is not None and weight.requires_grad:
        weight.register_hook(hook)
    return weight


class _MaskedMixin:
    """Keeps the masked-forward contract across conversions, copies and loads (see the module docstring)."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        install_grad_masks_(self)
        return out

    def __getstate__(self):
        state = super().__getstate__()
        for key in (_MASK_HOOK_ATTR, _GRAD_HOOK_ATTR, _GRAD_HANDLE_ATTR):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        install_grad_masks_(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A checkpoint may hold non-zero values at masked positions (e.g. dense weights with a mask); the
        # forward relies on them being 0.0.
        if self._buffers.get(MASK_NAME) is not None and self.weight.device.type != "meta":
            apply_masks_(self)
        install_grad_masks_(self)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """An ``nn.Linear`` whose masked entries (``weight_mask == False``) are 0.0 and never get a gradient.

    Build one directly (the mask starts all ``True``, i.e. dense, until masks are set with
    :func:`set_masks_` or loaded from a state dict), or turn an existing ``nn.Linear`` into one in place with
    :func:`make_masked_`. The forward computes ``x @ (weight * weight_mask).T + bias`` without forming the
    product (see the module docstring).

    Args:
        in_features (`int`): input size.
        out_features (`int`): output size.
        bias (`bool`, *optional*, defaults to `True`): whether the layer has a bias.
        device, dtype: as for ``nn.Linear``.

    Example:

    ```python
    >>> import torch
    >>> layer = MaskedLinear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     layer.weight.fill_(1.0)
    ...     layer.weight_mask.copy_(torch.tensor([[True, False], [False, True]]))
    ...     apply_masks_(layer)
    >>> layer(torch.tensor([[1.0, 2.0]])).tolist()
    [[1.0, 2.0]]
    ```
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer(MASK_NAME, torch.ones_like(self.weight, dtype=torch.bool), persistent=True)
        install_grad_masks_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _forward_weight(self), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", masked=True"


class MaskedConv1D(_MaskedMixin, Conv1D):
    """A GPT-2 ``Conv1D`` (weight ``(n_in, n_out)``) with ``weight_mask``, masked as :class:`MaskedLinear`.

    Args:
        nf (`int`): number of output features.
        nx (`int`): number of input features.
    """

    def __init__(self, nf: int, nx: int):
        super().__init__(nf, nx)
        self.register_buffer(MASK_NAME, torch.ones_like(self.weight, dtype=torch.bool), persistent=True)
        install_grad_masks_(self)

    def __repr__(self) -> str:
        return f"MaskedConv1D(nf={self.nf}, nx={self.nx})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same computation as transformers' Conv1D.forward.
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), _forward_weight(self))
        return x.view(size_out)


_DERIVED: dict[type, type] = {}


def _masked_class_for(cls: type, name: str) -> type:
    """The masked class replacing ``cls``; refuses subclasses that change ``forward`` (e.g. LoRA, 4-bit)."""
    if cls in (MaskedLinear, MaskedConv1D):
        return cls
    if cls is nn.Linear:
        return MaskedLinear
    if cls is Conv1D:
        return MaskedConv1D
    if cls in _DERIVED or cls in _DERIVED.values():
        return _DERIVED.get(cls, cls)
    if issubclass(cls, nn.Linear) and cls.forward is nn.Linear.forward:
        base, forward = MaskedLinear, MaskedLinear.forward
    elif issubclass(cls, Conv1D) and cls.forward is Conv1D.forward:
        base, forward = MaskedConv1D, MaskedConv1D.forward
    else:
        raise ValueError(
            f"Module {name!r} is a {cls.__module__}.{cls.__qualname__}, whose forward is not the plain "
            "nn.Linear / Conv1D one, so it cannot be masked safely. Keep it dense with "
            f"`exclude_modules=[{re.escape(name)!r}]` (or narrow `target_modules`)."
        )
    # A subclass that only adds behaviour around the standard forward (e.g. FSDP2's FSDPLinear): derive from
    # both, publish under a unique module-level name so pickling works.
    new_name = f"Masked{cls.__name__}_{len(_DERIVED)}"
    derived = type(new_name, (base, cls), {"forward": forward, "__module__": __name__})
    globals()[new_name] = derived
    _DERIVED[cls] = derived
    return derived


def is_masked(module: nn.Module) -> bool:
    """Whether ``module`` carries a ``weight_mask`` buffer and uses the masked forward."""
    return has_mask(module) and module.__class__.forward in (
        MaskedLinear.forward,
        MaskedConv1D.forward,
    )


def make_masked_(module: nn.Module, mask: torch.Tensor | None = None, *, name: str = "module") -> nn.Module:
    """Turn an ``nn.Linear`` / ``Conv1D`` into its masked subclass in place and attach ``weight_mask``.

    Args:
        module (`nn.Module`): an ``nn.Linear`` or ``transformers.pytorch_utils.Conv1D``.
        mask (`torch.Tensor`, *optional*): bool tensor shaped like ``module.weight``; default all ``True`` (or
            the mask the module already carries). Masked weights are set to 0.0.
        name (`str`): the module's name, used in error messages.

    Returns:
        The same module object, now masked.
    """
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise ValueError(
            f"Module {name!r} is a {type(module).__name__}; only nn.Linear and transformers' Conv1D can be "
            "sparse. Narrow `target_modules` to linear layers."
        )
    module.__class__ = _masked_class_for(type(module), name)
    if MASK_NAME not in module._buffers:
        weight = module.weight
        module.register_buffer(
            MASK_NAME,
            torch.ones(weight.shape, dtype=torch.bool, device=_local(weight).device),
            persistent=True,
        )
    if mask is not None:
        _check_mask(name, mask, module)
        with torch.no_grad():
            module.weight_mask.copy_(mask)
    apply_masks_({name: module})
    install_grad_masks_(module)
    return module


# ------------------------------------------------------------------------------ selection
def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / ``torch.compile`` wrappers so module names match the bare model's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None and isinstance(getattr(emb, "weight", None), torch.Tensor):
            weights.append(emb.weight)
    return weights


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _is_tied(weight: torch.Tensor, embeddings: list[torch.Tensor]) -> bool:
    for emb in embeddings:
        if weight is emb:
            return True
        # Same storage (tied by sharing data rather than the Parameter object); meta tensors have no storage.
        if weight.device.type != "meta" and emb.device.type != "meta":
            try:
                if weight.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr():
                    return True
            except (RuntimeError, NotImplementedError):
                pass
    return False


def find_sparse_modules(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    exclude_modules: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """The modules to sparsify, by name, in ``model.named_modules()`` order.

    Default selection: every ``nn.Linear`` / ``Conv1D`` inside an ``nn.ModuleList`` (the transformer blocks).
    Embeddings, norms, ``lm_head`` (the output embedding) and any module whose weight is tied to an input
    embedding are never selected.

    Args:
        model (`nn.Module`): the model (DDP / compile wrappers are stripped).
        target_modules (`list[str]`, *optional*): regular expressions matched with ``re.search`` against the
            full dotted module name; when given they replace the default selection (still linear layers only).
        exclude_modules (`list[str]`, *optional*): regular expressions of names to keep dense.

    Raises:
        ValueError: when nothing matches, naming the patterns and listing some available linear layers.
    """
    model = unwrap_model(model)
    targets = _compile_patterns(target_modules, "target_modules")
    excludes = _compile_patterns(exclude_modules, "exclude_modules")
    named = list(model.named_modules())
    module_lists = [name for name, m in named if isinstance(m, nn.ModuleList) and name]
    embeddings = _embedding_weights(model)
    out_emb = _output_embedding(model)

    candidates: list[str] = []
    selected: dict[str, nn.Module] = {}
    for name, module in named:
        if not name or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        candidates.append(name)
        never = (
            module is out_emb
            or name == "lm_head"
            or name.endswith(".lm_head")
            or _is_tied(module.weight, embeddings)
        )
        if targets is not None:
            hit = any(p.search(name) for p in targets)
            if hit and never:
                logger.warning(
                    "`target_modules` matches %r, which is the output embedding or tied to an embedding; "
                    "it stays dense.",
                    name,
                )
        else:
            hit = any(name.startswith(prefix + ".") for prefix in module_lists)
        if not hit or never or (excludes is not None and any(p.search(name) for p in excludes)):
            continue
        selected[name] = module
    if not selected:
        shown = ", ".join(candidates[:12]) + (
            f", ... ({len(candidates)} in all)" if len(candidates) > 12 else ""
        )
        raise ValueError(
            f"No module to sparsify: target_modules={_as_list(target_modules)}, "
            f"exclude_modules={_as_list(exclude_modules)} select no nn.Linear/Conv1D "
            f"{'' if targets is not None else 'inside an nn.ModuleList of blocks '}of "
            f"{type(model).__name__}. Linear layers available: [{shown or 'none'}]. Set `target_modules` to "
            "regular expressions of some of these names (matched with re.search)."
        )
    return selected


def _as_list(patterns) -> list[str] | None:
    return None if patterns is None else list(patterns)


def _compile_patterns(patterns, field: str) -> list[re.Pattern] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{field}` must be a list of regular expressions, got {patterns!r}.")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"`{field}` entry {p!r} is not a valid regular expression: {err}.") from err
    return compiled


# ------------------------------------------------------------------------------ masks
def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a (possibly FSDP2-sharded) tensor; plain tensors are returned as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _local_mask(full_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of a replicated ``full_mask`` that matches the local shard of ``like`` (a DTensor or not)."""
    if not hasattr(like, "device_mesh"):
        return full_mask.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    mesh = like.device_mesh
    if full_mask.device.type != mesh.device_type:
        full_mask = full_mask.to(_local(like).device)
    # src_data_rank=None: every rank cuts its shard from its own (identical) copy, no communication.
    return distribute_tensor(full_mask, mesh, like.placements, src_data_rank=None).to_local()


def _check_mask(name: str, mask: torch.Tensor, module: nn.Module) -> None:
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
        _check_mask(name, mask, modules[name])
    for name, mask in masks.items():
        module = modules[name]
        if not is_masked(module):
            make_masked_(module, name=name)
        with torch.no_grad():
            layer_mask(module).copy_(mask)
    if apply:
        apply_masks_({name: modules[name] for name in masks})


def _modules_items(modules) -> list[tuple[str, nn.Module]]:
    if isinstance(modules, nn.Module):
        return [("module", modules)]
    if isinstance(modules, Mapping):
        return list(modules.items())
    return [(str(i), m) for i, m in enumerate(modules)]


@torch.no_grad()
def apply_masks_(modules, extra_positions: Mapping[str, torch.Tensor] | None = None) -> None:
    """Set every masked weight to exactly 0.0 (also under FSDP2, shard by shard).

    Two ``torch._foreach_*`` ops for all modules together: the weights are multiplied by their 0/1 masks and
    then ``+ 0.0`` turns the ``-0.0`` of negative masked entries into ``+0.0``. (A NaN at a masked position
    would stay NaN; it cannot arise while the gradient and the optimizer state there are 0.)

    The callback calls this at topology updates, and after every optimizer step only for optimizers that are
    not known to keep masked weights at 0.0 (see the module docstring and ``SparseTrainingConfig.remask``).

    Args:
        modules (`dict[str, nn.Module]`, iterable of modules, or one module): masked modules.
        extra_positions (`dict[str, torch.Tensor]`, *optional*): per module name, a bool tensor shaped like
            the weight marking further positions to zero (e.g. links grown at this update, which start at 0).
    """
    weights, keeps = [], []
    for name, module in _modules_items(modules):
        mask = module._buffers.get(MASK_NAME)
        if mask is None:
            raise ValueError(f"Module {name!r} carries no `weight_mask`; sparsify it first (`sparsify_`).")
        keep = mask
        if extra_positions is not None and name in extra_positions:
            keep = mask & ~extra_positions[name].to(mask.device)
        weight = module.weight
        weights.append(_local(weight))
        keeps.append(_local_mask(keep, weight))
    if weights:
        torch._foreach_mul_(weights, keeps)
        torch._foreach_add_(weights, 0.0)


# Optimizers whose update at a position with zero gradient and zero state is exactly 0 (element-wise rules;
# decoupled or L2 weight decay multiplies a 0.0 weight). Matched by exact class: a subclass may change step().
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


def keeps_masked_weights_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` leaves a weight at exactly 0.0 when its gradient and optimizer state are 0 there.

    True for the classes in :data:`ZERO_PRESERVING_OPTIMIZERS` (an ``AcceleratedOptimizer`` is unwrapped):
    with masked gradients and the state zeroed at masked positions (:func:`zero_optimizer_state_`), masked
    weights then stay 0.0 without re-masking. Optimizers that mix positions (Shampoo, Muon, GaLore's
    projections) or are simply unknown return False: re-mask after every step with :func:`apply_masks_`.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
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
        type(getattr(optimizer, "optimizer", optimizer)).__name__,
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
    inner = getattr(optimizer, "optimizer", optimizer)
    state = inner.state
    touched = 0
    for name, module in _modules_items(modules):
        weight = module.weight
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
                    local_zero = _local_mask(zero, value)
                _local(value).masked_fill_(local_zero, 0)
                touched += 1
    return touched


def layer_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_2d, mask_2d)`` as ``(n_out, n_in)`` views of ``module.weight`` / ``module.weight_mask``.

    For ``nn.Linear`` these are the tensors themselves; for GPT-2 ``Conv1D`` (weight ``(n_in, n_out)``) they
    are transposed views. Under FSDP2 the weight is the sharded DTensor: call ``.full_tensor()`` on it first.
    """
    if MASK_NAME not in module._buffers:
        raise ValueError(
            f"{type(module).__name__} carries no `weight_mask`; sparsify it first (`sparsify_`)."
        )
    weight, mask = module.weight, layer_mask(module)
    if isinstance(module, Conv1D):
        return weight.T, mask.T
    return weight, mask


def from_layer_view(module: nn.Module, tensor_2d: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`layer_view` for one ``(n_out, n_in)`` tensor: back to the layout of ``weight``."""
    return tensor_2d.T if isinstance(module, Conv1D) else tensor_2d


# ------------------------------------------------------------------------------ gradient capture
def set_grad_capture_(modules, store: dict[str, torch.Tensor] | None) -> None:
    """Start (``store`` a dict) or stop (``store=None``) capturing dense gradients of the effective weights.

    While active, each backward pass adds ``d loss / d (weight * weight_mask)`` of every module into
    ``store[name]`` (float32, layout of ``weight``), so gradient-accumulation micro-batches sum up. Only the
    callback's update steps turn this on.

    Masked weights being 0.0, that is the gradient of the weight before masking: the hook sits on the weight
    itself and sees each incoming gradient before accumulation and before the masking hook, so the forward
    (and a ``torch.compile``d graph of it) does not change. Where the masking hook does not cover the weight
    (see :func:`_forward_weight`), it is registered on the identity function's output instead.
    """
    for name, module in _modules_items(modules):
        module.__dict__.pop(_GRAD_HOOK_ATTR, None)
        handle = module.__dict__.pop(_GRAD_HANDLE_ATTR, None)
        if handle is not None:
            handle.remove()
        if store is None:
            continue

        def hook(grad: torch.Tensor, _name: str = name) -> None:
            grad = grad.detach().float()
            if _name in store:
                store[_name].add_(grad)
            else:
                store[_name] = grad.clone()

        module.__dict__[_GRAD_HOOK_ATTR] = hook
        weight = module.weight
        mark = module.__dict__.get(_MASK_HOOK_ATTR)
        if mark is not None and mark.covers(weight):
            module.__dict__[_GRAD_HANDLE_ATTR] = weight.register_hook(hook)


# ------------------------------------------------------------------------------ unmask_
_PLAIN = {MaskedLinear: nn.Linear, MaskedConv1D: Conv1D}


@torch.no_grad()
def unmask_(model: nn.Module) -> nn.Module:
    """Turn every masked module of ``model`` back into its plain class, in place, keeping effective weights.

    Each weight becomes ``weight * weight_mask`` (already so by the masking contract; multiplied again to be
    certain), the ``weight_mask`` buffer is removed and the module's class is restored (``MaskedLinear`` ->
    ``nn.Linear``, ``MaskedConv1D`` -> ``Conv1D``, a derived masked class -> the class it was made from), so
    no module is left with the masked forward but without its mask. Copy the model first to keep it.

    Returns:
        The same model object.
    """
    model = unwrap_model(model)
    originals = {derived: cls for cls, derived in _DERIVED.items()}
    for module in model.modules():
        mask = module._buffers.get(MASK_NAME)
        if mask is None:
            continue
        weight = module.weight
        _local(weight).mul_(_local_mask(mask, weight).to(weight.dtype)).add_(0.0)
        # the gradient hooks read the mask: they go with it
        mark = module.__dict__.pop(_MASK_HOOK_ATTR, None)
        if mark is not None:
            mark.remove()
        if getattr(weight, _MASK_HOOK_ATTR, None) is mark and mark is not None:
            delattr(weight, _MASK_HOOK_ATTR)
        handle = module.__dict__.pop(_GRAD_HANDLE_ATTR, None)
        if handle is not None:
            handle.remove()
        module.__dict__.pop(_GRAD_HOOK_ATTR, None)
        del module._buffers[MASK_NAME]
        cls = type(module)
        plain = _PLAIN.get(cls) or originals.get(cls)
        if plain is not None:
            module.__class__ = plain
    return model


def layer_view_shape(module: nn.Module) -> tuple[int, int]:
    """``(n_out, n_in)`` of a linear layer (``Conv1D`` weights are stored transposed)."""
    shape = tuple(module.weight.shape)
    return (shape[1], shape[0]) if isinstance(module, Conv1D) else (shape[0], shape[1])
