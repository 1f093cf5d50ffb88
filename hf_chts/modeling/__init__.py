"""Hugging Face model classes with sparse (masked) layers, and their Auto registration.

Example:

```python
>>> from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM, register
>>> register()  # AutoConfig / AutoModelForCausalLM now know model_type "sparse_llama"
```
"""

from .sparse_llama import (
    SPARSE_PROJECTIONS,
    SparseLlamaConfig,
    SparseLlamaForCausalLM,
    llama_chains,
    register,
    sparsity_summary,
)

__all__ = [
    "SPARSE_PROJECTIONS",
    "SparseLlamaConfig",
    "SparseLlamaForCausalLM",
    "llama_chains",
    "register",
    "sparsity_summary",
]
