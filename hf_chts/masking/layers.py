"""Masked layers: the masked classes, their gradient masking, turning layers masked and back.

:class:`MaskedLinear` / :class:`MaskedConv1D` (and classes derived for subclasses of ``nn.Linear`` /
``Conv1D`` that keep the plain forward) use ``weight`` itself in forward, its masked entries being 0.0, and
mask the gradient once in backward: a post-accumulate-grad hook on the weight
(:func:`install_grad_masks_`), or an identity autograd function where the hook cannot sit on the tensor the
forward uses. :func:`make_masked_` / :func:`unmask_` swap a layer's class in place;
:func:`set_grad_capture_` captures dense gradients for a topology update; :func:`layer_view` gives a layer's
weight and mask as ``(n_out, n_in)`` views (GPT-2 ``Conv1D`` stores them transposed). The contract these
keep is described in :mod:`hf_chts.masking`.
"""

from __future__ import annotations

import re
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .buffer import (
    MASK_NAME,
    apply_masks_,
    as_named_modules,
    check_mask,
    has_mask,
    layer_mask,
    local_mask,
    local_tensor,
)
from .selection import unwrap_model

# Attributes in a masked module's instance ``__dict__`` (never buffers or parameters, so never in a state
# dict): the gradient-masking hook of its weight (:class:`_GradMask`, also set on the weight tensor it sits
# on), the dense-gradient capture hook of :func:`set_grad_capture_` and the handle of that hook when it sits
# on the weight itself.
_MASK_HOOK_ATTR = "_hf_chts_grad_mask"
GRAD_CAPTURE_ATTR = "_hf_chts_grad_hook"  # a dense-gradient capture hook, in a module's __dict__
_GRAD_HANDLE_ATTR = "_hf_chts_grad_hook_handle"

__all__ = [
    "MaskedConv1D",
    "MaskedLinear",
    "check_saved_weight",
    "from_layer_view",
    "install_grad_masks_",
    "is_masked",
    "layer_view",
    "layer_view_shape",
    "make_masked_",
    "masked_weight",
    "set_grad_capture_",
    "unmask_",
]


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
    for _, module in as_named_modules(modules):
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
    capture = module.__dict__.get(GRAD_CAPTURE_ATTR)
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

    The masked forward does not build this product (see :mod:`hf_chts.masking`): it uses ``weight`` itself,
    whose masked entries are kept at exactly 0.0, so both give the same output. This function is for code
    that wants the product explicitly; when a dense-gradient capture is active (:func:`set_grad_capture_`)
    its hook is registered on the product, which receives the dense gradient.
    """
    weight = module.weight * module.weight_mask
    hook = module.__dict__.get(GRAD_CAPTURE_ATTR)
    if hook is not None and weight.requires_grad:
        weight.register_hook(hook)
    return weight


@torch.no_grad()
def check_saved_weight(state: dict, prefix: str) -> None:
    """Refuse to save a masked layer whose weight is non-zero where its mask removes the link.

    The masked forward uses ``weight`` itself, so such a model computes as a denser one and its checkpoint
    would not reload as the sparse model it claims to be. The usual cause is a merge that wrote there
    (PEFT's own ``merge_and_unload``). Sharded (DTensor) and meta weights are not checked.
    """
    weight, mask = state.get(prefix + "weight"), state.get(prefix + MASK_NAME)
    plain = [t for t in (weight, mask) if type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta"]
    if len(plain) < 2 or weight.shape != mask.shape:
        return
    leaked = int(((weight != 0) & ~mask.to(weight.device)).sum())
    if leaked:
        raise ValueError(
            f"{prefix}weight has {leaked} non-zero values at masked positions (where {prefix}{MASK_NAME} "
            "is False), so this would save a denser model than the sparse one its masks describe. A merge "
            "wrote there (PEFT's own `merge_and_unload()`) or code set the weights directly. Merge adapters "
            "with `hf_chts.merge_and_unload(peft_model)`, or zero those values with "
            "`hf_chts.set_masks_(model, hf_chts.get_masks(model))` before saving (a folder already written: "
            "`hf_chts.compact.zero_masked_weights(folder)`)."
        )


class _MaskedMixin:
    """Keeps the masked-forward contract across conversions, copies and loads (see :mod:`hf_chts.masking`)."""

    masked_forward = True  # is_masked(): the forward of this class honours weight_mask

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        install_grad_masks_(self)
        return out

    def __getstate__(self):
        state = super().__getstate__()
        for key in (_MASK_HOOK_ATTR, GRAD_CAPTURE_ATTR, _GRAD_HANDLE_ATTR):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        install_grad_masks_(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        check_saved_weight(destination, prefix)

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
    product (see :mod:`hf_chts.masking`).

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
    """Whether ``module`` carries a ``weight_mask`` buffer and a masked forward (dense or sparse compute)."""
    return has_mask(module) and getattr(type(module), "masked_forward", False)


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
            torch.ones(weight.shape, dtype=torch.bool, device=local_tensor(weight).device),
            persistent=True,
        )
    if mask is not None:
        check_mask(name, mask, module)
        with torch.no_grad():
            module.weight_mask.copy_(mask)
    apply_masks_({name: module})
    install_grad_masks_(module)
    return module


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
    for name, module in as_named_modules(modules):
        module.__dict__.pop(GRAD_CAPTURE_ATTR, None)
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

        module.__dict__[GRAD_CAPTURE_ATTR] = hook
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
        local_tensor(weight).mul_(local_mask(mask, weight).to(weight.dtype)).add_(0.0)
        # the gradient hooks read the mask: they go with it
        mark = module.__dict__.pop(_MASK_HOOK_ATTR, None)
        if mark is not None:
            mark.remove()
        if getattr(weight, _MASK_HOOK_ATTR, None) is mark and mark is not None:
            delattr(weight, _MASK_HOOK_ATTR)
        handle = module.__dict__.pop(_GRAD_HANDLE_ATTR, None)
        if handle is not None:
            handle.remove()
        module.__dict__.pop(GRAD_CAPTURE_ATTR, None)
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
