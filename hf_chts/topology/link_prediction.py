"""Cannistraci-Hebb link prediction on one bipartite layer (ALGORITHM.md section 3).

For a mask ``M`` (n_out x n_in, ``M[a, j] = 1`` a link from input ``j`` to output ``a``) the node-based L3
predictors score every candidate position (``M = 0``) as

    S = G_r @ M + (G_c @ M.T).T

where ``C_r = M M^T`` and ``C_c = M^T M`` count common neighbours, ``E[x, y] = max(k[y] - C[x, y] - 1, 0)``
(where ``C[x, y] > 0``) counts the external local-community links of ``y``, and the node weight ``G`` is

- CH2-L3n: ``(C + [C > 0]) / (1 + E)``
- CH3-L3n: ``[C > 0] / (1 + E)``
- CH3.1-L3n: ``(C + [C > 0]) / (1 + E) ** (1 + E / (1 + E))``

:func:`ch_scores` never materialises ``C_r``, ``C_c`` or ``G`` whole. It walks over blocks of columns of
``C_r`` (then of ``C_c``), which equal blocks of rows since both are symmetric, turns each block into the
matching block of ``G^T`` and adds its product with ``M`` into ``S``; peak extra memory is one block
(~256 MB by default). Each product uses the fastest exact kernel for the device and density:

- common-neighbour counts are 0/1 products, exact in integer arithmetic: int8 x int8 -> int32
  (``torch._int_mm``, ~6x faster than an fp32 GEMM on CPU), fp32 GEMMs (exact for counts < 2**24, even
  with TF32 or bf16 inputs), or, at low density, sums of neighbour lists (``embedding_bag``) whose cost
  falls with the number of links;
- the products with ``G`` (fractions) stay in float32: a full-precision fp32 GEMM at high density, a
  gather-sum over the neighbour lists of ``M`` at low density.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_mask_2d, check_positive_int

__all__ = ["CH_METHODS", "CH_VARIANTS", "ch3_l3_reference", "ch_scores", "ch_scores_reference"]

CH_VARIANTS = ("CH2_L3n", "CH3_L3n", "CH3.1_L3n")
_VARIANT_KIND = {"CH2_L3n": "ch2", "CH3_L3n": "ch3", "CH3.1_L3n": "ch31", "CH3_1_L3n": "ch31"}
CH_METHODS = ("auto", "int8", "float", "sparse", "dense_reference")

# Peak extra memory of one block (bytes) when ``block_size`` is not given.
_BLOCK_BYTES = 256 * 2**20
# On CPU, below these densities the neighbour-list kernels beat the dense ones (measured on 11008 x 4096:
# embedding_bag sums cost ~ nnz * width, ~10x less efficient per operation than a GEMM, ~2x less than int8).
_SPARSE_COUNTS_BELOW = 0.03
_SPARSE_PRODUCTS_BELOW = 0.15


def ch_scores(
    mask: torch.Tensor,
    variant: str = "CH2_L3n",
    *,
    method: str = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """Cannistraci-Hebb L3n link-prediction scores of every position of a layer's mask.

    Args:
        mask (`torch.Tensor` of shape `(n_out, n_in)`): the current topology; nonzero / True is a link.
        variant (`str`, *optional*, defaults to `"CH2_L3n"`): ``"CH2_L3n"``, ``"CH3_L3n"`` or ``"CH3.1_L3n"``
            (``"CH3_1_L3n"`` is accepted too).
        method (`str`, *optional*, defaults to `"auto"`): the kernels. ``"int8"``: counts by int8 GEMMs,
            products by fp32 GEMMs; ``"float"``: fp32 GEMMs throughout; ``"sparse"``: neighbour-list sums
            throughout; ``"auto"``: on CPU neighbour lists for counts below 3% density and for products below
            15%, int8 / fp32 GEMMs above; fp32 GEMMs on other devices; ``"dense_reference"``:
            :func:`ch_scores_reference` (float64, everything materialised; small layers only). All are exact
            up to float32 rounding of the final sums.
        block_size (`int`, *optional*): rows of ``C_r`` / ``C_c`` per block; by default chosen so that one
            block's temporaries take ~256 MB.

    Returns:
        `torch.Tensor`: float32 scores of shape `(n_out, n_in)` on ``mask``'s device; 0.0 at existing links
        (only ``mask == 0`` positions are candidates).

    Example:
        >>> mask = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.2
        >>> scores = ch_scores(mask, "CH2_L3n")
        >>> bool((scores[mask] == 0).all())
        True
    """
    check_mask_2d(mask)
    kind = _variant_kind(variant)
    check_choice("method", method, CH_METHODS)
    if block_size is not None:
        check_positive_int(block_size, "block_size")
    if method == "dense_reference":
        return ch_scores_reference(mask, variant).to(torch.float32)
    with torch.no_grad():
        layer = _Layer(mask if mask.dtype == torch.bool else mask != 0)
        if layer.nnz == 0:
            return torch.zeros(layer.shape, dtype=torch.float32, device=layer.device)
        scores = torch.empty(layer.shape, dtype=torch.float32, device=layer.device)  # the row part fills it
        counts, products = _plan(method, layer)
        _add_row_part(scores, layer, kind, counts, products, block_size)
        _add_col_part(scores, layer, kind, counts, products, block_size)
        return scores.masked_fill_(layer.m, 0.0)


def ch_scores_reference(mask: torch.Tensor, variant: str = "CH2_L3n") -> torch.Tensor:
    """Dense float64 CH-L3n scores with every matrix of section 3 materialised (tests, small layers).

    Args:
        mask (`torch.Tensor` of shape `(n_out, n_in)`): nonzero / True is a link.
        variant (`str`, *optional*, defaults to `"CH2_L3n"`): as in :func:`ch_scores`.

    Returns:
        `torch.Tensor`: float64 scores of shape `(n_out, n_in)`, 0.0 at existing links.
    """
    check_mask_2d(mask)
    kind = _variant_kind(variant)
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


# ------------------------------------------------------------------------------------------ internals
def _variant_kind(variant: str) -> str:
    if variant not in _VARIANT_KIND:
        check_choice("CH variant", variant, CH_VARIANTS)
    return _VARIANT_KIND[variant]


class _Layer:
    """A mask with its degrees and, built on first use, the operand layouts the kernels need."""

    def __init__(self, m: torch.Tensor):
        self.m = m
        self.shape = tuple(m.shape)
        self.device = m.device
        self.k_row = m.sum(1, dtype=torch.int64).to(torch.float32)
        self.k_col = m.sum(0, dtype=torch.int64).to(torch.float32)
        self.nnz = int(self.k_row.sum())
        self.density = self.nnz / max(m.numel(), 1)

    @cached_property
    def m_f(self) -> torch.Tensor:
        return self.m.to(torch.float32)

    @cached_property
    def m_i8(self) -> torch.Tensor:
        return self.m.to(torch.int8)

    @cached_property
    def mt_i8(self) -> torch.Tensor:
        return self.m.t().to(torch.int8).contiguous()

    @cached_property
    def row_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Column indices of each row's links and each row's start (CSR of ``M``)."""
        return self._lists(self.m, self.k_row)

    @cached_property
    def col_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of each column's links and each column's start (CSR of ``M^T``)."""
        return self._lists(self.m.t().contiguous(), self.k_col)  # nonzero is ~5x slower on a strided view

    @staticmethod
    def _lists(m: torch.Tensor, degrees: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = m.nonzero()[:, 1].contiguous()  # row-major order: grouped by row, as the offsets expect
        ends = torch.cumsum(degrees.to(torch.int64), 0)
        return indices, ends - degrees.to(torch.int64)


def _plan(method: str, layer: _Layer) -> tuple[str, str]:
    """(kernel for the counts C, kernel for the products with G)."""
    if method == "auto":
        if layer.device.type != "cpu":
            return "float", "float"
        counts = "sparse" if layer.density < _SPARSE_COUNTS_BELOW else "int8"
        return counts, ("sparse" if layer.density < _SPARSE_PRODUCTS_BELOW else "float")
    if method == "int8":
        return "int8", "float"
    return method, method


def _block(block_size: int | None, temp_rows: int, other: int) -> int:
    if block_size is not None:
        return block_size
    # Per column of a block: counts (int32), weights and denominators (fp32), a bool mask: ~13-17 bytes per
    # temp row, plus the product's output and the gather table: ~8 bytes per row of the other side.
    return max(1, _BLOCK_BYTES // (17 * temp_rows + 8 * other))


def _add_row_part(scores, layer: _Layer, kind: str, counts: str, products: str, block_size) -> None:
    """scores += G_r @ M, one block of G_r's rows (= columns of the symmetric C_r) at a time."""
    n_out, n_in = layer.shape
    step = _block(block_size, n_out, n_in)
    for r0 in range(0, n_out, step):
        r1 = min(r0 + step, n_out)
        # c[b, a] = C_r[b, a] for a in the block: the block's G_r rows, transposed (n_out x block).
        if counts == "int8":
            c = _int8_matmul(layer.m_i8, layer.m_i8[r0:r1].t())
        elif counts == "sparse":
            table = layer.m[r0:r1].t().to(torch.float32).contiguous()
            c = _gather_sum(layer.row_lists, table)
        else:
            c = None
        if c is None:
            c = layer.m_f @ layer.m_f[r0:r1].t()
        g_t = _node_weights(c, layer.k_row[:, None], kind)  # g_t[b, a] = G_r[a, b]
        del c
        # The row part runs first, into the empty output: each block of rows is written exactly once.
        if products == "sparse":
            scores[r0:r1] = _gather_sum(layer.col_lists, g_t).t()
        else:
            with _ieee_fp32_matmul(layer.device):
                torch.mm(g_t.t(), layer.m_f, out=scores[r0:r1])
        del g_t


def _add_col_part(scores, layer: _Layer, kind: str, counts: str, products: str, block_size) -> None:
    """scores += (G_c @ M^T)^T, one block of G_c's rows (= columns of the symmetric C_c) at a time."""
    n_out, n_in = layer.shape
    step = _block(block_size, n_in, n_out)
    for c0 in range(0, n_in, step):
        c1 = min(c0 + step, n_in)
        # c[i, j] = C_c[i, j] for j in the block (n_in x block).
        if counts == "int8":
            c = _int8_matmul(layer.mt_i8, layer.mt_i8[c0:c1].t())
        elif counts == "sparse":
            table = layer.m[:, c0:c1].to(torch.float32).contiguous()
            c = _gather_sum(layer.col_lists, table)
        else:
            c = None
        if c is None:
            c = layer.m_f.t() @ layer.m_f[:, c0:c1]
        g_t = _node_weights(c, layer.k_col[:, None], kind)  # g_t[i, j] = G_c[j, i]
        del c
        if products == "sparse":
            scores[:, c0:c1] += _gather_sum(layer.row_lists, g_t)
        else:
            with _ieee_fp32_matmul(layer.device):
                scores[:, c0:c1].addmm_(layer.m_f, g_t)
        del g_t


def _node_weights(c: torch.Tensor, k: torch.Tensor, kind: str) -> torch.Tensor:
    """G^T (float32) from a block of common-neighbour counts ``c[y, x]`` and the degrees ``k[y]`` (a column).

    ``c`` (int32 or float32 holding exact integers) is consumed: it is overwritten in place.
    """
    absent = c == 0
    # 1 + E = 1 + max(k - C - 1, 0) = max(k - C, 1), in the counts' own exact dtype.
    denom = torch.sub(k.to(c.dtype), c).clamp_(min=1)
    if kind == "ch2":
        g = torch.div(c.add_(1), denom)  # true division: float32 even for int32 counts
    elif kind == "ch3":
        g = denom.reciprocal()
    else:  # ch31: (C + 1) / (1 + E) ** (1 + E / (1 + E)), and 1 + E / (1 + E) = 2 - 1 / (1 + E)
        denom = denom.to(torch.float32)
        g = denom.pow_(denom.reciprocal().sub_(2.0)).mul_(c.add_(1))
    return g.to(torch.float32).masked_fill_(absent, 0.0)


def _gather_sum(lists: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """``out[x] = sum of table[y] over y in list x``: a 0/1 sparse matrix times a dense one."""
    indices, offsets = lists
    return F.embedding_bag(indices, table, offsets, mode="sum")


# Device type -> whether torch._int_mm failed there even on padded operands (then fp32 GEMMs are used).
_INT_MM_UNSUPPORTED: set[str] = set()


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Exact int8 x int8 -> int32 product, or None where ``torch._int_mm`` is unavailable."""
    dev = a.device.type
    if dev in _INT_MM_UNSUPPORTED or not hasattr(torch, "_int_mm"):
        return None
    if 1 in a.shape or 1 in b.shape:
        # A size-1 dimension gives ambiguous strides (e.g. (1, 1) for a 1 x n operand), which the CPU kernel
        # of torch 2.x misreads (garbage output); fresh row-major copies are unambiguous and tiny here.
        a = torch.empty(a.shape, dtype=a.dtype, device=a.device).copy_(a)
        b = torch.empty(b.shape, dtype=b.dtype, device=b.device).copy_(b)
    try:
        return torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError):
        pass
    # Some builds (CUDA) want m > 16 and k, n multiples of 8, with b column-major: pad with zeros.
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = max(_round_up(m, 8), 32), _round_up(k, 8), _round_up(n, 8)
    a_pad = torch.zeros(pm, pk, dtype=torch.int8, device=a.device)
    a_pad[:m, :k] = a
    b_pad = torch.zeros(pn, pk, dtype=torch.int8, device=b.device)
    b_pad[:n, :k] = b.t()
    try:
        return torch._int_mm(a_pad, b_pad.t())[:m, :n]
    except (RuntimeError, NotImplementedError):
        _INT_MM_UNSUPPORTED.add(dev)
        return None


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


@contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Full-precision fp32 GEMMs for the products with G, whatever TF32 / bf16 setting the caller chose.

    Touches the global setting only when it is not already full precision, and restores it after.
    """
    backends = {
        "cuda": getattr(torch.backends.cuda, "matmul", None),
        "cpu": getattr(torch.backends.mkldnn, "matmul", None),
    }
    leaf = backends.get(device.type)
    if leaf is not None and hasattr(leaf, "fp32_precision"):  # torch >= 2.9 per-backend API
        previous = leaf.fp32_precision
        effective = previous if previous != "none" else getattr(torch.backends, "fp32_precision", "none")
        if effective in ("none", "ieee"):
            yield
            return
        leaf.fp32_precision = "ieee"
        try:
            yield
        finally:
            leaf.fp32_precision = previous
        return
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
