"""The LLaMA architecture as the package knows it: projection names, where they sit, their order, their roles.

Every LLaMA-specific name is spelled here, once; the rest of the package reads it from here:

- :mod:`.configuration_sparse_llama` and :mod:`.modeling_sparse_llama` build the sparse layer names of a
  ``SparseLlamaForCausalLM`` (``model.layers.<i>.<self_attn|mlp>.<projection>``);
- :class:`hf_chts.topology.percolation.LlamaBlockChain` states chain removal over one decoder block by
  *roles* (q, k, v, o, gate, up, down: attention with grouped-query heads and a gated MLP, docs/method.md
  section 5); :meth:`~hf_chts.topology.percolation.LlamaBlockChain.from_prefix` takes the module of each role
  from :data:`BLOCK_ROLES` and :func:`projection_name`;
- :mod:`hf_chts.stats` orders layer tables by :data:`LAYER_ORDER` and finds the MLP hidden neurons through
  :data:`MLP_PROJECTIONS` and :data:`BLOCK_ROLES`.

The module holds names only and imports nothing from ``hf_chts`` (``hf_chts.modeling`` imports its model
classes lazily), so the low layers (``topology``, ``stats``) import it without importing a model.

Example:

```python
>>> from hf_chts.modeling.llama_layout import projection_name, sparse_layer_names
>>> projection_name("model.layers.3", "up_proj")
'model.layers.3.mlp.up_proj'
>>> sparse_layer_names(1)[:2]
['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj']
```
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ATTENTION_PROJECTIONS",
    "BLOCK_ROLES",
    "LAYERS_PREFIX",
    "LAYER_ORDER",
    "MLP_PROJECTIONS",
    "PROJECTION_PARENT",
    "SPARSE_PROJECTIONS",
    "block_prefix",
    "projection_name",
    "sparse_layer_names",
]

# Projection name -> the sub-module of a `LlamaDecoderLayer` that holds it, in forward order.
PROJECTION_PARENT: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# The projections of a decoder block that can be sparse (embeddings, norms and `lm_head` stay dense).
SPARSE_PROJECTIONS: tuple[str, ...] = tuple(PROJECTION_PARENT)
ATTENTION_PROJECTIONS: tuple[str, ...] = tuple(
    p for p, parent in PROJECTION_PARENT.items() if parent == "self_attn"
)
MLP_PROJECTIONS: tuple[str, ...] = tuple(p for p, parent in PROJECTION_PARENT.items() if parent == "mlp")
# Layer types in the order tables show them (any other type comes after these, by name).
LAYER_ORDER: tuple[str, ...] = SPARSE_PROJECTIONS
# Role in chain removal's block rule (topology.percolation.LlamaBlockChain) -> the projection playing it.
BLOCK_ROLES: dict[str, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
# Module path of the decoder blocks in a `LlamaForCausalLM` (block i is `model.layers.<i>`).
LAYERS_PREFIX = "model.layers"


def block_prefix(layer: int, prefix: str = LAYERS_PREFIX) -> str:
    """Module path of decoder block ``layer`` (``model.layers.<layer>`` in a ``LlamaForCausalLM``)."""
    return f"{prefix}.{layer}"


def projection_name(block: str, projection: str) -> str:
    """Module path of ``projection`` (e.g. ``"q_proj"``) in the decoder block whose path is ``block``."""
    if projection not in PROJECTION_PARENT:
        raise ValueError(
            f"Unknown LLaMA projection {projection!r}; expected one of {list(SPARSE_PROJECTIONS)}."
        )
    return f"{block.rstrip('.')}.{PROJECTION_PARENT[projection]}.{projection}"


def sparse_layer_names(num_layers: int, projections: Iterable[str] = SPARSE_PROJECTIONS) -> list[str]:
    """Module paths of ``projections`` in every block of a ``LlamaForCausalLM`` with ``num_layers`` blocks,
    block by block, each block in the order of ``projections``."""
    projections = list(projections)
    return [projection_name(block_prefix(i), p) for i in range(num_layers) for p in projections]
