"""The initial masks of a set of sparse layers, and the per-layer densities they share with the engine.

``density`` is spread over the layers by ``density_distribution`` (each layer's *final* density); every
other global density (``initial_density``, a decaying target) scales each layer's alike.
:func:`initial_masks` is the one place masks are drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._validation import check_shape_2d, link_count
from .config import SparseTrainingConfig
from .topology.csti import abs_correlation, load_calibration_inputs
from .topology.init import allocate_densities, init_mask
from .topology.rng import stream_key
from .topology.schedules import EMSDensity

__all__ = ["final_densities", "init_params", "initial_masks", "scaled_density", "step0_density"]


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


def final_densities(config: SparseTrainingConfig, shapes: Mapping[str, tuple[int, int]]) -> dict[str, float]:
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


def scaled_density(final_density: float, config: SparseTrainingConfig, density: float) -> float:
    """A layer's density when the global target is ``density`` (ERK layers scale alike, capped at 1)."""
    return min(1.0, final_density * density / config.density)


def step0_density(final_density: float, config: SparseTrainingConfig) -> float:
    """A layer's density before the first update: ``initial_density`` scaled, or EM_S's first extra links."""
    if config.density_schedule == "em_s":
        return min(1.0, final_density + EMSDensity.__dataclass_fields__["first_extra"].default)
    return scaled_density(final_density, config, config.initial_density)


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
    final = final_densities(config, shapes)
    params = init_params(config, csti_inputs)
    masks = {}
    for name, shape in shapes.items():
        density = step0_density(final[name], config)
        # A counter-based stream key, not a device generator: the same masks on every device.
        if generator is not None:
            source = {"generator": generator}
        else:
            source = {"key": stream_key(config.seed, "init", name)}
        masks[name] = init_mask(shape, density, config.init, device=device, **source, **params)
    return masks
