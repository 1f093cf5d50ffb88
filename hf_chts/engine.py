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
from .initial import final_densities, init_params, initial_masks, scaled_density
from .stats import global_density, mean_active_neurons
from .topology.regrowth import regrow_stack
from .topology.removal import decay_prune, keep_back, remove_stack
from .topology.rng import stream_key
from .topology.rows import count_true
from .topology.schedules import DropFraction, Temperature, make_density_schedule
from .topology.stacks import (
    LayerStack,
    chain_layers,
    group_by_shape,
    make_stacks,
    plan_chunks,
    read_counts,
    remove_chains,
)

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
    returned: int = 0
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
            for name in chain_layers(chain):
                if name not in self.shapes:
                    raise ValueError(
                        f"Chain {index} names layer {name!r}, which is not among the sparse layers."
                    )
                if name in self._chain_of:
                    raise ValueError(
                        f"Layer {name!r} belongs to two chains ({self._chain_of[name]} and {index})."
                    )
                self._chain_of[name] = index
        self.final_density = final_densities(config, self.shapes)
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
        return scaled_density(self.final_density[name], cfg, density)

    def target_nnz(self, name: str, step: int) -> int:
        """Exact number of links layer ``name`` holds after the update at ``step``."""
        return link_count(self.shapes[name], self.layer_density(name, step))

    def groups(self) -> list[list[str]]:
        """Layers that must be updated together: one group per chain, then one per unchained layer."""
        groups = [chain_layers(chain) for chain in self.chains]
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

        Layers of one shape on one device evolve as one stacked ``(B, n_out, n_in)`` tensor: scores,
        selections, chain removal and statistics are computed for the whole stack at once, and the host reads
        data back a constant number of times per stack, never once per layer. Every random draw comes from the
        layer's own counter-based stream (:mod:`hf_chts.topology.rng`), keyed by ``(seed, step, layer,
        phase)`` and drawn for a whole stack in one op, so a layer gets the same mask whether it is evolved
        alone or in a stack, on another rank, on a CPU or a GPU, or after a resume. The update runs in
        chunks of whole groups (:meth:`groups`), each within a few stack budgets per shape, one after
        another: beyond the masks it returns, it holds one chunk's stacks at a time (docs/DESIGN.md).

        Args:
            step (`int`): the optimizer step the update belongs to; seeds every random draw.
            masks (`Mapping[str, Tensor]`): current ``(n_out, n_in)`` bool masks.
            weights (`Mapping[str, Tensor]`): the matching weights (masked positions are 0).
            grads (`Mapping[str, Tensor]`, *optional*): dense gradients of the effective weights; needed by
                gradient regrowth (RigL, GraNet) and MEST removal.
            groups: subset of :meth:`groups` to update (a rank's share); layers outside are not returned.

        Returns:
            `(new_masks, grown, stats)`: new masks, the grown positions and a :class:`StepStats`. ``grown``
            marks the links that are in the new mask but were absent before the update; a link removed and
            regrown in the same update is not new (it keeps its weight and optimizer state), unless
            ``config.reset_returning_links`` is set, in which case ``grown`` marks every regrown link.
        """
        cfg = self.config
        start = time.perf_counter()
        evolve = step <= self.t_end  # past t_end, an update only follows the density decay
        zeta = float(self.drop_fraction(step)) if cfg.removal != "none" and evolve else 0.0
        temperature = float(self.temperature(step))
        stats = StepStats(step=step, drop_fraction=zeta, temperature=temperature)
        group_list = self.groups() if groups is None else [list(group) for group in groups]
        names = [name for group in group_list for name in group]
        for name in names:
            mask = masks[name]
            if tuple(mask.shape) != self.shapes[name]:
                raise ValueError(
                    f"Mask of layer {name!r} has shape {tuple(mask.shape)}, expected {self.shapes[name]}."
                )
            if (
                cfg.removal == "mest"
                and zeta > 0
                and name not in self.frozen
                and (grads or {}).get(name) is None
            ):
                raise ValueError(f"MEST removal needs the gradient of layer {name!r}; pass `grads`.")
            if cfg.regrowth == "gradient" and (grads or {}).get(name) is None:
                raise ValueError(
                    f"Gradient regrowth needs the dense gradient of layer {name!r}; pass `grads`."
                )
        new_masks: dict[str, torch.Tensor] = {}
        grown_masks: dict[str, torch.Tensor] = {}
        # Chunks of whole groups (chain removal couples only layers of one group): each chunk's stacks are
        # evolved and freed before the next chunk starts, so the working set is one chunk's, not the model's.
        for chunk in plan_chunks(group_list, masks, self.shapes):
            stacks = make_stacks(chunk, masks, self.shapes)
            self._evolve_stacks(stacks, step, evolve, weights, grads, zeta, temperature, stats)
            for s in stacks:
                for b, name in enumerate(s.names):
                    new_masks[name], grown_masks[name] = s.mask[b], s.grown[b]
            del stacks
        stats.seconds = time.perf_counter() - start
        for layer in stats.layers.values():
            layer.seconds = stats.seconds / max(len(names), 1)
        # results in the order of the stacks of one chunk holding every layer, whatever the chunks
        order = [name for members in group_by_shape(names, masks, self.shapes).values() for name in members]
        stats.layers = {name: stats.layers[name] for name in order}
        return {n: new_masks[n] for n in order}, {n: grown_masks[n] for n in order}, stats

    def _evolve_stacks(
        self, stacks: list[LayerStack], step, evolve, weights, grads, zeta, temperature, stats
    ):
        """The phases of one chunk's stacks: density decay and removal, chain removal, (EM_S keep-back,)
        regrowth and statistics. The counts each phase takes come from the schedules; every layer draws from
        its own stream ``(seed, step, layer, phase)``."""
        cfg = self.config

        def streams(s: LayerStack, phase: str) -> list[int]:
            return [stream_key(cfg.seed, step, name, phase) for name in s.names]

        nnz_before = read_counts(stacks, lambda s: count_true(s.old))
        for s in stacks:
            s.nnz = [nnz_before[name] for name in s.names]
            s.target = [self.target_nnz(name, step) for name in s.names]
            # EM_S: no decay; removal goes down to the final density, zeta is not used
            decay = [0 if self._em_s else max(n - t, 0) for n, t in zip(s.nnz, s.target, strict=True)]
            decay_prune(s, weights, decay, score=cfg.decay_pruning, streams=streams(s, "decay"))
            if cfg.removal == "none":
                remove = [0] * len(s)
            elif self._em_s:
                final = [link_count(s.shape, self.final_density[name]) for name in s.names]
                remove = [max(n - f, 0) for n, f in zip(s.nnz, final, strict=True)]
            else:
                remove = [math.floor(zeta * n) for n in s.nnz]
            remove = [0 if name in self.frozen else r for name, r in zip(s.names, remove, strict=True)]
            remove_stack(
                s,
                weights,
                remove,
                method=cfg.removal,
                mode=cfg.removal_mode,
                temperature=temperature,
                streams=streams(s, "remove"),
                grads=grads,
                mest_lambda=cfg.mest_lambda,
            )
        chain_removed = {name: 0 for s in stacks for name in s.names}
        if cfg.chain_removal and evolve:
            chain_removed = remove_chains(stacks, self.chains, self.shapes)
        final_prune = self._em_s and not self.density_schedule.regrows(step)
        for s in stacks:
            s.nnz = [n - chain_removed[name] for n, name in zip(s.nnz, s.names, strict=True)]
            if final_prune:  # chain removal went below the target: keep back the best removed links
                missing = [max(t - n, 0) for t, n in zip(s.target, s.nnz, strict=True)]
                before = [nnz_before[name] for name in s.names]
                keep_back(s, weights, missing, before, streams=streams(s, "keep_back"))
                # the statistics count net removals: kept-back links come off the magnitude prune's count
                for b, (name, k) in enumerate(zip(s.names, missing, strict=True)):
                    chain_removed[name] -= max(k - s.removed[b], 0)
                    s.removed[b] = max(s.removed[b] - k, 0)
            grow = [max(t - n, 0) for t, n in zip(s.target, s.nnz, strict=True)]
            if cfg.regrowth == "none" or final_prune:  # the final EM_S prune grows nothing
                grow = [0] * len(s)
            regrow_stack(
                s,
                grow,
                method=cfg.regrowth,
                mode=cfg.regrowth_mode,
                grads=grads,
                ch_variant=cfg.ch_variant,
                ch_precision=cfg.ch_precision,
                streams=streams(s, "regrow"),
                reset_returning_links=cfg.reset_returning_links,
            )
        self._finish(stacks, stats, nnz_before, chain_removed)

    def _finish(self, stacks, stats: StepStats, nnz_before, chain_removed) -> None:
        """Statistics of every layer (one host read per device); ``s.grown`` becomes the returned grown."""
        cfg = self.config

        def figures(s: LayerStack) -> torch.Tensor:
            # Links kept are counted on the host; only what the selection decided is read back.
            rows = s.mask.amax(dim=2)  # any(): amax is ~5x faster on a CPU
            cols = s.mask.amax(dim=1)
            parts = [count_true(rows), count_true(cols)]
            parts.append(s.returned if s.returned is not None else torch.zeros_like(parts[0]))
            return torch.stack(parts, dim=1)

        table = read_counts(stacks, figures)
        for s in stacks:
            n_out, n_in = s.shape
            if s.grown is not None:  # (regrowth made it what the caller gets: see regrow_stack)
                grown = s.grown
            elif cfg.reset_returning_links:
                grown = torch.zeros_like(s.mask)
            else:
                grown = s.mask & ~s.old
            s.grown, s.old = grown, None
            for b, name in enumerate(s.names):
                rows, cols, returned = table[name]
                nnz = s.nnz[b] + s.regrown[b]
                new = s.regrown[b] - returned
                layer = LayerStats(
                    nnz_before=nnz_before[name],
                    nnz=nnz,
                    target_nnz=s.target[b],
                    density=nnz / (n_out * n_in),
                    numel=n_out * n_in,
                    decay_pruned=s.decay[b],
                    removed=s.removed[b],
                    chain_removed=chain_removed[name],
                    regrown=s.regrown[b],
                    returned=returned,
                    turnover=new / max(nnz_before[name], 1),
                    active_out=rows / n_out,
                    active_in=cols / n_in,
                    frozen=name in self.frozen,
                )
                stats.layers[name] = layer
                if cfg.early_stop_threshold is not None and layer.regrown > 0 and not layer.frozen:
                    if returned / layer.regrown >= cfg.early_stop_threshold:
                        self.frozen.add(name)

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
