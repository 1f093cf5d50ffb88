"""Dense export: a plain copy of a sparse model without masks, saved for any tool that reads transformers
checkpoints (``hf-chts export --format dense``)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from .masking import unmask_

__all__ = ["save_dense", "to_dense_model"]


def to_dense_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``model`` without masks; ``model`` itself is left as it is.

    ``model.to_dense()`` when the class has it (e.g. ``SparseLlamaForCausalLM``), else a deep copy turned
    back into plain layers by :func:`hf_chts.masking.unmask_` (effective weights kept, masks removed).
    """
    to_dense = getattr(model, "to_dense", None)
    if callable(to_dense):
        return to_dense()
    return unmask_(copy.deepcopy(model))


def save_dense(model: torch.nn.Module, folder: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Save ``model`` as a plain dense checkpoint (no masks), loadable by ``transformers`` alone."""
    folder = Path(folder)
    dense = to_dense_model(model)
    dense.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
