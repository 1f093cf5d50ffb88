"""Reference Cannistraci-Hebb predictors: dense float64 CH-L3n with every matrix materialised, and the
original path-based CH3-L3 (small layers only), against which :func:`~.link_prediction.ch_scores` is checked.
"""

from __future__ import annotations

import torch

from .._validation import check_choice, check_mask_2d

__all__ = ["L3N_VARIANTS", "ch3_l3_reference", "ch_scores_reference", "l3n_kind"]

# The node-based L3n predictors and the form of their node weights (docs/method.md section 3).
_L3N_KINDS = {"CH2_L3n": "ch2", "CH3_L3n": "ch3", "CH3.1_L3n": "ch31"}
L3N_VARIANTS = tuple(_L3N_KINDS)


def l3n_kind(variant: str) -> str:
    """The node-weight form (``"ch2"``, ``"ch3"``, ``"ch31"``) of an L3n variant; ``"CH3_1_L3n"`` is an
    alias of ``"CH3.1_L3n"``."""
    variant = "CH3.1_L3n" if variant == "CH3_1_L3n" else variant
    return _L3N_KINDS[check_choice("CH variant", variant, L3N_VARIANTS)]


def ch_scores_reference(mask: torch.Tensor, variant: str = "CH2_L3n") -> torch.Tensor:
    """Dense float64 CH-L3n scores with every matrix of section 3 materialised (tests, small layers).

    Args:
        mask (`torch.Tensor` of shape `(n_out, n_in)`): nonzero / True is a link.
        variant (`str`, *optional*, defaults to `"CH2_L3n"`): as in :func:`ch_scores`.

    Returns:
        `torch.Tensor`: float64 scores of shape `(n_out, n_in)`, 0.0 at existing links.
    """
    check_mask_2d(mask)
    kind = l3n_kind(variant)
    m = (mask != 0).to(torch.float64)
    k_row, k_col = m.sum(1), m.sum(0)

    def weights(c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        present = (c > 0).to(torch.float64)
        e = torch.clamp(k[None, :] - c - 1, min=0) * present
        if kind == "ch2":
            return (c + present) / (1 + e)
        if kind == "ch3":
            return present / (1 + e)
        return (c + present) / (1 + e) ** (1 + e / (1 + e))

    g_r = weights(m @ m.T, k_row)
    g_c = weights(m.T @ m, k_col)
    scores = g_r @ m + (g_c @ m.T).T
    return scores.masked_fill_(mask != 0, 0.0)


def ch3_l3_reference(mask: torch.Tensor) -> torch.Tensor:
    """The original path-based CH3-L3 (exact, slow: small layers only), to check the L3n approximation.

    For a candidate ``(a, j)`` (``M[a, j] = 0``) the paths of length 3 are ``a - j' - a' - j`` with ``j'`` an
    input neighbour of ``a``, ``a'`` an output neighbour of ``j`` and ``M[a', j'] = 1``. The intermediate
    nodes of all these paths form the local community of the candidate. For an intermediate node ``z``,
    ``e_z`` is its number of external local-community links: links to nodes that are neither in the
    community nor one of the two seeds ``a``, ``j``. The score is
    ``sum over paths of 1 / sqrt((1 + e_j') (1 + e_a'))``.

    Args:
        mask (`torch.Tensor` of shape `(n_out, n_in)`): nonzero / True is a link.

    Returns:
        `torch.Tensor`: float64 scores of shape `(n_out, n_in)`, 0.0 at existing links.
    """
    check_mask_2d(mask)
    m = (mask != 0).to(torch.float64).cpu()
    k_row, k_col = m.sum(1), m.sum(0)
    scores = torch.zeros(m.shape, dtype=torch.float64)
    for a in range(m.shape[0]):  # small layers only: vectorised over the candidates j of one output a
        inputs = m[a].nonzero().squeeze(1)  # the j' (input neighbours of a)
        if inputs.numel() == 0:
            continue
        # paths[j, a', j'] = M[a', j] * M[a', j'] for every candidate column j.
        paths = m.T[:, :, None] * m[None, :, inputs]
        inner_a = paths.sum(2)  # links of a' into the community (its j' on paths), per candidate j
        inner_j = paths.sum(1)  # links of j' into the community (its a' on paths)
        # Minus the inner links and the one link to the seed (a' - j, j' - a).
        e_a = (k_row[None, :] - inner_a - 1).clamp(min=0)
        e_j = (k_col[inputs][None, :] - inner_j - 1).clamp(min=0)
        weight = 1.0 / torch.sqrt((1 + e_a)[:, :, None] * (1 + e_j)[:, None, :])
        scores[a] = (paths * weight).sum((1, 2))
    return scores.masked_fill_(m.bool(), 0.0).to(mask.device)
