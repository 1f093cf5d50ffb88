"""CH3-L3p: the path-based Cannistraci-Hebb predictor of the original CHT, exact, grouped by middle node.

For a candidate ``(a, j)`` (``M[a, j] = 0``) of a layer mask ``M`` (``n_out x n_in``), every path of length 3
``a - j' - a' - j`` (``M[a, j'] = M[a', j'] = M[a', j] = 1``, ``a' != a``, ``j' != j``) contributes
``F[a, a'] * G[j, j']`` with ``F[a, a'] = 1 / sqrt(1 + e_a')``, ``e_a' = max(k_row[a'] - C_r[a, a'] - 1, 0)``
and ``G[j, j'] = 1 / sqrt(1 + e_j')``, ``e_j' = max(k_col[j'] - C_c[j, j'] - 1, 0)``: ``e`` counts the links
of an intermediate node that leave the candidate's local community (``C_r = M M^T``, ``C_c = M^T M``: common
neighbours, as in :mod:`hf_chts.topology.link_prediction`).

Grouping the paths by their middle output node ``a'`` turns the sum into small dense products: with
``N = N(a')`` the ``k`` inputs of ``a'``, the scores of the columns ``N`` gain
``(M[:, N] * F[:, a']) @ G[N, N]^T`` (``n_out x k``). Batches of middle nodes of similar degree go through one
batched matmul, so the cost is about ``n_out^2 * mean(k_row^2)`` multiply-adds plus the ``n_out^2`` and
``n_in^2`` common-neighbour tables: meant for MLP-scale layers (a 1000 x 1000 layer at 1% density scores in
well under a second on one CPU core). :func:`hf_chts.topology.link_prediction.ch3_l3_reference` is the slow
reference it is tested against.
"""

from __future__ import annotations

import torch

from .._validation import check_mask_2d

__all__ = ["CH3_L3P", "ch3_l3p_scores"]

# The name of this predictor among the CH variants (:data:`~.link_prediction.CH_VARIANTS`).
CH3_L3P = "CH3_L3p"

# Entries of one batch's (middle nodes x n_out x k) operand.
_BATCH_ENTRIES = 1 << 22


def _community_weights(m: torch.Tensor) -> torch.Tensor:
    """``W[x, y] = 1 / sqrt(1 + max(k[y] - C[x, y] - 1, 0))`` for the rows of ``m``, 0 on the diagonal.

    ``C = m m^T`` counts common neighbours (exact in float32 below 2**24).
    """
    common = m @ m.T
    degree = m.sum(1)
    weights = (1.0 + (degree[None, :] - common - 1.0).clamp_(min=0.0)).rsqrt_()
    weights.fill_diagonal_(0.0)
    return weights


@torch.no_grad()
def ch3_l3p_scores(mask: torch.Tensor) -> torch.Tensor:
    """CH3-L3p link-prediction scores of every position of a layer's mask (exact up to float32 rounding).

    Args:
        mask (`torch.Tensor` of shape `(n_out, n_in)`): the current topology; nonzero / True is a link.

    Returns:
        `torch.Tensor`: float32 scores of shape `(n_out, n_in)` on ``mask``'s device, 0.0 at existing links.

    Example:
        >>> mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
        >>> ch3_l3p_scores(mask)
        tensor([[0., 0., 1.],
                [1., 0., 0.],
                [0., 1., 0.]])
    """
    check_mask_2d(mask)
    m = mask != 0
    n_out, n_in = m.shape
    device = m.device
    m_f = m.to(torch.float32)
    # scores_t[j, a] (transposed, plus one spare row that absorbs the padding of the batches)
    scores_t = torch.zeros(n_in + 1, n_out, dtype=torch.float32, device=device)
    k_row = m.sum(1)
    if int(k_row.sum()) == 0:
        return scores_t[:n_in].T.contiguous()
    f = _community_weights(m_f)  # f[a, a'], indexed by (candidate row, middle row)
    g = _community_weights(m_f.T)  # g[j, j'], indexed by (candidate column, middle column)
    # Middle nodes with at least 2 inputs (a path needs j' != j), by degree so that a batch pads little.
    middles = torch.nonzero(k_row >= 2).squeeze(1)
    middles = middles[torch.argsort(k_row[middles], stable=True)]
    # Column lists of every row, padded with the spare index n_in.
    rank = torch.cumsum(m.to(torch.int64), 1) - 1
    k_max_all = int(k_row.max())
    lists = torch.full((n_out, k_max_all), n_in, dtype=torch.int64, device=device)
    rows, cols = m.nonzero(as_tuple=True)
    lists[rows, rank[rows, cols]] = cols
    m_pad_t = torch.cat([m_f.T, torch.zeros(1, n_out, device=device)], 0)  # (n_in + 1, n_out)
    g_pad = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float32, device=device)
    g_pad[:n_in, :n_in] = g
    start = 0
    degrees = k_row[middles].tolist()
    while start < len(degrees):
        size = max(1, _BATCH_ENTRIES // (n_out * degrees[start]))
        size = max(1, _BATCH_ENTRIES // (n_out * degrees[min(start + size, len(degrees)) - 1]))
        batch = middles[start : start + size]
        k = int(k_row[batch].max())
        idx = lists[batch, :k]  # (B, k) inputs of each middle node, padded with n_in
        # operand[b, c, a] = M[a, idx[b, c]] * F[a, middle b]
        operand = m_pad_t[idx] * f[:, batch].T[:, None, :]
        block = g_pad[idx[:, :, None], idx[:, None, :]]  # (B, k, k): G[idx[b, c], idx[b, c']]
        gained = torch.bmm(block, operand)  # (B, k, n_out): column idx[b, c], row a
        scores_t.index_add_(0, idx.reshape(-1), gained.reshape(-1, n_out))
        start += size
    scores = scores_t[:n_in].T.contiguous()
    return scores.masked_fill_(m, 0.0)
