"""Which layers chain removal treats together, as the model declares them.

Chain removal (docs/method.md section 5) needs to know how the sparse layers connect. A model says so itself,
either with a method ``sparse_chains(names) -> list`` or through :func:`register_chains` for its class (the
LLaMA classes register :func:`hf_chts.modeling.llama_chains` when
:mod:`hf_chts.modeling.modeling_sparse_llama` is imported, which ``import hf_chts`` does). The callback asks
:func:`chains_for`; it knows no model type.

Example:

```python
>>> from torch import nn
>>> from hf_chts.chains import chains_for, register_chains
>>> from hf_chts.topology.percolation import LayerChain
>>> class TwoLayers(nn.Sequential):
...     pass
>>> register_chains(TwoLayers, lambda model, names: [LayerChain(tuple(names))])
>>> chains_for(TwoLayers(nn.Linear(4, 8), nn.Linear(8, 2)), ["0", "1"])
[LayerChain(layers=('0', '1'))]
```
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from .topology.percolation import CHAIN_KINDS

__all__ = [
    "as_chain_specs",
    "chains_for",
    "chains_from_json",
    "chains_to_json",
    "register_chains",
    "resolve_chains",
]

logger = logging.getLogger(__name__)

ChainFactory = Callable[[nn.Module, list[str]], Sequence[Any]]
_REGISTRY: dict[type, ChainFactory] = {}


def register_chains(model_class: type, factory: ChainFactory) -> None:
    """Declare the chains of every model of ``model_class`` and its subclasses: ``factory(model, names)``."""
    if not isinstance(model_class, type) or not callable(factory):
        raise ValueError(
            f"register_chains needs a class and a callable, got {model_class!r} and {factory!r}."
        )
    _REGISTRY[model_class] = factory


def chains_for(model: nn.Module, names: list[str]) -> list[Any] | None:
    """The model's chain specs over the sparse layers ``names``, or None when the model declares none."""
    method = getattr(model, "sparse_chains", None)
    if callable(method):
        return list(method(names))
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return list(_REGISTRY[cls](model, names))
    return None


def chains_to_json(chains) -> list[dict[str, Any]] | None:
    """JSON form of concrete chain specs; None for a callable or unknown specs (not exported then)."""
    if chains is None or callable(chains):
        return None
    out = []
    for chain in chains:
        if not isinstance(chain, tuple(CHAIN_KINDS.values())):
            return None
        out.append({"kind": type(chain).__name__, **asdict(chain)})
    return out


def chains_from_json(items: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Chain specs back from :func:`chains_to_json`."""
    chains = []
    for item in items:
        data = dict(item)
        kind = data.pop("kind", None)
        if kind not in CHAIN_KINDS:
            raise ValueError(
                f"Unknown chain kind {kind!r} in the callback state; expected one of {sorted(CHAIN_KINDS)}."
            )
        chains.append(CHAIN_KINDS[kind](**data))  # each kind turns JSON lists back into its tuples
    return chains


def as_chain_specs(chains: Any) -> Any:
    """``chains`` as given by a user (specs, a factory or None), or rebuilt from :func:`chains_to_json`."""
    if (
        isinstance(chains, Sequence)
        and not isinstance(chains, str)
        and chains
        and isinstance(chains[0], Mapping)
    ):
        return chains_from_json(chains)
    return chains


def resolve_chains(
    model: nn.Module, names: list[str], chains: Sequence[Any] | ChainFactory | None, *, enabled: bool
) -> list[Any]:
    """The chain specs of a run over the sparse layers ``names``.

    Args:
        model (`nn.Module`): the model.
        names (`list[str]`): the sparse layers.
        chains: specs or a factory ``(model, names) -> specs`` given by the user; None asks the model
            (:func:`chains_for`).
        enabled (`bool`): ``config.chain_removal``; without it there are no chains.

    A model that declares none gives no chains, with a warning saying how to declare them.
    """
    if not enabled:
        return []
    if chains is not None:
        return list(chains(model, names)) if callable(chains) else list(chains)
    found = chains_for(model, names)
    if found is not None:
        return found
    logger.warning(
        "hf_chts: chain_removal is on but %s declares no chains; pass `chains=[LayerChain([...]), ...]` "
        "to CHTssCallback, or `hf_chts.chains.register_chains(%s, factory)`; set `chain_removal=False` in "
        "the SparseTrainingConfig to silence this. Training continues without.",
        type(model).__name__,
        type(model).__name__,
    )
    return []
