"""Hugging Face model classes with sparse (masked) layers, and their Auto registration.

Laid out as transformers lays out a model: :mod:`.configuration_sparse_llama` (``SparseLlamaConfig``),
:mod:`.modeling_sparse_llama` (``SparseLlamaForCausalLM``, ``llama_chains``, ``sparsity_summary``,
``register``) and :mod:`.llama_layout` (the LLaMA module names, the one place they are spelled). The names
are imported on first access, so the low layers can import :mod:`.llama_layout` without importing a model.

Example:

```python
>>> from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM, register
>>> register()  # AutoConfig / AutoModelForCausalLM now know model_type "sparse_llama"
```
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule that defines it
_EXPORTS = {
    "SPARSE_PROJECTIONS": "llama_layout",
    "SparseLlamaConfig": "configuration_sparse_llama",
    "SparseLlamaForCausalLM": "modeling_sparse_llama",
    "llama_chains": "modeling_sparse_llama",
    "register": "modeling_sparse_llama",
    "sparsity_summary": "modeling_sparse_llama",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
