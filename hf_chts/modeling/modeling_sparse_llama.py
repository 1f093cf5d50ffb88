"""`SparseLlamaForCausalLM`: a LLaMA whose q,k,v,o,gate,up,down carry masks, with its chains and registration.

The model is a plain :class:`~transformers.LlamaForCausalLM` whose selected projections are swapped to the
masked forward of :mod:`hf_chts.masking` and carry a persistent ``torch.bool`` buffer ``weight_mask`` shaped
like their weight (docs/DESIGN.md, "Masks"). Embeddings, norms and ``lm_head`` stay dense. The sparse-training
settings travel with the model in ``config.sparsity`` (a :class:`~hf_chts.config.SparseTrainingConfig` as a
dict), so ``save_pretrained`` / ``from_pretrained`` round-trip masks, zeros and the recipe together. The
configuration class is in :mod:`.configuration_sparse_llama`, the LLaMA module names in :mod:`.llama_layout`.

How masks come to exist (transformers 5 builds models on the ``meta`` device, then loads the checkpoint):

- a fresh ``SparseLlamaForCausalLM(config)`` draws its masks in ``_initialize_weights`` (its call on the
  root module, the last of the weight initialisation ``post_init`` runs) with
  :func:`hf_chts.engine.initial_masks` (through :func:`hf_chts.sparsify.draw_masks`), seeded by
  ``config.sparsity["seed"]``, and zeroes the masked weights;
- ``from_pretrained`` of a sparse checkpoint loads the masks; before any weight is read, the checkpoint's
  masks are checked (shape, ``torch.bool`` dtype, none missing) so a bad file fails with a ``ValueError``
  naming the layer instead of being silently cast;
- ``from_pretrained`` of a *dense* LLaMA checkpoint (its ``config.json`` says ``model_type: llama`` and it
  holds no masks) loads the dense weights, then ``_initialize_missing_keys`` calls ``_initialize_weights``,
  which draws the masks exactly as for a fresh model and zeroes the loaded weights at masked positions.

Example:

```python
>>> from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM, sparsity_summary
>>> config = SparseLlamaConfig(
...     vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, sparsity={"method": "chts", "density": 0.3},
... )
>>> model = SparseLlamaForCausalLM(config)
>>> int(model.model.layers[0].self_attn.q_proj.weight_mask.sum())  # round(0.3 * 32 * 32)
307
>>> round(sparsity_summary(model)["density"], 2)
0.3
```
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from ..chains import register_chains
from ..masking import (
    MASK_NAME,
    apply_masks_,
    get_masks,
    has_mask,
    is_masked,
    keep_masks_out_of_ddp_,
    layer_mask,
    layer_view,
    make_masked_,
    unwrap_model,
)
from ..sparsify import draw_masks
from ..stats import density_summary, mask_statistics
from ..topology.percolation import LlamaBlockChain
from ..weights_io import check_safetensors_file, mask_specs, weight_files
from .configuration_sparse_llama import SparseLlamaConfig
from .llama_layout import projection_name, sparse_layer_names

logger = logging.getLogger(__name__)

__all__ = [
    "SparseLlamaForCausalLM",
    "llama_chains",
    "register",
    "sparsity_summary",
]


# Set by `SparseLlamaForCausalLM.from_pretrained(..., init_missing_masks=True)` for the duration of the load.
_INIT_MISSING_MASKS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "init_missing_masks", default=False
)


# ------------------------------------------------------------------------------------------ model
class SparseLlamaForCausalLM(LlamaForCausalLM):
    r"""A `LlamaForCausalLM` whose projections listed in ``config.sparse_projections`` are sparse.

    Each sparse projection is a :class:`hf_chts.masking.MaskedLinear` (masked gradient, masked weights 0.0)
    with a persistent ``torch.bool`` buffer ``weight_mask`` shaped like its weight, saved as
    ``<module>.weight_mask`` in ``model.safetensors``. Masked weights are exactly 0.0 after construction and
    after loading, so a plain ``LlamaForCausalLM`` (or any LLaMA tool) loads the folder and computes the same
    logits, ignoring the mask keys.

    Args:
        config (`SparseLlamaConfig`): architecture and sparsity settings.

    Example:

    ```python
    >>> model = SparseLlamaForCausalLM(config)  # doctest: +SKIP
    >>> model.save_pretrained("out")  # doctest: +SKIP
    >>> # masks and zeros kept, in any dtype
    >>> SparseLlamaForCausalLM.from_pretrained("out", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> # a dense LLaMA checkpoint, masked on load (masks drawn from `sparsity`, then weights zeroed)
    >>> sparsity = {"method": "chts", "density": 0.3}
    >>> SparseLlamaForCausalLM.from_pretrained("dense-llama", sparsity=sparsity)  # doctest: +SKIP
    >>> model.to_dense().save_pretrained("dense-out")  # model_type llama  # doctest: +SKIP
    ```
    """

    config_class = SparseLlamaConfig
    config: SparseLlamaConfig
    # Missing masks are dealt with explicitly (drawn for dense checkpoints, refused otherwise, see
    # `_load_pretrained_model`), so the generic "missing keys" report need not list them.
    _keys_to_ignore_on_load_missing = [rf"\.{MASK_NAME}$"]

    def __init__(self, config: SparseLlamaConfig):
        if not isinstance(config, SparseLlamaConfig):
            raise ValueError(
                f"SparseLlamaForCausalLM needs a SparseLlamaConfig, got {type(config).__name__}. Build "
                "one with `SparseLlamaConfig(**llama_config.to_dict(), sparsity=...)`, or load a dense "
                "checkpoint with `SparseLlamaForCausalLM.from_pretrained(path, sparsity=...)`."
            )
        super().__init__(config)

    # -------------------------------------------------------------- construction and initialisation
    def post_init(self):
        # `LlamaForCausalLM.__init__` ends with `post_init()`. Attach the masks first, so that the weight
        # initialisation it triggers (skipped on the meta device, where from_pretrained builds the model)
        # reaches `_initialize_weights` with the mask buffers in place.
        for name in self.config.sparse_layer_names():
            make_masked_(self.get_submodule(name), name=name)
        keep_masks_out_of_ddp_(self)
        super().post_init()

    def sparse_modules(self) -> dict[str, nn.Module]:
        """The sparse (masked) modules by name, in the order of ``config.sparse_layer_names()``."""
        return {name: self.get_submodule(name) for name in self.config.sparse_layer_names()}

    @torch.no_grad()
    def _initialize_weights(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        # `is_custom_code` (transformers >= 5.16) or `is_remote_code` (earlier): passed on as given
        if module is self and getattr(self, "_is_hf_initialized", False):
            # Initialised once already (a later `init_weights()` call): never redraw masks. Buffers lose
            # their `_is_hf_initialized` flag on `.to()`, so the flag of the root is the one to trust.
            return
        super()._initialize_weights(module, *args, **kwargs)
        # `initialize_weights` visits children before their parent, so the root comes last: every weight is
        # initialised or loaded by now. The hook is this one rather than `_init_weights` because transformers
        # skips `_init_weights` on a module of custom code that holds no tensor of its own (our root). Masks
        # are drawn for all layers at once because the per-layer densities (ERK) depend on every shape.
        if module is self:
            self._init_missing_masks_()

    def _init_missing_masks_(self) -> None:
        """Draw the masks whose buffers were neither loaded nor drawn yet, then zero every masked weight."""
        modules = self.sparse_modules()
        missing = [
            name
            for name, m in modules.items()
            if not getattr(layer_mask(m), "_is_hf_initialized", False) and layer_mask(m).device.type != "meta"
        ]
        if missing:
            cfg = self.config.sparse_training_config
            masks = draw_masks(modules, cfg)
            for name in missing:
                buffer = layer_mask(modules[name])
                buffer.copy_(masks[name].to(buffer.device))
                buffer._is_hf_initialized = True
            logger.info(
                "Drew %d initial masks (init=%s, initial density %s, seed %d).",
                len(missing),
                cfg.init,
                cfg.initial_density,
                cfg.seed,
            )
        apply_masks_({n: m for n, m in modules.items() if m.weight.device.type != "meta"})

    # -------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args,
        init_missing_masks: bool = False,
        **kwargs,
    ):
        r"""Load a sparse checkpoint, or a dense LLaMA one to be masked on load.

        Takes every argument of `PreTrainedModel.from_pretrained`, plus:

        Args:
            init_missing_masks (`bool`, *optional*, defaults to `False`): draw fresh masks (from
                ``config.sparsity``) for a checkpoint whose ``config.json`` says ``sparse_llama`` but that
                lacks some masks, instead of raising. Dense checkpoints (``model_type`` other than
                ``sparse_llama`` and no mask in the file) always get fresh masks.
            sparsity (`dict`, *optional*): passed on to the config like any config field, e.g. the sparsity
                settings to apply to a dense checkpoint.

        Raises:
            ValueError: when a checkpoint mask has the wrong shape or is not ``torch.bool`` (naming the layer,
                what was expected and what was found), or when a sparse checkpoint lacks masks.
        """
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            for file in weight_files(pretrained_model_name_or_path):  # named refusals, not SafetensorError
                check_safetensors_file(file, fix="Save the model again, or load another checkpoint.")
        token = _INIT_MISSING_MASKS.set(bool(init_missing_masks))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finally:
            _INIT_MISSING_MASKS.reset(token)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        # `expected_keys` exists from transformers 5.5 on: passed on as given
        # The one point of `from_pretrained` that sees both the model skeleton (on meta) and the raw
        # checkpoint before anything is read into the model: masks are validated here because the loader
        # would otherwise cast a float mask to bool and report a shape mismatch as a generic RuntimeError.
        loaded = set()
        if isinstance(model, SparseLlamaForCausalLM):
            loaded = model._check_checkpoint_masks(state_dict, checkpoint_files, load_config)
        result = LlamaForCausalLM._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, *args, **kwargs
        )
        if loaded:
            model._refuse_masked_nonzero(loaded, load_config)
        return result

    @torch.no_grad()
    def _refuse_masked_nonzero(self, names: set[str], load_config) -> None:
        """A checkpoint's weights must be 0.0 where its own masks are False (both loaders then agree)."""
        modules = self.sparse_modules()
        bad = []
        for name in sorted(names):
            module = modules[name]
            weight, mask = module.weight, layer_mask(module)
            if weight.device.type == "meta" or mask.device.type == "meta":
                continue
            leaked = int(((weight != 0) & ~mask.to(weight.device)).sum())
            if leaked:
                bad.append((name, leaked))
        if bad:
            name, leaked = bad[0]
            path = getattr(load_config, "pretrained_model_name_or_path", None)
            raise ValueError(
                f"The checkpoint {path!r} has {leaked} weights of {name} that are non-zero where its "
                f"weight_mask removes the link ({len(bad)} layers in all). A plain LlamaForCausalLM would "
                "load them as they are and compute other logits than this sparse model. The file was edited "
                "or written outside the masking contract; if the masks are right, zero those weights with "
                f"hf_chts.compact.zero_masked_weights({str(path)!r}) and load again."
            )

    def _check_checkpoint_masks(self, state_dict, checkpoint_files, load_config) -> set[str]:
        """Validate the checkpoint's masks; return the sparse layers whose masks it holds."""
        modules = self.sparse_modules()
        # Only masks still to be materialised matter (adapter loading reuses this path on a live model).
        pending = {name for name, m in modules.items() if layer_mask(m).device.type == "meta"}
        if not pending:
            return set()
        found = mask_specs(state_dict, checkpoint_files)
        if found is None:  # unreadable format: the loader's own checks apply
            return set()
        expected_keys = {f"{name}.{MASK_NAME}": name for name in modules}
        present = set()
        others = []
        for key, (dtype, shape) in found.items():
            full_key = key if key in expected_keys else f"{self.base_model_prefix}.{key}"
            if full_key not in expected_keys:
                others.append(full_key[: -len(MASK_NAME) - 1])
                continue
            name = expected_keys[full_key]
            present.add(name)
            want = tuple(modules[name].weight.shape)
            if tuple(shape) != want:
                raise ValueError(
                    f"Checkpoint mask of layer {name!r} ({key}) has shape {tuple(shape)}, expected {want} "
                    "(the shape of its weight). The checkpoint does not match this config; check "
                    "hidden_size, intermediate_size and the head counts."
                )
            if dtype != "torch.bool":
                raise ValueError(
                    f"Checkpoint mask of layer {name!r} ({key}) has dtype {dtype}, expected torch.bool. "
                    "Rewrite the checkpoint with bool masks (`mask.bool()`) before loading; non-bool masks "
                    "are refused rather than silently cast."
                )
        path = load_config.pretrained_model_name_or_path
        if others:
            covered = sorted({n.rsplit(".", 1)[-1] for n in [*present, *others]})
            raise ValueError(
                f"The checkpoint {path!r} holds masks for {len(others)} layers that its config does not make "
                f"sparse (sparse_projections={self.config.sparse_projections}, target_modules="
                f"{self.config.sparsity.get('target_modules')}, exclude_modules="
                f"{self.config.sparsity.get('exclude_modules')}), e.g. {sorted(others)[:3]}; loading would "
                "drop those masks and make the layers dense. Set `sparse_projections` in config.json to "
                f"{covered} (and the target/exclude patterns to match), or remove those masks from the file "
                "to make the layers dense on purpose."
            )
        missing = [name for name in modules if name in pending and name not in present]
        if not missing or _INIT_MISSING_MASKS.get():
            return present
        source_type = _checkpoint_model_type(load_config)
        if source_type != SparseLlamaConfig.model_type and not present:
            return present  # a dense checkpoint: masks are drawn by `_initialize_weights` once weights load
        keys = [f"{name}.{MASK_NAME}" for name in missing]
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
        raise ValueError(
            f"The checkpoint {path!r} is a sparse_llama model but lacks {len(keys)} of its masks: {shown}. "
            f"Either load it as a dense model with `LlamaForCausalLM.from_pretrained({path!r})`, or draw "
            f"fresh masks from `config.sparsity` with `SparseLlamaForCausalLM.from_pretrained({path!r}, "
            "init_missing_masks=True)` (the loaded weights are then zeroed outside the new masks)."
        )

    # -------------------------------------------------------------- export
    @torch.no_grad()
    def to_dense(self) -> LlamaForCausalLM:
        """A plain `LlamaForCausalLM` with the effective weights (``weight * weight_mask``) and no masks.

        The copy owns its tensors (same dtypes and devices as here); zeros are kept, so it computes the same
        logits, and its ``save_pretrained`` writes ``model_type: llama`` that any LLaMA tool loads.

        Example:

        ```python
        >>> dense = sparse_model.to_dense()        # doctest: +SKIP
        >>> dense.save_pretrained("llama-dense")  # doctest: +SKIP
        ```
        """
        with torch.device("meta"):
            dense = LlamaForCausalLM(self.config.to_llama_config())
        masked = {name: m for name, m in self.named_modules() if has_mask(m)}
        copies: dict[int, torch.Tensor] = {}  # by id of the source: tied tensors stay tied

        for name, param in self.named_parameters(remove_duplicate=False):
            module_name, _, leaf = name.rpartition(".")
            if id(param) not in copies:
                value = param.detach().clone()
                source = masked.get(module_name)
                if source is not None and leaf == "weight":
                    value.masked_fill_(~layer_mask(source).to(value.device), 0.0)
                copies[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            dense.get_submodule(module_name)._parameters[leaf] = copies[id(param)]
        for name, buffer in self.named_buffers(remove_duplicate=False):
            module_name, _, leaf = name.rpartition(".")
            if leaf == MASK_NAME:
                continue
            if id(buffer) not in copies:
                copies[id(buffer)] = buffer.detach().clone()
            setattr(dense.get_submodule(module_name), leaf, copies[id(buffer)])  # a registered buffer
        left = [n for n, t in [*dense.named_parameters(), *dense.named_buffers()] if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"to_dense() left tensors on the meta device: {left[:5]}; please report this.")
        dense.generation_config = copy.deepcopy(self.generation_config)
        dense.train(self.training)
        return dense


# -------------------------------------------------------------------------------- checkpoint inspection
def _checkpoint_model_type(load_config) -> str | None:
    """The ``model_type`` in the checkpoint's own ``config.json`` (``None`` when there is none)."""
    path = getattr(load_config, "pretrained_model_name_or_path", None)
    if path is None:
        return None
    from transformers.utils import cached_file

    download_kwargs = dict(getattr(load_config, "download_kwargs", None) or {})
    with contextlib.suppress(Exception):
        resolved = cached_file(
            path,
            "config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **download_kwargs,
        )
        if resolved is not None:
            with open(resolved, encoding="utf-8") as handle:
                return json.load(handle).get("model_type")
    return None


# ------------------------------------------------------------------------------------------ helpers
def llama_chains(
    model_or_config: nn.Module | LlamaConfig,
    names: Iterable[str] | None = None,
    *,
    rotary: bool = True,
) -> list[LlamaBlockChain]:
    """The :class:`~hf_chts.topology.percolation.LlamaBlockChain` of every fully sparse decoder block.

    Chain removal (docs/method.md section 5) needs all seven projections of a block; blocks with a dense
    projection get no chain (their sparse layers are still evolved, one by one).

    Args:
        model_or_config (`nn.Module` or `LlamaConfig`): a LLaMA model (module names are read from it, so a
            bare ``LlamaModel`` without the ``model.`` prefix works too) or a config (names
            ``model.layers.<i>...``).
        names (`Iterable[str]`, *optional*): the sparse layer names; default: the model's masked modules, or
            ``config.sparse_layer_names()`` for a `SparseLlamaConfig`, or all seven projections of every block
            for a plain `LlamaConfig`.
        rotary (`bool`, defaults to `True`): pair q/k dimensions as rotary embeddings do (see
            `LlamaBlockChain`).

    Returns:
        `list[LlamaBlockChain]`, in block order.

    Example:

    ```python
    >>> chains = llama_chains(SparseLlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4))
    >>> len(chains), chains[1].down
    (2, 'model.layers.1.mlp.down_proj')
    ```
    """
    if isinstance(model_or_config, nn.Module):
        model_or_config = unwrap_model(model_or_config)
        config = model_or_config.config
        module_names = [n for n, _ in model_or_config.named_modules()]
        if names is None:
            names = get_masks(model_or_config).keys()
    elif isinstance(model_or_config, LlamaConfig):
        config = model_or_config
        module_names = sparse_layer_names(config.num_hidden_layers)
        if names is None:
            names = (
                config.sparse_layer_names() if isinstance(config, SparseLlamaConfig) else list(module_names)
            )
    else:
        raise ValueError(
            f"`model_or_config` must be a LLaMA model or a LlamaConfig, got {type(model_or_config).__name__}."
        )
    sparse = set(names)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    suffix = projection_name("", "q_proj")  # ".self_attn.q_proj": one per decoder block
    chains = []
    for name in module_names:
        if not name.endswith(suffix):
            continue
        chain = LlamaBlockChain.from_prefix(
            name[: -len(suffix)],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rotary=rotary,
        )
        if all(layer in sparse for layer in chain.names):
            chains.append(chain)
    return chains


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    """Density of every masked layer, per projection type and overall (used by the model card).

    Works on any model whose sparse modules carry ``weight_mask`` (not only `SparseLlamaForCausalLM`).

    Returns:
        `dict` with ``density`` (overall: links / entries of all masked layers; None for a model without
        masks, which has no sparse layer to measure), ``nnz``, ``numel``,
        ``per_projection`` (``{"q_proj": {"density", "nnz", "numel", "layers"}, ...}``, grouped by the last
        component of the module name) and ``per_layer`` (``{name: {"density", "nnz", "numel", "shape"}}``,
        shape as ``(n_out, n_in)``).

    Example:

    ```python
    >>> summary = sparsity_summary(model)               # doctest: +SKIP
    >>> summary["per_projection"]["q_proj"]["density"]  # doctest: +SKIP
    0.2998046875
    ```
    """
    model = unwrap_model(model)
    masks = {
        name: layer_view(module)[1] if is_masked(module) else layer_mask(module)
        for name, module in model.named_modules()
        if has_mask(module)
    }
    summary = density_summary(mask_statistics(masks))
    if not masks:
        summary["density"] = None  # not 1.0: nothing was measured
    return summary


register_chains(LlamaPreTrainedModel, lambda model, names: llama_chains(model, names))


def register() -> None:
    """Register `SparseLlamaConfig` with `AutoConfig`, `SparseLlamaForCausalLM` with `AutoModelForCausalLM`.

    Idempotent; ``import hf_chts`` calls it, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads a saved
    ``sparse_llama`` model.

    Example:

    ```python
    >>> register()
    >>> from transformers import AutoConfig
    >>> type(AutoConfig.for_model("sparse_llama")).__name__
    'SparseLlamaConfig'
    ```
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(SparseLlamaConfig.model_type, SparseLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SparseLlamaConfig, SparseLlamaForCausalLM, exist_ok=True)
