"""hf_chts: brain-inspired dynamic sparse training (CHTs, CHTss, BRF) for Hugging Face Transformers.

Importing the package registers ``SparseLlamaConfig`` / ``SparseLlamaForCausalLM`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (model_type ``"sparse_llama"``). Any saved sparse model (any architecture, full or
compact) loads with its masks through ``hf_chts.AutoSparseModelForCausalLM.from_pretrained(path)``.
Heavier pieces (the Trainer callback, evaluation, hub helpers) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import METHODS, PRESETS, SparseTrainingConfig
from .modeling import SparseLlamaConfig, SparseLlamaForCausalLM, register
from .version import __version__ as __version__

# name -> submodule that defines it; imported lazily so `import hf_chts` stays light.
_LAZY = {
    "AutoSparseModel": "auto",
    "AutoSparseModelForCausalLM": "auto",
    "AutoSparseModelForQuestionAnswering": "auto",
    "AutoSparseModelForSeq2SeqLM": "auto",
    "AutoSparseModelForSequenceClassification": "auto",
    "AutoSparseModelForTokenClassification": "auto",
    "CHTssCallback": "callback",
    "FinishedRunGuard": "finished_run",
    "last_complete_checkpoint": "checkpointing",
    "TopologyEngine": "engine",
    "StepStats": "engine",
    "sparsify_": "sparsify",
    "unmask_": "masking",
    "find_sparse_modules": "masking",
    "get_masks": "masking",
    "set_masks_": "masking",
    "apply_masks_": "masking",
    "llama_chains": "modeling",
    "sparsity_summary": "modeling",
    "merge_and_unload": "peft_utils",
    "shira_mask_fn": "peft_utils",
}

__all__ = [
    "METHODS",
    "PRESETS",
    "SparseLlamaConfig",
    "SparseLlamaForCausalLM",
    "SparseTrainingConfig",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_chts' has no attribute {name!r}")


register()
