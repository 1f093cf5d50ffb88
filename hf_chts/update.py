"""One topology update of a model's masked layers, sharded over ranks (what the callback runs at an update).

:func:`topology_update` gathers the full weights (FSDP2), averages the dense gradients onto each layer's
owner, runs :meth:`hf_chts.engine.TopologyEngine.step` on this rank's layer groups, shares the new masks
(:mod:`hf_chts.distributed`), writes them into the ``weight_mask`` buffers, zeroes removed and new weights and
their optimizer state, and merges the per-layer statistics of all ranks. On one process every collective is
a no-op. No Trainer is involved: any training loop can call it after ``optimizer.step()``.

Example:

```python
>>> from torch import nn
>>> from hf_chts import SparseTrainingConfig
>>> from hf_chts.distributed import Collectives
>>> from hf_chts.engine import TopologyEngine
>>> from hf_chts.masking import layer_view_shape
>>> from hf_chts.sparsify import sparsify_
>>> config = SparseTrainingConfig(method="set", density=0.3, update_interval=1)
>>> modules = sparsify_(nn.Sequential(nn.Linear(16, 8)), config)
>>> engine = TopologyEngine(config, {n: layer_view_shape(m) for n, m in modules.items()}, max_steps=10)
>>> result = topology_update(engine, modules, 1, collectives=Collectives())
>>> result.stats.layers["0"].regrown == result.stats.layers["0"].removed
True
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import Collectives, full_tensor, mean_onto_owners, shard_groups, share_masks
from .engine import LayerStats, StepStats, TopologyEngine
from .masking import (
    apply_masks_,
    from_layer_view,
    layer_mask,
    layer_view,
    relink_,
    zero_optimizer_state_,
)
from .stats import global_density, masks_density, update_log_dict

logger = logging.getLogger(__name__)

__all__ = ["UpdateResult", "dense_gradients", "topology_update"]


@dataclass
class UpdateResult:
    """What :func:`topology_update` did: the merged statistics, this rank's layers, the global density after
    the update and the wall time of the whole update (synchronisation included)."""

    stats: StepStats
    owned_layers: list[str] = field(default_factory=list)
    density: float = 1.0
    seconds: float = 0.0

    def log_dict(self, prefix: str, per_layer: bool, seconds_total: float) -> dict[str, float]:
        """The update's training-log figures (:func:`hf_chts.stats.update_log_dict`)."""
        return update_log_dict(
            self.stats.to_log_dict(prefix=prefix, per_layer=per_layer),
            prefix=prefix,
            step=self.stats.step,
            seconds=self.seconds,
            engine_seconds=self.stats.seconds,
            seconds_total=seconds_total,
            density=self.density,
        )


def dense_gradients(
    modules: Mapping[str, nn.Module], captured: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Each layer's dense gradient: the one captured during backward, else the weight's (masked) gradient.

    ``captured`` comes from :func:`hf_chts.masking.set_grad_capture_` (empty or None: nothing was captured,
    e.g. the capture was not switched on for this step; a warning says so).
    """
    if not captured:
        logger.warning(
            "hf_chts: no dense gradient was captured before this update (was on_step_begin skipped?); "
            "using the masked gradient of the weights instead."
        )
        captured = {}
    out = {}
    for name, module in modules.items():
        grad = captured.get(name)
        if grad is None:
            pgrad = module.weight.grad
            if pgrad is not None:
                grad = full_tensor(pgrad).detach().float()
            else:
                grad = torch.zeros(module.weight.shape, device=layer_mask(module).device)
        out[name] = grad
    return out


@torch.no_grad()
def topology_update(
    engine: TopologyEngine,
    modules: Mapping[str, nn.Module],
    step: int,
    *,
    collectives: Collectives,
    optimizer: Any = None,
    captured: Mapping[str, torch.Tensor] | None = None,
) -> UpdateResult:
    """Evolve the topology of ``modules`` at optimizer step ``step``, on every rank alike.

    Args:
        engine (`TopologyEngine`): the run's engine (same config and state on every rank).
        modules: the masked modules by name, in the same order on every rank.
        step (`int`): the optimizer step of the update (counted from 1).
        collectives (`Collectives`): the run's collectives (``Collectives()`` on one process).
        optimizer (*optional*): its state is zeroed at removed and new positions.
        captured: the dense gradients captured during backward (:func:`hf_chts.masking.set_grad_capture_`),
            for methods that read them (:func:`dense_gradients`).

    Returns:
        `UpdateResult`.
    """
    start = time.perf_counter()
    rank, world = collectives.rank, collectives.world
    owner, mine = shard_groups(engine.groups(), rank, world)
    grads = None
    if engine.config.needs_dense_gradient:
        dense = mean_onto_owners(collectives, dense_gradients(modules, captured), owner)
        grads = {name: from_layer_view(modules[name], g) for name, g in dense.items()}
    masks2d, weights2d = {}, {}
    for name, module in modules.items():
        weight = full_tensor(module.weight)  # collective under FSDP2: every rank gathers every layer in order
        if owner[name] != rank:
            continue
        # from_layer_view is a transpose for Conv1D, so it also maps the weight layout to (n_out, n_in)
        weights2d[name] = from_layer_view(module, weight.detach())
        masks2d[name] = layer_view(module)[1]  # the engine copies what it reads
    new_masks, grown, stats = engine.step(step, masks2d, weights2d, grads, groups=mine)
    owned = {
        name: (from_layer_view(modules[name], new_masks[name]), from_layer_view(modules[name], grown[name]))
        for name in new_masks
    }
    buffers = {name: layer_mask(m) for name, m in modules.items()}
    new_w, grown_w = share_masks(collectives, owned, buffers, owner)
    # Nothing was written before the engine returned: a link removed and regrown in this update still holds
    # its weight, and only the positions in `grown` (absent before the update) are zeroed.
    for name, buf in buffers.items():
        buf.copy_(new_w[name])
    relink_(modules, optimizer)  # sparse compute: kept links keep value and state, new links start at 0
    apply_masks_(modules, extra_positions=grown_w)  # removed links and new links start at 0.0
    if optimizer is not None:
        zero_optimizer_state_(optimizer, modules, extra_positions=grown_w)
    stats = _merge_across_ranks(engine, stats, collectives, list(modules))
    if set(stats.layers) == set(modules):  # from the engine's link counts, no read of the masks
        density = global_density((stats.layers[n].nnz, buffers[n].numel()) for n in modules)
    else:
        density = masks_density(buffers.values())
    owned_layers = [name for group in mine for name in group]
    return UpdateResult(stats, owned_layers, density, time.perf_counter() - start)


def _merge_across_ranks(
    engine: TopologyEngine, stats: StepStats, collectives: Collectives, names: list[str]
) -> StepStats:
    """Every rank's per-layer statistics (and the early-stop state), so all ranks agree."""
    if collectives.world == 1:
        return stats
    payload = {"stats": stats.to_dict(), "frozen": sorted(engine.frozen)}
    gathered = collectives.all_gather_object(payload, what="gather of the update statistics")
    layers = {}
    for item in gathered:
        for name, layer in item["stats"]["layers"].items():
            layers[name] = LayerStats(**layer)
    frozen = set().union(*(set(item["frozen"]) for item in gathered))
    engine.load_state_dict({**engine.state_dict(), "frozen": sorted(frozen)})
    merged = StepStats(
        step=stats.step,
        drop_fraction=stats.drop_fraction,
        temperature=stats.temperature,
        seconds=max(item["stats"]["seconds"] for item in gathered),
    )
    merged.layers = {name: layers[name] for name in names if name in layers}
    return merged
