"""Sparsity statistics of masks: density, degrees and active neurons, computed in this one place.

Every figure the package reports (training logs, ``hf-chts inspect``, the model card, ``sparsity_summary``)
comes from these functions, so they agree by construction. Definitions (docs/method.md, section 5):

- density of a set of layers: links / positions over all of them (a layer with 0 links still counts its
  positions);
- a neuron is active when it has at least one link; ``active_out`` / ``active_in`` are the fractions of active
  output (row) / input (column) neurons of a layer seen as ``(n_out, n_in)``; ``active_neurons`` is their
  mean, and the plain mean of that over layers for a set of layers.

Tables list layer types in :data:`LAYER_ORDER` (the LLaMA projections, as :mod:`hf_chts.modeling.llama_layout`
names them), any other type after them, by name.

Example:

```python
>>> import torch
>>> from hf_chts.stats import global_density, layer_statistics
>>> mask = torch.tensor([[True, False], [False, False]])
>>> layer_statistics(mask)["active_out"], global_density([(1, 4), (0, 8)])
(0.5, 0.08333333333333333)
```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .modeling.llama_layout import BLOCK_ROLES, LAYER_ORDER, MLP_PROJECTIONS

__all__ = [
    "LAYER_ORDER",
    "density_summary",
    "global_density",
    "layer_sort_key",
    "layer_statistics",
    "layer_type",
    "mask_statistics",
    "masks_density",
    "mean_active_neurons",
    "mlp_active_neurons",
    "summarize_by_layer_type",
    "update_log_dict",
]


def global_density(counts: Iterable[tuple[int, int]]) -> float:
    """Links / positions over all layers, from ``(nnz, numel)`` pairs; 1.0 when there is no position."""
    nnz = numel = 0
    for links, positions in counts:
        nnz += int(links)
        numel += int(positions)
    return nnz / numel if numel else 1.0


def masks_density(masks: Iterable[torch.Tensor]) -> float:
    """:func:`global_density` of boolean masks (reads each mask's link count on the host)."""
    return global_density((int(mask.sum()), mask.numel()) for mask in masks)


def update_log_dict(
    step_logs: Mapping[str, float],
    *,
    prefix: str,
    step: int,
    seconds: float,
    engine_seconds: float,
    seconds_total: float,
    density: float,
) -> dict[str, float]:
    """The training-log figures of one topology update (the keys ``CHTssCallback`` documents).

    Args:
        step_logs: the update's own figures (``StepStats.to_log_dict(prefix)``: links removed and regrown,
            turnover, active neurons, per-layer figures).
        prefix (`str`): the key prefix, e.g. ``"sparsity/"``.
        step (`int`): the optimizer step of the update.
        seconds (`float`): wall time of the whole update, synchronisation included.
        engine_seconds (`float`): the engine's share of it.
        seconds_total (`float`): wall time of all updates of the run so far.
        density (`float`): global density after the update (links / positions over all layers).
    """
    logs = dict(step_logs)
    logs[f"{prefix}engine_seconds"] = engine_seconds
    logs[f"{prefix}update_seconds"] = seconds
    logs[f"{prefix}update_seconds_total"] = seconds_total
    logs[f"{prefix}update_step"] = float(step)
    logs[f"{prefix}density"] = density
    return logs


def mean_active_neurons(active: Iterable[tuple[float, float]]) -> float:
    """Mean over layers of ``(active_out + active_in) / 2``, from ``(active_out, active_in)`` pairs."""
    values = [(out + inp) / 2 for out, inp in active]
    return float(sum(values) / len(values)) if values else 0.0


def _degree_stats(degrees: torch.Tensor) -> dict[str, float]:
    degrees = degrees.to(torch.float64)
    return {
        "min": float(degrees.min()),
        "mean": float(degrees.mean()),
        "max": float(degrees.max()),
        "std": float(degrees.std(unbiased=False)),
    }


def layer_statistics(mask: torch.Tensor) -> dict[str, Any]:
    """Figures of one ``(n_out, n_in)`` mask.

    Returns:
        ``{"shape", "nnz", "numel", "density", "in_degree", "out_degree", "active_out", "active_in",
        "active_neurons"}``: ``in_degree`` are the row sums (links into each output neuron),
        ``out_degree`` the column sums (links out of each input neuron), each as ``{min, mean, max, std}``.
    """
    n_out, n_in = mask.shape
    row = mask.sum(1)
    col = mask.sum(0)
    nnz = int(row.sum())
    active_out = float((row > 0).double().mean())
    active_in = float((col > 0).double().mean())
    return {
        "shape": [n_out, n_in],
        "nnz": nnz,
        "numel": n_out * n_in,
        "density": nnz / (n_out * n_in),
        "in_degree": _degree_stats(row),
        "out_degree": _degree_stats(col),
        "active_out": active_out,
        "active_in": active_in,
        "active_neurons": (active_out + active_in) / 2,
    }


def mask_statistics(
    masks: Mapping[str, torch.Tensor], *, transposed: bool | Mapping[str, bool] = False
) -> dict[str, dict[str, Any]]:
    """:func:`layer_statistics` of every mask, by name.

    Args:
        masks (`Mapping[str, torch.Tensor]`): ``{layer name: bool mask}`` as stored (shaped like the weight).
        transposed (`bool` or `Mapping[str, bool]`, defaults to `False`): the masks (or, per name, some of
            them) are stored ``(n_in, n_out)`` (GPT-2 ``Conv1D``).
    """
    stats = {}
    for name, mask in masks.items():
        flip = transposed.get(name, False) if isinstance(transposed, Mapping) else transposed
        stats[name] = layer_statistics(mask.T if flip else mask)
    return stats


def _type_rank(kind: str) -> tuple:
    return (0, LAYER_ORDER.index(kind), "") if kind in LAYER_ORDER else (1, 0, kind)


def layer_sort_key(name: str) -> tuple:
    """Order layer names by block number (numerically: ``layers.2`` before ``layers.10``), then layer type
    (q, k, v, o, gate, up, down), then name."""
    parts = name.split(".")
    last_digit = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    block = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts[: last_digit + 1])
    return (block, _type_rank(parts[-1]), name)


def layer_type(name: str) -> str:
    """The layer type of a module name: its last component (``model.layers.3.mlp.up_proj`` -> ``up_proj``)."""
    return name.rsplit(".", 1)[-1]


def summarize_by_layer_type(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Aggregate :func:`mask_statistics` per layer type (q_proj, ..., down_proj) and overall (``"all"``).

    ``nnz`` / ``numel`` / ``density`` are link-weighted (:func:`global_density`); ``active_out`` /
    ``active_in`` are neuron-weighted; ``active_neurons`` is :func:`mean_active_neurons` over the layers (the
    definition of the training log's ``sparsity/active_neurons``).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for name, s in stats.items():
        groups.setdefault(layer_type(name), []).append(s)
    if stats:
        groups["all"] = list(stats.values())
    out: dict[str, dict[str, float]] = {}
    for key in sorted(groups, key=lambda k: (k == "all", _type_rank(k))):
        items = groups[key]
        n_out = sum(s["shape"][0] for s in items)
        n_in = sum(s["shape"][1] for s in items)
        out[key] = {
            "layers": len(items),
            "nnz": sum(s["nnz"] for s in items),
            "numel": sum(s["shape"][0] * s["shape"][1] for s in items),
            "density": global_density((s["nnz"], s["shape"][0] * s["shape"][1]) for s in items),
            "active_out": sum(s["active_out"] * s["shape"][0] for s in items) / n_out,
            "active_in": sum(s["active_in"] * s["shape"][1] for s in items) / n_in,
            "active_neurons": mean_active_neurons((s["active_out"], s["active_in"]) for s in items),
        }
    return out


def density_summary(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Overall density and per layer type, from :func:`mask_statistics` (the shape of ``sparsity_summary``).

    Returns:
        ``{"density", "nnz", "numel", "per_projection": {type: {"density", "nnz", "numel", "layers"}},
        "per_layer": {name: {"density", "nnz", "numel", "shape"}}}``, shapes as ``(n_out, n_in)``.
    """
    by_type = summarize_by_layer_type(stats)
    overall = by_type.pop("all", {"nnz": 0, "numel": 0})
    return {
        "density": global_density([(overall["nnz"], overall["numel"])]),
        "nnz": overall["nnz"],
        "numel": overall["numel"],
        "per_projection": {
            kind: {key: s[key] for key in ("density", "nnz", "numel", "layers")}
            for kind, s in by_type.items()
        },
        "per_layer": {
            name: {"density": s["density"], "nnz": s["nnz"], "numel": s["numel"], "shape": tuple(s["shape"])}
            for name, s in stats.items()
        },
    }


def mlp_active_neurons(masks: Mapping[str, torch.Tensor]) -> float | None:
    """Fraction of LLaMA MLP hidden neurons still active (docs/method.md section 5); None without MLP masks.

    Hidden neuron ``h`` of a block is active when row ``h`` of ``gate_proj`` and of ``up_proj`` and column
    ``h`` of ``down_proj`` each hold at least one link; layers without a mask count as dense.
    """
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for name, mask in masks.items():
        prefix, _, kind = name.rpartition(".")
        if kind in MLP_PROJECTIONS:
            blocks.setdefault(prefix, {})[kind] = mask
    active = total = 0
    for parts in blocks.values():
        alive = None
        for kind, mask in parts.items():
            degree = mask.sum(0) if kind == BLOCK_ROLES["down"] else mask.sum(1)  # down reads the neuron
            alive = degree > 0 if alive is None else alive & (degree > 0)
        active += int(alive.sum())
        total += alive.numel()
    return active / total if total else None
