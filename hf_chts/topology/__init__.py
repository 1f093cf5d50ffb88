"""Pure tensor functions for sparse topologies: initialisation, link prediction, sampling, removal,
regrowth, percolation and schedules. Each is testable alone and takes an explicit ``torch.Generator`` or a
counter-based stream key (:mod:`.rng`, the same draws on every device)."""

from .init import allocate_densities, init_mask
from .link_prediction import ch3_l3_reference, ch_scores, ch_scores_reference
from .percolation import LayerChain, LlamaBlockChain, active_neurons, chain_removal
from .regrowth import regrow_links
from .removal import remove_links
from .sampling import sample_without_replacement, topk_indices
from .schedules import (
    ConstantDensity,
    CubicDensityDecay,
    DropFraction,
    LinearDensityDecay,
    SigmoidDensityDecay,
    Temperature,
    make_density_schedule,
)
from .scores import removal_scores

__all__ = [
    "ConstantDensity",
    "CubicDensityDecay",
    "DropFraction",
    "LayerChain",
    "LinearDensityDecay",
    "LlamaBlockChain",
    "SigmoidDensityDecay",
    "Temperature",
    "active_neurons",
    "allocate_densities",
    "ch3_l3_reference",
    "ch_scores",
    "ch_scores_reference",
    "chain_removal",
    "init_mask",
    "make_density_schedule",
    "regrow_links",
    "remove_links",
    "removal_scores",
    "sample_without_replacement",
    "topk_indices",
]
