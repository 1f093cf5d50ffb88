"""Which modules of a model are sparse: layer selection by pattern, never embeddings or tied weights.

:func:`find_sparse_modules` picks the ``nn.Linear`` / ``Conv1D`` layers to mask (by default those inside an
``nn.ModuleList`` of blocks; ``target_modules`` / ``exclude_modules`` patterns otherwise), and
:func:`unwrap_model` strips the DDP / ``torch.compile`` wrappers so that module names are the bare model's.
Reads no mask.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

__all__ = ["find_sparse_modules", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / ``torch.compile`` wrappers so module names match the bare model's."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None and isinstance(getattr(emb, "weight", None), torch.Tensor):
            weights.append(emb.weight)
    return weights


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def _is_tied(weight: torch.Tensor, embeddings: list[torch.Tensor]) -> bool:
    for emb in embeddings:
        if weight is emb:
            return True
        # Same storage (tied by sharing data rather than the Parameter object); meta tensors have no storage.
        if weight.device.type != "meta" and emb.device.type != "meta":
            try:
                if weight.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr():
                    return True
            except (RuntimeError, NotImplementedError):
                pass
    return False


def find_sparse_modules(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    exclude_modules: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """The modules to sparsify, by name, in ``model.named_modules()`` order.

    Default selection: every ``nn.Linear`` / ``Conv1D`` inside an ``nn.ModuleList`` (the transformer blocks).
    Embeddings, norms, ``lm_head`` (the output embedding) and any module whose weight is tied to an input
    embedding are never selected.

    Args:
        model (`nn.Module`): the model (DDP / compile wrappers are stripped).
        target_modules (`list[str]`, *optional*): regular expressions matched with ``re.search`` against the
            full dotted module name; when given they replace the default selection (still linear layers only).
        exclude_modules (`list[str]`, *optional*): regular expressions of names to keep dense.

    Raises:
        ValueError: when nothing matches, naming the patterns and listing some available linear layers.
    """
    model = unwrap_model(model)
    targets = _compile_patterns(target_modules, "target_modules")
    excludes = _compile_patterns(exclude_modules, "exclude_modules")
    named = list(model.named_modules())
    module_lists = [name for name, m in named if isinstance(m, nn.ModuleList) and name]
    embeddings = _embedding_weights(model)
    out_emb = _output_embedding(model)

    candidates: list[str] = []
    selected: dict[str, nn.Module] = {}
    for name, module in named:
        if not name or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        candidates.append(name)
        never = (
            module is out_emb
            or name == "lm_head"
            or name.endswith(".lm_head")
            or _is_tied(module.weight, embeddings)
        )
        if targets is not None:
            hit = any(p.search(name) for p in targets)
            if hit and never:
                logger.warning(
                    "`target_modules` matches %r, which is the output embedding or tied to an embedding; "
                    "it stays dense.",
                    name,
                )
        else:
            hit = any(name.startswith(prefix + ".") for prefix in module_lists)
        if not hit or never or (excludes is not None and any(p.search(name) for p in excludes)):
            continue
        selected[name] = module
    if not selected:
        shown = ", ".join(candidates[:12]) + (
            f", ... ({len(candidates)} in all)" if len(candidates) > 12 else ""
        )
        raise ValueError(
            f"No module to sparsify: target_modules={_as_list(target_modules)}, "
            f"exclude_modules={_as_list(exclude_modules)} select no nn.Linear/Conv1D "
            f"{'' if targets is not None else 'inside an nn.ModuleList of blocks '}of "
            f"{type(model).__name__}. Linear layers available: [{shown or 'none'}]. Set `target_modules` to "
            "regular expressions of some of these names (matched with re.search)."
        )
    return selected


def _as_list(patterns) -> list[str] | None:
    return None if patterns is None else list(patterns)


def _compile_patterns(patterns, field: str) -> list[re.Pattern] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{field}` must be a list of regular expressions, got {patterns!r}.")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"`{field}` entry {p!r} is not a valid regular expression: {err}.") from err
    return compiled
