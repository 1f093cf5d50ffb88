"""One topology-evolution step over a set of sparse layers (docs/method.md section 2), with no Trainer import.

The engine owns the schedules and the per-layer bookkeeping; the tensor work is done by the pure functions of
:mod:`hf_chts.topology`. It sees every layer as an ``(n_out, n_in)`` mask plus the matching weight (and, for
RigL-style regrowth, the dense gradient), and returns new masks. Applying them to a model, syncing ranks and
resetting optimizer state is the caller's job (:mod:`hf_chts.masking`, :mod:`hf_chts.callback`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._validation import check_shape_2d, link_count
from .config import SparseTrainingConfig
from .stats import global_density, mean_active_neurons
from .topology.csti import abs_correlation, load_calibration_inputs
from .topology.init import allocate_densities, init_mask
from .topology.percolation import active_neurons, chain_removal
from .topology.regrowth import regrow_links
from .topology.removal import remove_links
from .topology.rng import stream_key
from .topology.schedules import DropFraction, EMSDensity, Temperature, make_density_schedule
from .topology.scores import removal_scores

__all__ = ["LayerStats", "StepStats", "TopologyEngine", "derive_generator", "init_params", "initial_masks"]


def derive_generator(seed: int, *keys: Any, device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded by a stable hash of ``(seed, *keys)``.

    Random streams depend only on what they are for (step, layer, phase), never on the rank or on how many
    draws happened before, so a resumed run, or another rank, draws exactly the same.
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def init_params(config: SparseTrainingConfig, csti_inputs: Any = None) -> dict[str, Any]:
    """The keyword arguments of :func:`~hf_chts.topology.init.init_mask` that ``config.init`` reads.

    For ``init="csti"`` that is the absolute input correlation (one for every layer) of ``csti_inputs``, or
    of the file named by ``config.csti_inputs``.
    """
    if config.init == "brf":
        return {"r": config.brf_r, "degree_dist": config.brf_degree_dist}
    if config.init == "bsw":
        return {"beta": config.bsw_beta}
    if config.init == "csti":
        inputs = csti_inputs if csti_inputs is not None else config.csti_inputs
        return {"correlation": abs_correlation(load_calibration_inputs(inputs))}
    return {}


def _final_densities(config: SparseTrainingConfig, shapes: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Each layer's final density (``density`` spread by ``density_distribution``); refuses 0-link layers."""
    names = list(shapes)
    final = allocate_densities([shapes[n] for n in names], config.density, config.density_distribution)
    densities = dict(zip(names, final, strict=True))
    empty = [n for n in names if link_count(shapes[n], densities[n]) == 0]
    if empty:
        n_out, n_in = shapes[empty[0]]
        raise ValueError(
            f"density={config.density} ({config.density_distribution}) leaves {len(empty)} sparse layers "
            f"with 0 links, e.g. {empty[0]!r} ({n_out} x {n_in}, density {densities[empty[0]]:.3g}); a layer "
            f"needs at least 1 link, i.e. a density of at least {1 / (n_out * n_in):.3g}. Raise `density` "
            "or keep such layers dense with `exclude_modules`."
        )
    return densities


def _scaled(final_density: float, config: SparseTrainingConfig, density: float) -> float:
    """A layer's density when the global target is ``density`` (ERK layers scale alike, capped at 1)."""
    return min(1.0, final_density * density / config.density)


def _step0_density(final_density: float, config: SparseTrainingConfig) -> float:
    """A layer's density before the first update: ``initial_density`` scaled, or EM_S's first extra links."""
    if config.density_schedule == "em_s":
        return min(1.0, final_density + EMSDensity.__dataclass_fields__["first_extra"].default)
    return _scaled(final_density, config, config.initial_density)


def initial_masks(
    config: SparseTrainingConfig,
    shapes: Mapping[str, Sequence[int]],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    csti_inputs: Any = None,
) -> dict[str, torch.Tensor]:
    """The initial ``(n_out, n_in)`` masks of a set of layers: the one place masks are drawn.

    Each layer holds exactly ``round(d * n_out * n_in)`` links at its step-0 density ``d``
    (``initial_density`` spread over the layers by ``density_distribution``), drawn by ``config.init``. The
    callback, :func:`hf_chts.sparsify.sparsify_` and ``SparseLlamaForCausalLM`` all draw through here.

    Args:
        config (`SparseTrainingConfig`): the method and its knobs.
        shapes (`Mapping[str, tuple[int, int]]`): ``(n_out, n_in)`` of every layer, by name.
        device (`torch.device`, *optional*): where the masks are made.
        generator (`torch.Generator`, *optional*): draw every layer in turn from this generator; by
            default each layer draws from the counter-based stream ``stream_key(config.seed, "init",
            layer name)``, so every rank, run and device draws the same masks (docs/DESIGN.md, Randomness).
        csti_inputs (*optional*): calibration inputs (samples x n_features) of ``init="csti"``.
    """
    shapes = {name: check_shape_2d(shape) for name, shape in shapes.items()}
    final = _final_densities(config, shapes)
    params = init_params(config, csti_inputs)
    masks = {}
    for name, shape in shapes.items():
        density = _step0_density(final[name], config)
        # A counter-based stream key, not a device generator: the same masks on every device.
        if generator is not None:
            source = {"generator": generator}
        else:
            source = {"key": stream_key(config.seed, "init", name)}
        masks[name] = init_mask(shape, density, config.init, device=device, **source, **params)
    return masks


@dataclass
class LayerStats:
    """What one evolution step did to one layer."""

    nnz_before: int
    nnz: int
    target_nnz: int
    density: float
    numel: int = 0
    decay_pruned: int = 0
    removed: int = 0
    chain_removed: int = 0
    regrown: int = 0
    turnover: float = 0.0
    active_out: float = 1.0
    active_in: float = 1.0
    frozen: bool = False
    seconds: float = 0.0


@dataclass
class StepStats:
    """Statistics of one evolution step over all the layers it touched."""

    step: int
    drop_fraction: float
    temperature: float
    seconds: float = 0.0
    layers: dict[str, LayerStats] = field(default_factory=dict)

    def to_log_dict(self, prefix: str = "sparsity/", per_layer: bool = True) -> dict[str, float]:
        """Flat ``{key: number}`` for Trainer logs: global figures, then per-layer ones if asked."""
        layers = self.layers.values()
        logs = {
            f"{prefix}density": global_density((s.nnz, s.numel) for s in layers),
            f"{prefix}links_removed": float(
                sum(s.removed + s.decay_pruned + s.chain_removed for s in layers)
            ),
            f"{prefix}links_regrown": float(sum(s.regrown for s in layers)),
            f"{prefix}chain_removed": float(sum(s.chain_removed for s in layers)),
            f"{prefix}turnover": _mean(s.turnover for s in layers),
            f"{prefix}active_neurons": mean_active_neurons((s.active_out, s.active_in) for s in layers),
            f"{prefix}drop_fraction": self.drop_fraction,
            f"{prefix}temperature": self.temperature,
            f"{prefix}update_seconds": self.seconds,
        }
        if per_layer:
            for name, s in self.layers.items():
                logs[f"{prefix}{name}/density"] = s.density
                logs[f"{prefix}{name}/active_out"] = s.active_out
                logs[f"{prefix}{name}/active_in"] = s.active_in
                logs[f"{prefix}{name}/turnover"] = s.turnover
        return logs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


class TopologyEngine:
    """Initial masks and topology updates for a set of sparse layers.

    Args:
        config (`SparseTrainingConfig`): the method and its knobs.
        shapes (`Mapping[str, tuple[int, int]]`): ``(n_out, n_in)`` of every sparse layer, by name. The order
            is the order of :meth:`groups`.
        chains (`Sequence`): chain specs for chain removal (`LayerChain`, `LlamaBlockChain` from
            :mod:`hf_chts.topology.percolation`); layers of one chain are updated together.
        max_steps (`int`): total optimizer steps of the run; resolves ``t_end`` and ``decay_end``. Only
            :meth:`init_masks` is meaningful without the real value.
        csti_inputs (*optional*): calibration inputs (samples x n_features) of ``init="csti"``; default: the
            file named by ``config.csti_inputs``.

    Example:
        >>> config = SparseTrainingConfig(method="chts", density=0.2)
        >>> engine = TopologyEngine(config, {"fc": (8, 16)}, max_steps=100)
        >>> masks = engine.init_masks()
        >>> int(masks["fc"].sum())
        26
    """

    def __init__(
        self,
        config: SparseTrainingConfig,
        shapes: Mapping[str, Sequence[int]],
        chains: Sequence[Any] = (),
        max_steps: int = 1,
        csti_inputs: Any = None,
    ) -> None:
        if not isinstance(config, SparseTrainingConfig):
            raise ValueError(f"`config` must be a SparseTrainingConfig, got {type(config).__name__}.")
        if not shapes:
            raise ValueError("`shapes` is empty: the engine needs at least one sparse layer.")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"`max_steps` must be a positive integer, got {max_steps!r}.")
        self.config = config
        self.csti_inputs = csti_inputs
        self.shapes = {name: check_shape_2d(shape) for name, shape in shapes.items()}
        self.names = list(self.shapes)
        self.max_steps = max_steps
        self.t_end, self.decay_end = config.resolve_steps(max_steps)
        self.chains = list(chains)
        self._chain_of: dict[str, int] = {}
        for index, chain in enumerate(self.chains):
            for name in _chain_layers(chain):
                if name not in self.shapes:
                    raise ValueError(
                        f"Chain {index} names layer {name!r}, which is not among the sparse layers."
                    )
                if name in self._chain_of:
                    raise ValueError(
                        f"Layer {name!r} belongs to two chains ({self._chain_of[name]} and {index})."
                    )
                self._chain_of[name] = index
        self.final_density = _final_densities(config, self.shapes)
        self.drop_fraction = DropFraction(config.zeta, max(self.t_end, 1), kind=config.zeta_schedule)
        self.temperature = Temperature(max(self.t_end, 1), config.temperature_start, config.temperature_end)
        self.frozen: set[str] = set()

    # ------------------------------------------------------------------ schedule queries
    @functools.cached_property
    def density_schedule(self):
        """Global target density as a function of the step (built on first use: drawing initial masks does
        not need a run long enough for the decay)."""
        cfg = self.config
        return make_density_schedule(
            cfg.density_schedule,
            cfg.density,
            initial_density=cfg.initial_density,
            decay_start=cfg.decay_start,
            decay_end=self.decay_end,
            update_interval=cfg.update_interval,
            steepness=cfg.decay_steepness,
            t_end=max(self.t_end, cfg.update_interval),
        )

    @property
    def _em_s(self) -> bool:
        """EM_S: every update removes down to the final density and regrows the schedule's extra links."""
        return self.config.density_schedule == "em_s"

    @functools.cached_property
    def last_update(self) -> int:
        """The last step with a topology update: ``t_end``, or ``decay_end`` when a density decay ends later.

        Removal and regrowth stop at ``t_end``; update steps between ``t_end`` and ``decay_end`` only prune to
        the decaying density (the research settings have t_end = 0.75 and decay_end = 0.8 of the run).
        """
        cfg = self.config
        if cfg.density_schedule in ("constant", "em_s"):
            return self.t_end
        return max(self.t_end, self.decay_end)

    def should_update(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) ends with a topology update."""
        cfg = self.config
        return cfg.is_dynamic and step > 0 and step % cfg.update_interval == 0 and step <= self.last_update

    def evolves(self, step: int) -> bool:
        """Whether the update at ``step`` removes and regrows links (not only density-decay pruning)."""
        return self.should_update(step) and step <= self.t_end

    def layer_density(self, name: str, step: int) -> float:
        """Target density of layer ``name`` after the update at ``step`` (ERK layers scale alike)."""
        cfg = self.config
        if self._em_s:  # extra links on top of the layer's own final density
            return min(1.0, self.final_density[name] + self.density_schedule.extra(step))
        density = cfg.initial_density if step <= cfg.decay_start else self.density_schedule(step)
        return _scaled(self.final_density[name], cfg, density)

    def target_nnz(self, name: str, step: int) -> int:
        """Exact number of links layer ``name`` holds after the update at ``step``."""
        return link_count(self.shapes[name], self.layer_density(name, step))

    def groups(self) -> list[list[str]]:
        """Layers that must be updated together: one group per chain, then one per unchained layer."""
        groups = [list(_chain_layers(chain)) for chain in self.chains]
        groups += [[name] for name in self.names if name not in self._chain_of]
        return groups

    # ------------------------------------------------------------------ masks
    def init_masks(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Initial masks of every layer at the step-0 density (:func:`initial_masks`)."""
        return initial_masks(self.config, self.shapes, device=device, csti_inputs=self.csti_inputs)

    def step(
        self,
        step: int,
        masks: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor] | None = None,
        groups: Sequence[Sequence[str]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], StepStats]:
        """Run one evolution step (docs/method.md section 2) on ``groups`` (default: all layers).

        Args:
            step (`int`): the optimizer step the update belongs to; seeds every random draw.
            masks (`Mapping[str, Tensor]`): current ``(n_out, n_in)`` bool masks.
            weights (`Mapping[str, Tensor]`): the matching weights (masked positions are 0).
            grads (`Mapping[str, Tensor]`, *optional*): dense gradients of the effective weights; needed by
                gradient regrowth (RigL, GraNet) and MEST removal.
            groups: subset of :meth:`groups` to update (a rank's share); layers outside are not returned.

        Returns:
            `(new_masks, grown, stats)`: new masks and the newly grown positions of the updated layers, and a
            :class:`StepStats`.
        """
        cfg = self.config
        start = time.perf_counter()
        evolve = step <= self.t_end  # past t_end, an update only follows the density decay
        zeta = float(self.drop_fraction(step)) if cfg.removal != "none" and evolve else 0.0
        temperature = float(self.temperature(step))
        stats = StepStats(step=step, drop_fraction=zeta, temperature=temperature)
        new_masks: dict[str, torch.Tensor] = {}
        grown_masks: dict[str, torch.Tensor] = {}
        for group in self.groups() if groups is None else groups:
            group = list(group)
            times = dict.fromkeys(group, 0.0)
            pruned: dict[str, torch.Tensor] = {}
            for name in group:
                t0 = time.perf_counter()
                mask = masks[name]
                if mask.shape != self.shapes[name]:
                    raise ValueError(
                        f"Mask of layer {name!r} has shape {tuple(mask.shape)}, expected {self.shapes[name]}."
                    )
                pruned[name], layer = self._prune(step, name, mask, weights[name], grads, zeta, temperature)
                stats.layers[name] = layer
                times[name] += time.perf_counter() - t0
            if cfg.chain_removal and evolve and group[0] in self._chain_of:
                t0 = time.perf_counter()
                chain = self.chains[self._chain_of[group[0]]]
                before = {name: int(pruned[name].sum()) for name in group}
                pruned, _ = chain_removal(pruned, [chain])
                for name in group:
                    stats.layers[name].chain_removed = before[name] - int(pruned[name].sum())
                    times[name] += (time.perf_counter() - t0) / len(group)
            for name in group:
                t0 = time.perf_counter()
                new_mask, grown = self._regrow(
                    step, name, masks[name], pruned[name], grads, stats.layers[name]
                )
                new_masks[name], grown_masks[name] = new_mask, grown
                stats.layers[name].seconds = times[name] + time.perf_counter() - t0
        stats.seconds = time.perf_counter() - start
        return new_masks, grown_masks, stats

    def _prune(self, step, name, mask, weight, grads, zeta, temperature):
        """Density decay (hard, by the decay score) then link removal; returns the pruned mask and stats."""
        cfg = self.config
        mask = mask.bool()
        nnz_before = int(mask.sum())
        target = self.target_nnz(name, step)
        layer = LayerStats(
            nnz_before=nnz_before, nnz=nnz_before, target_nnz=target, density=0.0, numel=mask.numel()
        )
        layer.frozen = name in self.frozen
        nnz = nnz_before
        n_remove = math.floor(zeta * nnz)
        if self._em_s:  # remove down to the final density (by the removal score), zeta is not used
            n_remove = max(nnz - link_count(self.shapes[name], self.final_density[name]), 0)
        elif nnz > target:
            scores = removal_scores(weight, cfg.decay_pruning)
            mask = remove_links(mask, scores, nnz - target, mode="hard")
            layer.decay_pruned = nnz - target
            nnz = target
            n_remove = math.floor(zeta * nnz)
        if not layer.frozen and cfg.removal != "none":
            if n_remove > 0:
                grad = None if grads is None else grads.get(name)
                if cfg.removal == "mest" and grad is None:
                    raise ValueError(f"MEST removal needs the gradient of layer {name!r}; pass `grads`.")
                scores = removal_scores(weight, cfg.removal, grad=grad, mest_lambda=cfg.mest_lambda)
                generator = derive_generator(cfg.seed, step, name, "remove", device=mask.device)
                mask = remove_links(
                    mask,
                    scores,
                    n_remove,
                    mode=cfg.removal_mode,
                    temperature=temperature,
                    generator=generator,
                )
                layer.removed = n_remove
        return mask, layer

    def _regrow(self, step, name, old_mask, mask, grads, layer: LayerStats):
        """Grow back to the target; update the layer's stats (turnover, active neurons, early stop)."""
        cfg = self.config
        n_grow = layer.target_nnz - int(mask.sum())
        if self._em_s and not self.density_schedule.regrows(step):
            n_grow = 0  # the final EM_S prune grows nothing
        grown = torch.zeros_like(mask)
        # A frozen layer (early stop) skips removal, so it only regrows what chain removal or decay took.
        if n_grow > 0 and cfg.regrowth != "none":
            grad = None if grads is None else grads.get(name)
            if cfg.regrowth == "gradient" and grad is None:
                raise ValueError(
                    f"Gradient regrowth needs the dense gradient of layer {name!r}; pass `grads`."
                )
            generator = derive_generator(cfg.seed, step, name, "regrow", device=mask.device)
            mask, grown = regrow_links(
                mask,
                n_grow,
                method=cfg.regrowth,
                mode=cfg.regrowth_mode,
                grad=grad,
                ch_variant=cfg.ch_variant,
                ch_precision=cfg.ch_precision,
                generator=generator,
            )
            layer.regrown = n_grow
        old_mask = old_mask.bool()
        layer.nnz = int(mask.sum())
        numel = mask.numel()
        layer.density = layer.nnz / numel
        layer.turnover = int((mask & ~old_mask).sum()) / max(layer.nnz_before, 1)
        layer.active_out, layer.active_in = (float(v) for v in active_neurons(mask))
        if cfg.early_stop_threshold is not None and layer.regrown > 0 and not layer.frozen:
            came_back = int((grown & old_mask).sum()) / layer.regrown
            if came_back >= cfg.early_stop_threshold:
                self.frozen.add(name)
        return mask, grown

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (everything else is a pure function of the step)."""
        return {"frozen": sorted(self.frozen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state.get("frozen", [])) - set(self.names)
        if unknown:
            raise ValueError(
                f"Engine state freezes unknown layers {sorted(unknown)}; was it saved for this model?"
            )
        self.frozen = set(state.get("frozen", []))


def _chain_layers(chain: Any) -> list[str]:
    """Layer names of a chain spec (a `LayerChain` has ``layers``; a `LlamaBlockChain` names its seven)."""
    if hasattr(chain, "layers"):
        return list(chain.layers)
    names = [getattr(chain, key) for key in ("q", "k", "v", "o", "gate", "up", "down") if hasattr(chain, key)]
    if not names:
        raise ValueError(f"Unknown chain spec {chain!r}: expected a LayerChain or a LlamaBlockChain.")
    return names
