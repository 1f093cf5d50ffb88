"""Pure tensor functions for sparse topologies: initialisation, link prediction, sampling, removal,
regrowth, percolation and schedules. Each is testable alone and takes an explicit ``torch.Generator`` or a
counter-based stream key (:mod:`.rng`, the same draws on every device).

The phases of a topology update work on stacks of same-shape layers (:class:`~.stacks.LayerStack`, a single
layer is a stack of one): :func:`decay_prune`, :func:`remove_stack`, :func:`remove_chains`,
:func:`keep_back`, :func:`regrow_stack`; :func:`remove_links` and :func:`regrow_links` are one layer's."""

from .init import allocate_densities, init_mask
from .link_prediction import ch3_l3_reference, ch_scores, ch_scores_reference
from .percolation import LayerChain, LlamaBlockChain, active_neurons, chain_removal
from .regrowth import regrow_links, regrow_stack
from .removal import decay_prune, keep_back, remove_links, remove_stack
from .sampling import sample_without_replacement, select_rows, topk_indices
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
from .stacks import LayerStack, make_stacks, remove_chains

__all__ = [
    "ConstantDensity",
    "LayerStack",
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
    "decay_prune",
    "init_mask",
    "keep_back",
    "make_density_schedule",
    "make_stacks",
    "regrow_links",
    "regrow_stack",
    "remove_chains",
    "remove_links",
    "remove_stack",
    "removal_scores",
    "sample_without_replacement",
    "select_rows",
    "topk_indices",
]
