"""Pieces the recipes share: command-line arguments mirroring `SparseTrainingConfig`, sparse init scaling."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import field

import torch
from torch import nn

from .config import SparseTrainingConfig

__all__ = ["scale_sparse_init_", "sparse_arguments_class"]


def sparse_arguments_class(**defaults: typing.Any) -> type:
    """A dataclass mirroring `SparseTrainingConfig` for the command line, ``method`` also accepting "dense".

    ``seed`` is left out (``TrainingArguments.seed`` seeds everything); ``defaults`` replace field defaults.

    Example:
        >>> SparseArguments = sparse_arguments_class(method="chts", density=0.01)
        >>> SparseArguments().density
        0.01
    """
    hints = typing.get_type_hints(SparseTrainingConfig)
    fields = []
    for f in dataclasses.fields(SparseTrainingConfig):
        if f.name == "seed":
            continue
        meta = dict(f.metadata)
        if f.name == "method":
            meta["help"] = meta["help"] + " Or 'dense': no sparsity, no callback."
        fields.append((f.name, hints[f.name], field(default=defaults.get(f.name, f.default), metadata=meta)))
    return dataclasses.make_dataclass("SparseArguments", fields)


@torch.no_grad()
def scale_sparse_init_(modules: Mapping[str, nn.Module]) -> None:
    """Divide each sparse layer's initial weights by sqrt(its density).

    A neuron then starts with the output variance it would have in the dense network (the sparse weight
    initialisation of the authors' MLP code); without it the signal of a 1%-dense MLP shrinks about 10x per
    layer and training stalls at chance level.
    """
    for module in modules.values():
        density = module.weight_mask.float().mean().item()
        if 0 < density < 1:
            module.weight.mul_(density**-0.5)
