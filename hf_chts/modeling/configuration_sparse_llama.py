"""`SparseLlamaConfig`: a `LlamaConfig` plus the sparse-training settings that travel with the model.

The configuration alone, as transformers keeps ``configuration_<model>.py`` apart from
``modeling_<model>.py``: a reader (or a tool that only reads ``config.json``) finds the settings, their
normalisation and their validation without importing the model. The sparse-training settings are stored in
``config.sparsity`` as ``SparseTrainingConfig.to_dict(resolved=True)``, so a checkpoint records the settings
that trained it; the sparse projections in ``config.sparse_projections``, with the module names of
:mod:`.llama_layout`.

Example:

```python
>>> from hf_chts.modeling import SparseLlamaConfig
>>> config = SparseLlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
...                            intermediate_size=64, sparse_projections=["up_proj", "q_proj"])
>>> config.sparse_projections, config.sparse_layer_names()
(['q_proj', 'up_proj'], ['model.layers.0.self_attn.q_proj', 'model.layers.0.mlp.up_proj'])
```
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .._validation import check_choice
from ..config import SparseTrainingConfig
from .llama_layout import SPARSE_PROJECTIONS, block_prefix, projection_name

__all__ = ["SparseLlamaConfig"]

# transformers >= 5.? declares configs as strict dataclasses; earlier releases take fields in `__init__`.
_DATACLASS_CONFIGS = dataclasses.is_dataclass(LlamaConfig)


def _normalise_sparsity(value: Any) -> dict[str, Any]:
    """Every field's value (``to_dict(resolved=True)``), validated, from a config object or a (partial) dict.

    The checkpoint then records the settings that trained it, whatever later versions make of the presets.
    """
    if isinstance(value, SparseTrainingConfig):
        return SparseTrainingConfig.from_dict(value.to_dict()).to_dict(resolved=True)
    if isinstance(value, Mapping):
        return SparseTrainingConfig.from_dict(dict(value)).to_dict(resolved=True)
    raise ValueError(
        f"`sparsity` must be a SparseTrainingConfig or a dict of its fields, got {type(value).__name__}; "
        "e.g. sparsity={'method': 'chts', 'density': 0.3}."
    )


def _normalise_projections(value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(
            f"`sparse_projections` must be a list of projection names from {list(SPARSE_PROJECTIONS)}, "
            f"got {value!r}."
        )
    value = list(value)
    if not value:
        raise ValueError(
            "`sparse_projections` is empty; list at least one of "
            f"{list(SPARSE_PROJECTIONS)}, or use a plain LlamaForCausalLM for a dense model."
        )
    for name in value:
        check_choice("sparse projection", name, SPARSE_PROJECTIONS)
    if len(set(value)) != len(value):
        raise ValueError(f"`sparse_projections` repeats a name: {value!r}.")
    # Canonical order, so two configs naming the same set compare equal.
    return [name for name in SPARSE_PROJECTIONS if name in value]


def _compile_patterns(patterns: list[str] | None, field: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns or []:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"`sparsity[{field!r}]` entry {pattern!r} is not a valid regular expression: {err}."
            ) from err
    return compiled


class SparseLlamaConfig(LlamaConfig):
    r"""Configuration of a [`SparseLlamaForCausalLM`]: a `LlamaConfig` plus the sparse-training settings.

    Args:
        sparsity (`dict` or `SparseTrainingConfig`, *optional*):
            The sparse-training settings, stored as ``SparseTrainingConfig.to_dict()`` (every field resolved
            from the preset). A partial dict such as ``{"method": "chtss", "density": 0.3}`` is completed;
            bad values raise a ``ValueError`` when the config is built (or the field assigned). Defaults to
            ``SparseTrainingConfig()`` (CHTs at density 0.3, seed 0). Its ``seed`` seeds the initial masks;
            its ``target_modules`` / ``exclude_modules`` (regular expressions, ``re.search`` on the module
            name) further narrow the sparse layers.
        sparse_projections (`list[str]`, *optional*):
            Which projections of every decoder block are sparse, among ``q_proj, k_proj, v_proj, o_proj,
            gate_proj, up_proj, down_proj`` (the default: all seven). Embeddings, norms and ``lm_head`` are
            always dense.
        **kwargs: every `LlamaConfig` field (``hidden_size``, ``num_hidden_layers``, ...).

    Example:

    ```python
    >>> config = SparseLlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
    ...                            intermediate_size=64, sparsity={"method": "chtss", "density": 0.1})
    >>> config.model_type, config.sparse_training_config.initial_density
    ('sparse_llama', 0.5)
    >>> config.sparse_layer_names()[:2]
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
    ```
    """

    model_type = "sparse_llama"

    if _DATACLASS_CONFIGS:  # transformers whose configs are (strict) dataclasses
        sparsity: dict[str, Any] | None = None
        sparse_projections: list[str] | None = None

        def __post_init__(self, **kwargs):
            # A dense LLaMA config.json loaded into this class carries `model_type: llama`; the class decides
            # the model type (it is what `to_dict` / `config.json` write), so drop the stale attribute.
            kwargs.pop("model_type", None)
            self._default_sparsity()
            super().__post_init__(**kwargs)

    else:  # transformers whose configs take their fields in `__init__`

        def __init__(self, sparsity: Any = None, sparse_projections: Any = None, **kwargs):
            kwargs.pop("model_type", None)
            self.sparsity, self.sparse_projections = sparsity, sparse_projections
            self._default_sparsity()
            super().__init__(**kwargs)

    def _default_sparsity(self) -> None:
        if self.sparsity is None:
            self.sparsity = SparseTrainingConfig().to_dict(resolved=True)
        if self.sparse_projections is None:
            self.sparse_projections = list(SPARSE_PROJECTIONS)

    def __setattr__(self, name: str, value: Any) -> None:
        # Normalise and validate on every assignment, including the ones `from_pretrained(..., sparsity=...)`
        # makes after construction (they bypass `__post_init__`).
        if name == "sparsity" and value is not None:
            value = _normalise_sparsity(value)
        elif name == "sparse_projections" and value is not None:
            value = _normalise_projections(value)
        super().__setattr__(name, value)

    @property
    def sparse_training_config(self) -> SparseTrainingConfig:
        """``sparsity`` as a :class:`~hf_chts.config.SparseTrainingConfig` (a new object on every access)."""
        return SparseTrainingConfig.from_dict(self.sparsity)

    def sparse_layer_names(self) -> list[str]:
        """Module names of the sparse layers of a ``SparseLlamaForCausalLM`` built from this config.

        Every ``model.layers.<i>.<self_attn|mlp>.<projection>`` for the projections in ``sparse_projections``,
        kept only if it matches one of ``sparsity["target_modules"]`` (when set) and none of
        ``sparsity["exclude_modules"]`` (regular expressions, ``re.search``, as in
        :func:`hf_chts.masking.find_sparse_modules`).
        """
        targets = _compile_patterns(self.sparsity.get("target_modules"), "target_modules")
        excludes = _compile_patterns(self.sparsity.get("exclude_modules"), "exclude_modules")
        names = []
        for layer in range(self.num_hidden_layers):
            for proj in self.sparse_projections:
                name = projection_name(block_prefix(layer), proj)
                if targets and not any(p.search(name) for p in targets):
                    continue
                if any(p.search(name) for p in excludes):
                    continue
                names.append(name)
        if not names:
            raise ValueError(
                f"No sparse layer left: sparse_projections={self.sparse_projections}, "
                f"target_modules={self.sparsity.get('target_modules')}, "
                f"exclude_modules={self.sparsity.get('exclude_modules')} select none of the "
                f"model.layers.<i>.<self_attn|mlp>.<projection> modules. Widen `target_modules` or drop "
                "`exclude_modules`, or use a plain LlamaForCausalLM for a dense model."
            )
        return names

    def to_llama_config(self) -> LlamaConfig:
        """The same architecture as a plain `LlamaConfig` (no sparsity fields, ``model_type: llama``)."""
        data = self.to_dict()
        for key in ("sparsity", "sparse_projections", "model_type", "transformers_version"):
            data.pop(key, None)
        data["architectures"] = ["LlamaForCausalLM"]
        config = LlamaConfig.from_dict(data)
        config._attn_implementation = self._attn_implementation
        return config


if _DATACLASS_CONFIGS:
    SparseLlamaConfig = strict(SparseLlamaConfig)
