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

The package, by job (each module imports only those listed before it):

- :mod:`~hf_chts.masking.buffer`: a layer's mask (:func:`layer_mask`, :func:`has_mask`), its checks, and
  :func:`apply_masks_`;
- :mod:`~hf_chts.masking.selection`: which layers are sparse (:func:`find_sparse_modules`,
  :func:`unwrap_model`);
- :mod:`~hf_chts.masking.layers`: the masked classes and their gradient masking, :func:`make_masked_`,
  :func:`unmask_`, :func:`set_grad_capture_`, :func:`layer_view`;
- :mod:`~hf_chts.masking.masks`: a model's masks by name (:func:`get_masks`, :func:`set_masks_`,
  :func:`keep_masks_out_of_ddp_`);
- :mod:`~hf_chts.masking.optim`: the optimizer policy (:data:`ZERO_PRESERVING_OPTIMIZERS`,
  :func:`remask_every_step`, :func:`zero_optimizer_state_`);
- :mod:`~hf_chts.masking.compute`: sparse compute, a masked ``nn.Linear`` whose trainable weight is its link
  values (:func:`to_sparse_compute_`, :func:`to_dense_compute_`, :func:`relink_`).

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

from .buffer import MASK_NAME, apply_masks_, has_mask, layer_mask
from .compute import (
    dense_parameter_count,
    is_sparse_compute,
    link_count,
    relink_,
    set_compute_,
    to_dense_compute_,
    to_sparse_compute_,
    write_weight_,
)
from .layers import (
    MaskedConv1D,
    MaskedLinear,
    from_layer_view,
    install_grad_masks_,
    is_masked,
    layer_view,
    layer_view_shape,
    make_masked_,
    masked_weight,
    set_grad_capture_,
    unmask_,
)
from .masks import get_masks, set_masks_
from .masks import keep_masks_out_of_ddp_ as keep_masks_out_of_ddp_  # for the package's own modules
from .optim import (
    ZERO_PRESERVING_OPTIMIZERS,
    keeps_masked_weights_zero,
    remask_every_step,
    zero_optimizer_state_,
)
from .selection import find_sparse_modules, unwrap_model

__all__ = [
    "MASK_NAME",
    "ZERO_PRESERVING_OPTIMIZERS",
    "MaskedConv1D",
    "MaskedLinear",
    "apply_masks_",
    "dense_parameter_count",
    "find_sparse_modules",
    "from_layer_view",
    "get_masks",
    "has_mask",
    "install_grad_masks_",
    "is_masked",
    "is_sparse_compute",
    "keeps_masked_weights_zero",
    "layer_mask",
    "layer_view",
    "link_count",
    "layer_view_shape",
    "make_masked_",
    "masked_weight",
    "relink_",
    "remask_every_step",
    "set_grad_capture_",
    "set_compute_",
    "set_masks_",
    "to_dense_compute_",
    "to_sparse_compute_",
    "unmask_",
    "unwrap_model",
    "write_weight_",
    "zero_optimizer_state_",
]
