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
from .topology.link_prediction import ch_scores
from .topology.rng import stream_key
from .topology.rows import count_true, host_values, row_positions, scatter_rows
from .topology.sampling import select_rows
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
        for chunk in _chunks(group_list, masks, self.shapes):
            stacks = _make_stacks(chunk, masks, self.shapes)
            self._evolve_stacks(stacks, chunk, step, evolve, weights, grads, zeta, temperature, stats)
            for s in stacks:
                for b, name in enumerate(s.names):
                    new_masks[name], grown_masks[name] = s.mask[b], s.grown[b]
            del stacks
        stats.seconds = time.perf_counter() - start
        for layer in stats.layers.values():
            layer.seconds = stats.seconds / max(len(names), 1)
        # results in the order of the stacks of one chunk holding every layer, whatever the chunks
        order = [name for members in _by_stack_key(names, masks, self.shapes).values() for name in members]
        stats.layers = {name: stats.layers[name] for name in order}
        return {n: new_masks[n] for n in order}, {n: grown_masks[n] for n in order}, stats

    def _evolve_stacks(
        self, stacks: list[_Stack], names, step, evolve, weights, grads, zeta, temperature, stats
    ):
        """Prune, chain removal, (EM_S keep-back,) regrowth and statistics of one chunk's stacks."""
        nnz_before = _read_counts(stacks, lambda s: count_true(s.old))
        for s in stacks:
            s.mask = s.old  # every change below makes a new tensor (chain removal copies first)
            s.nnz = [nnz_before[name] for name in s.names]
            s.target = [self.target_nnz(name, step) for name in s.names]
            self._prune_stack(s, step, weights, grads, zeta, temperature)
        chain_removed = dict.fromkeys(names, 0)
        if self.config.chain_removal and evolve:
            chain_removed = self._chain_removal(stacks, names)
        final_prune = self._em_s and not self.density_schedule.regrows(step)
        for s in stacks:
            s.nnz = [n - chain_removed[name] for n, name in zip(s.nnz, s.names, strict=True)]
            if final_prune:  # chain removal went below the target: keep back the best removed links
                self._keep_back_stack(s, step, weights, nnz_before, chain_removed)
            self._regrow_stack(s, step, grads)
        self._finish(stacks, stats, nnz_before, chain_removed)

    def _prune_stack(self, s: _Stack, step, weights, grads, zeta, temperature) -> None:
        """Density decay (hard, by the decay score) then link removal, on every layer of a stack."""
        cfg = self.config
        if self._em_s:  # no decay: removal goes down to the final density, zeta is not used
            decay = [0] * len(s.names)
        else:
            decay = [max(n - t, 0) for n, t in zip(s.nnz, s.target, strict=True)]
        if any(decay):
            link_pos = _link_positions(s.mask, s.nnz)
            # the whole stack's scores, read at the links only (and freed before the selection)
            values = removal_scores(_stack_of(weights, s), cfg.decay_pruning).view(-1)[link_pos]
            keep = [n - d for n, d in zip(s.nnz, decay, strict=True)]
            gens = [stream_key(cfg.seed, step, name, "decay") for name in s.names]
            s.mask = _keep_links(s.mask, link_pos, values, s.nnz, keep, "hard", 1.0, gens)
            s.nnz = keep
            del link_pos, values
        s.decay = decay
        s.removed = [0] * len(s.names)
        if cfg.removal == "none":
            s.cache.clear()
            return
        if self._em_s:
            final = [link_count(s.shape, self.final_density[name]) for name in s.names]
            remove = [max(n - f, 0) for n, f in zip(s.nnz, final, strict=True)]
        else:
            remove = [math.floor(zeta * n) for n in s.nnz]
        remove = [0 if name in self.frozen else r for name, r in zip(s.names, remove, strict=True)]
        if not any(remove):
            s.cache.clear()
            return

        # Magnitude and MEST scores are elementwise: score the links only.
        link_pos = _link_positions(s.mask, s.nnz)
        weight = _stack_of(weights, s).view(-1)[link_pos]
        grad = _stack_of(grads, s).view(-1)[link_pos] if cfg.removal == "mest" else None
        s.cache.clear()
        values = removal_scores(weight, cfg.removal, grad=grad, mest_lambda=cfg.mest_lambda)
        del weight, grad
        keep = [n - r for n, r in zip(s.nnz, remove, strict=True)]
        gens = [stream_key(cfg.seed, step, name, "remove") for name in s.names]
        s.mask = _keep_links(s.mask, link_pos, values, s.nnz, keep, cfg.removal_mode, temperature, gens)
        s.nnz, s.removed = keep, remove
        s.cache.clear()

    def _chain_removal(self, stacks: list[_Stack], names: list[str]) -> dict[str, int]:
        """Chain removal on every chain among ``names``: chains of one structure and shapes form one stack."""
        where = {name: (s, b) for s in stacks for b, name in enumerate(s.names)}
        kinds: dict[tuple, list[Any]] = {}
        for chain in self.chains:
            members = _chain_layers(chain)
            if members[0] not in where:
                continue
            key = (chain.structure(), tuple((self.shapes[n], where[n][0].device) for n in members))
            kinds.setdefault(key, []).append(chain)
        if not kinds:
            return dict.fromkeys(names, 0)
        for chains in kinds.values():
            for name in (name for chain in chains for name in _chain_layers(chain)):
                s = where[name][0]
                if s.mask is s.old:  # nothing pruned: the links are cleared in a copy
                    s.mask = s.old.clone()
        role_stacks, copies = [], []
        for chains in kinds.values():
            slots = list(zip(*(_chain_layers(chain) for chain in chains), strict=True))
            # A block whose layers live on several devices is processed on its first layer's device.
            device = where[slots[0][0]][0].device
            tensors = []
            for slot in slots:
                tensor, copied = _slot_rows(where, slot, device)
                tensors.append(tensor)
                if copied:
                    copies.append((slot, tensor))
            role_stacks.append((chains[0], tensors))
        # Every pass that changes something removes a link, so this ends; one host read per pass and device.
        while _any_true([chain.apply_stacked_(tensors) for chain, tensors in role_stacks]):
            pass
        for slot, tensor in copies:
            for j, name in enumerate(slot):
                s, b = where[name]
                s.mask[b].copy_(tensor[j])
        counts = _read_counts(stacks, lambda s: count_true(s.mask))
        before = {name: n for s in stacks for name, n in zip(s.names, s.nnz, strict=True)}
        return {name: before[name] - counts[name] for name in names}

    def _keep_back_stack(self, s: _Stack, step, weights, nnz_before, chain_removed) -> None:
        """EM_S's final prune ends at exactly the target: links it removed come back to fill what chain
        removal took on top of the magnitude prune.

        Candidates are the links of the mask before the update that are no longer in it; those whose two
        neurons are still active (a non-empty row and a non-empty column, so chain removal stays at its fixed
        point) come first, each tier by weight magnitude. They keep their weights: nothing new is grown.
        """
        missing = [max(t - n, 0) for t, n in zip(s.target, s.nnz, strict=True)]
        if not any(missing):
            return
        rows = len(s.names)
        pool = s.old & ~s.mask
        active = s.mask.amax(dim=2, keepdim=True) & s.mask.amax(dim=1, keepdim=True)
        magnitude = _stack_of(weights, s, float_dtype=True).abs()
        scale = magnitude.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
        # active candidates score in [2, 3], the others in [0, 1]: the tiers never mix
        scores = (magnitude / scale + 2.0 * active).masked_fill_(~pool, 0.0)
        numel = s.shape[0] * s.shape[1]
        excluded = [numel - (nnz_before[name] - n) for name, n in zip(s.names, s.nnz, strict=True)]
        gens = [stream_key(self.config.seed, step, name, "keep_back") for name in s.names]
        kept = select_rows(
            scores.view(rows, -1),
            missing,
            mode="hard",
            exclude=(~pool).view(rows, -1),
            streams=gens,
            n_excluded=excluded,
        ).view(s.mask.shape)
        s.mask = s.mask | kept
        s.nnz = [n + k for n, k in zip(s.nnz, missing, strict=True)]
        # the statistics count net removals: kept-back links come off the magnitude prune's count first
        for b, (name, k) in enumerate(zip(s.names, missing, strict=True)):
            chain_removed[name] -= max(k - s.removed[b], 0)
            s.removed[b] = max(s.removed[b] - k, 0)
        s.cache.clear()

    def _regrow_stack(self, s: _Stack, step, grads) -> None:
        """Grow every layer of a stack back to its target."""
        cfg = self.config
        grow = [max(t - n, 0) for t, n in zip(s.target, s.nnz, strict=True)]
        if self._em_s and not self.density_schedule.regrows(step):
            grow = [0] * len(s.names)  # the final EM_S prune grows nothing
        s.regrown = [0] * len(s.names)
        s.grown = None
        if cfg.regrowth == "none" or not any(grow):
            return
        rows = len(s.names)
        flat = s.mask.view(rows, -1)
        if cfg.regrowth == "random":
            scores, mode = None, "hard"
        elif cfg.regrowth == "gradient":
            scores, mode = _stack_of(grads, s, float_dtype=True).abs_().view(rows, -1), cfg.regrowth_mode
        else:
            scores = _ch_scores_stack(s.mask, cfg.ch_variant, cfg.ch_precision, s.nnz)
            scores, mode = scores.view(rows, -1), cfg.regrowth_mode
        gens = [stream_key(cfg.seed, step, name, "regrow") for name in s.names]
        grown = select_rows(
            scores,
            grow,
            mode=mode,
            exclude=flat,
            streams=gens,
            n_excluded=s.nnz,
            shape=tuple(flat.shape),
            device=s.device,
            overwrite=True,  # the scores are this update's own
        ).view(s.mask.shape)
        del scores
        s.cache.clear()
        s.mask = s.mask | grown
        s.returned = count_true(grown & s.old)  # links removed and regrown in this update
        if not cfg.reset_returning_links:
            # only the links that are new to the layer are "grown": grown & ~old, in place and in one pass
            # (for bools, ``a > b`` is ``a & ~b``; a boolean masked_fill_ is ~50x slower on a CPU)
            torch.gt(grown, s.old, out=grown)
        s.grown, s.old = grown, None  # the old masks are not needed any more
        s.regrown = grow

    def _finish(self, stacks, stats: StepStats, nnz_before, chain_removed) -> None:
        """Statistics of every layer (one host read per device); ``s.grown`` becomes the returned grown."""
        cfg = self.config

        def figures(s: _Stack) -> torch.Tensor:
            # Links kept are counted on the host; only what the selection decided is read back.
            rows = s.mask.amax(dim=2)  # any(): amax is ~5x faster on a CPU
            cols = s.mask.amax(dim=1)
            parts = [count_true(rows), count_true(cols)]
            parts.append(s.returned if s.returned is not None else torch.zeros_like(parts[0]))
            return torch.stack(parts, dim=1)

        table = _read_counts(stacks, figures)
        for s in stacks:
            n_out, n_in = s.shape
            if s.grown is not None:  # (regrowth made it what the caller gets: see _regrow_stack)
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


def _chain_layers(chain: Any) -> list[str]:
    """Layer names of a chain spec (a `LayerChain` has ``layers``; a `LlamaBlockChain` names its seven)."""
    if hasattr(chain, "layers"):
        return list(chain.layers)
    names = [getattr(chain, key) for key in ("q", "k", "v", "o", "gate", "up", "down") if hasattr(chain, key)]
    if not names:
        raise ValueError(f"Unknown chain spec {chain!r}: expected a LayerChain or a LlamaBlockChain.")
    return names


# ---------------------------------------------------------------------------------------------- stacks
# Largest stack, in entries, processed in one piece (its float32 scores and keys dominate the memory).
_STACK_ENTRIES = {"cpu": 1 << 24}
_STACK_ENTRIES_DEFAULT = 1 << 27
# Largest chunk, in stack budgets per (shape, device): a chunk's boolean masks (old and new) stay alive while
# one stack at a time holds its float temporaries. The host reads a few times per chunk (chain removal's
# passes, the counts it leaves): on a GPU, where each read stalls the device, chunks of 1 / 4 / 8 budgets
# read 416 / 238 / 210 times per update of LLaMA-7B's 224 layers (one chunk: 196), and 8 budgets hold about a
# third of its masks. On a CPU a read costs nothing and one budget keeps the working set smallest.
_CHUNK_STACKS = {"cpu": 1}
_CHUNK_STACKS_DEFAULT = 8


class _Stack:
    """Layers of one shape on one device, evolved together as ``(B, n_out, n_in)`` tensors."""

    def __init__(self, names: list[str], shape: tuple[int, int], device: torch.device, old: torch.Tensor):
        self.names, self.shape, self.device, self.old = names, shape, device, old
        self.mask = old
        self.nnz: list[int] = []
        self.target: list[int] = []
        self.decay: list[int] = []
        self.removed: list[int] = []
        self.regrown: list[int] = []
        self.grown: torch.Tensor | None = None
        self.returned: torch.Tensor | None = None
        self.cache: dict[tuple, torch.Tensor] = {}


def _by_stack_key(names: list[str], masks: Mapping[str, torch.Tensor], shapes) -> dict[tuple, list[str]]:
    """Layers by (shape, device), in order of first appearance."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault((shapes[name], masks[name].device), []).append(name)
    return groups


def _make_stacks(names: list[str], masks: Mapping[str, torch.Tensor], shapes) -> list[_Stack]:
    """Group layers by (shape, device), in order of first appearance; split groups larger than the budget."""
    stacks = []
    for (shape, device), members in _by_stack_key(names, masks, shapes).items():
        per = max(1, _stack_budget(device) // (shape[0] * shape[1]))
        pieces = math.ceil(len(members) / per)
        size = math.ceil(len(members) / pieces)
        for i in range(0, len(members), size):
            part = members[i : i + size]
            old = torch.stack([masks[name].to(torch.bool) for name in part])
            stacks.append(_Stack(part, shape, device, old))
    return stacks


def _stack_budget(device: torch.device) -> int:
    return _STACK_ENTRIES.get(device.type, _STACK_ENTRIES_DEFAULT)


def _chunk_budget(device: torch.device) -> int:
    return _CHUNK_STACKS.get(device.type, _CHUNK_STACKS_DEFAULT) * _stack_budget(device)


def _chunks(groups: list[list[str]], masks: Mapping[str, torch.Tensor], shapes) -> list[list[str]]:
    """Consecutive update groups, as few chunks as keep the entries of every (shape, device) of a chunk
    within the chunk budget, ``_CHUNK_STACKS`` stack budgets (a single group larger than that is a chunk of
    its own; :func:`_make_stacks` splits a chunk into stacks), evened out: the same number of chunks with the
    smallest even share of entries that still fits."""
    needs = []  # entries of every group, by (shape, device)
    for group in groups:
        need: dict[tuple, int] = {}
        for name in group:
            key = (shapes[name], masks[name].device)
            need[key] = need.get(key, 0) + shapes[name][0] * shapes[name][1]
        needs.append(need)
    fewest = _pack(groups, needs, lambda key: _chunk_budget(key[1]))
    totals: dict[tuple, int] = {}
    for need in needs:
        for key, n in need.items():
            totals[key] = totals.get(key, 0) + n
    even = _pack(groups, needs, lambda key: min(_chunk_budget(key[1]), -(-totals[key] // len(fewest))))
    return even if len(even) == len(fewest) else fewest


def _pack(groups: list[list[str]], needs: list[dict[tuple, int]], limit) -> list[list[str]]:
    """Consecutive groups packed greedily while every key's entries stay within ``limit(key)``."""
    chunks: list[list[str]] = []
    entries: dict[tuple, int] = {}  # of the last chunk
    for group, need in zip(groups, needs, strict=True):
        if chunks and all(entries.get(k, 0) + n <= limit(k) for k, n in need.items()):
            chunks[-1] += group
            entries = {k: entries.get(k, 0) + need.get(k, 0) for k in entries.keys() | need.keys()}
        else:
            chunks.append(list(group))
            entries = need
    return chunks


def _read_counts(stacks: list[_Stack], figure) -> dict[str, Any]:
    """``figure(stack)`` (one row per layer) for every stack, read back once per device, by layer name."""
    by_device: dict[torch.device, list[_Stack]] = {}
    for s in stacks:
        by_device.setdefault(s.device, []).append(s)
    out: dict[str, Any] = {}
    for members in by_device.values():
        values = host_values(torch.cat([figure(s) for s in members]))
        names = [name for s in members for name in s.names]
        out.update(zip(names, values, strict=True))
    return out


def _stack_of(
    tensors: Mapping[str, torch.Tensor] | None, s: _Stack, float_dtype: bool = False
) -> torch.Tensor:
    """The layers' tensors (weights or gradients) as one ``(B, n_out, n_in)`` stack on the stack's device.

    Built once per stack and update (removal reads the weights twice: decay scores, then removal scores).
    """
    key = (id(tensors), float_dtype)
    if key not in s.cache:
        parts = [tensors[name].detach().to(s.device) for name in s.names]
        if float_dtype:
            parts = [p.float() for p in parts]
        s.cache[key] = torch.stack(parts)
    return s.cache[key]


def _any_true(flags: list[torch.Tensor]) -> bool:
    """Whether any of the device bools is True, read back once per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    return any(any(host_values(torch.stack(group))) for group in by_device.values())


def _slot_rows(where, slot: Sequence[str], device: torch.device) -> tuple[torch.Tensor, bool]:
    """The masks of ``slot``'s layers (one per chain) as one stack on ``device``, and whether it is a copy.

    Layers evenly spaced in one stack on ``device`` (a chunk's blocks: q, k, v, o, q, ...) are a strided view
    of its mask, so chain removal clears their links in place; any other slot is a copy, to be written back.
    """
    s, first = where[slot[0]]
    rows = [where[name][1] for name in slot]
    stride = rows[1] - first if len(rows) > 1 else 1
    if (
        s.device == device
        and stride > 0
        and all(where[name][0] is s for name in slot)
        and rows == list(range(first, rows[-1] + 1, stride))
    ):
        return s.mask[first : rows[-1] + 1 : stride], False
    return torch.stack([where[name][0].mask[where[name][1]] for name in slot]).to(device), True


def _link_positions(mask: torch.Tensor, nnz: Sequence[int]) -> torch.Tensor:
    """``(B, max(nnz))``: the flat positions in the stack of every layer's links, ascending, padded with 0."""
    return row_positions(mask.view(mask.shape[0], -1), nnz)


def _keep_links(mask, link_pos, values, nnz, keep, mode, temperature, streams) -> torch.Tensor:
    """Keep ``keep[b]`` of the ``nnz[b]`` existing links of every layer, selected by score among the links.

    ``link_pos`` (:func:`_link_positions`) lists the links of each layer in ascending position order and
    ``values`` their scores (overwritten here); draw ``i`` of a layer's stream goes to its ``i``-th link, so
    a layer's selection depends on nothing but the layer and its stream.
    """
    rows = mask.shape[0]
    n = mask[0].numel()
    chosen = select_rows(
        values, keep, mode=mode, temperature=temperature, lengths=nnz, streams=streams, overwrite=True
    )
    picked = torch.where(chosen, link_pos, rows * n)
    return scatter_rows(rows, n, picked, mask.device).view(mask.shape)


def _ch_scores_stack(masks: torch.Tensor, variant: str, precision: str, nnz: Sequence[int]) -> torch.Tensor:
    """CH link-prediction scores of a ``(B, n_out, n_in)`` stack of masks.

    Off the CPU: batched GEMMs over the stack, no host read. On a CPU each layer goes through the kernels its
    density picks (neighbour lists at low density, int8 / fp32 GEMMs above), the density taken from the
    host-side link counts ``nnz``, so that no count is read back either.
    """
    if variant == "CH3_L3p":  # the path-based predictor scores one layer at a time
        from .topology.ch3_l3p import ch3_l3p_scores

        return torch.stack([ch3_l3p_scores(m) for m in masks.unbind(0)]).to(torch.float32)
    return ch_scores(masks, variant, precision=precision, nnz=[int(n) for n in nnz])
