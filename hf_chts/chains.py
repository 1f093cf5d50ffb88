"""Which layers chain removal treats together, as the model declares them.

Chain removal (docs/method.md section 5) needs to know how the sparse layers connect. A model says so itself,
either with a method ``sparse_chains(names) -> list`` or through :func:`register_chains` for its class (the
LLaMA classes register :func:`hf_chts.modeling.llama_chains` when :mod:`hf_chts.modeling` is imported, which
``import hf_chts`` does). The callback asks :func:`chains_for`; it knows no model type.

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from .topology.percolation import LayerChain, LlamaBlockChain

__all__ = ["chains_for", "chains_from_json", "chains_to_json", "register_chains"]

ChainFactory = Callable[[nn.Module, list[str]], Sequence[Any]]
_REGISTRY: dict[type, ChainFactory] = {}
_KINDS = {"LayerChain": LayerChain, "LlamaBlockChain": LlamaBlockChain}


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
        if not isinstance(chain, tuple(_KINDS.values())):
            return None
        out.append({"kind": type(chain).__name__, **asdict(chain)})
    return out


def chains_from_json(items: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Chain specs back from :func:`chains_to_json`."""
    chains = []
    for item in items:
        data = dict(item)
        kind = data.pop("kind", None)
        if kind not in _KINDS:
            raise ValueError(
                f"Unknown chain kind {kind!r} in the callback state; expected one of {sorted(_KINDS)}."
            )
        if kind == "LayerChain":
            data["layers"] = tuple(data["layers"])
        chains.append(_KINDS[kind](**data))
    return chains
