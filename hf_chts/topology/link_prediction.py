"""Cannistraci-Hebb link prediction on one bipartite layer (docs/method.md section 3).

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
(~256 MB on CPU; on a GPU a quarter of the free device memory). A stack of same-shape masks
``(B, n_out, n_in)`` is scored at once (batched GEMMs on a GPU). Each product uses the fastest exact kernel
for the device and density:

- common-neighbour counts are 0/1 products, exact in integer arithmetic: int8 x int8 -> int32
  (``torch._int_mm``, ~6x faster than an fp32 GEMM on CPU), fp32 GEMMs (exact for counts < 2**24, even
  with TF32 or bf16 inputs), or, at low density, sums of neighbour lists (``embedding_bag``) whose cost
  falls with the number of links;
- the products with ``G`` (fractions) stay in float32: a full-precision fp32 GEMM at high density, a
  gather-sum over the neighbour lists of ``M`` at low density;
- on a GPU (``method="dense"``, the default there) counts are bf16 GEMMs with fp32 output (exact) and each
  product with ``G`` is three bf16 GEMMs over the split ``G = G_hi + G_mid + G_lo`` (each part exactly
  bf16, their sum ``G`` to float32 precision), accumulated in fp32: float32 accuracy at bf16 speed, with
  no host synchronisation and kernels chosen by device and dtype only. The node weights go from a block of
  counts to the GEMM operands in one fused, self-checked kernel (docs/DESIGN.md, Fused kernels).

``precision`` trades accuracy of the products with ``G`` for speed: ``"tf32"`` rounds ``G`` to 10 mantissa
bits (one TF32 GEMM on a GPU), ``"bf16"`` to 8 bits (one bf16 GEMM). Counts stay exact. The score error and
the agreement of the top-k regrown links are measured in docs/PRECISION.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_positive_int
from ._fused import FusedFunction
from .ch3_l3p import CH3_L3P, ch3_l3p_scores
from .ch_reference import L3N_VARIANTS, ch3_l3_reference, ch_scores_reference, l3n_kind

__all__ = [
    "CH_METHODS",
    "CH_PRECISIONS",
    "CH_VARIANTS",
    "ch3_l3_reference",
    "ch_scores",
    "ch_scores_reference",
]

# Every CH link predictor: the node-based L3n variants scored here, then the path-based CH3-L3p.
CH_VARIANTS = (*L3N_VARIANTS, CH3_L3P)
CH_METHODS = ("auto", "dense", "int8", "float", "sparse", "dense_reference")
CH_PRECISIONS = ("exact", "tf32", "bf16")

# Peak extra memory of one block (bytes) on CPU when ``block_size`` is not given; on other devices a
# fraction of the free device memory (the caching allocator's free blocks included).
_BLOCK_BYTES = 256 * 2**20
_DEVICE_MEMORY_FRACTION = 0.25
# On CPU, below these densities the neighbour-list kernels beat the dense ones (measured on 11008 x 4096:
# embedding_bag sums cost ~ nnz * width, ~10x less efficient per operation than a GEMM, ~2x less than int8).
_SPARSE_COUNTS_BELOW = 0.03
_SPARSE_PRODUCTS_BELOW = 0.15


def ch_scores(
    mask: torch.Tensor,
    variant: str = "CH2_L3n",
    *,
    method: str = "auto",
    precision: str = "exact",
    block_size: int | None = None,
    nnz: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Cannistraci-Hebb L3n link-prediction scores of every position of a layer's mask (or of a stack).

    Args:
        mask (`torch.Tensor` of shape `(n_out, n_in)` or `(B, n_out, n_in)`): the current topology; nonzero /
            True is a link. A 3-D stack scores B same-shape layers at once, each on its own.
        variant (`str`, *optional*, defaults to `"CH2_L3n"`): one of :data:`CH_VARIANTS`: ``"CH2_L3n"``,
            ``"CH3_L3n"``, ``"CH3.1_L3n"`` (``"CH3_1_L3n"`` is accepted too), or ``"CH3_L3p"``
            (:func:`~.ch3_l3p.ch3_l3p_scores`, one layer at a time; the other arguments do not apply).
        method (`str`, *optional*, defaults to `"auto"`): the kernels. ``"dense"``: batched GEMMs over the
            whole stack, exact bf16 counts where the device has bf16 GEMMs with fp32 output (CUDA), fp32
            GEMMs elsewhere; ``"int8"``: counts by int8 GEMMs, products by fp32 GEMMs; ``"float"``: fp32
            GEMMs throughout; ``"sparse"``: neighbour-list sums throughout; ``"auto"``: on CPU neighbour lists
            for counts below 3% density and for products below 15%, int8 / fp32 GEMMs above; ``"dense"`` on
            other devices (chosen without reading the mask: no host synchronisation);
            ``"dense_reference"``: :func:`ch_scores_reference` (float64, everything materialised; small
            layers only). With ``precision="exact"`` all are exact up to float32 rounding of the sums.
        precision (`str`, *optional*, defaults to `"exact"`): precision of the products with the node weights
            ``G``: ``"exact"`` (float32), ``"tf32"`` (``G`` rounded to TF32's 10 mantissa bits) or
            ``"bf16"`` (8 bits). Counts are exact in all. On CPU the reduced precisions give the same
            rounding of ``G`` but no speed-up. Ignored by ``"dense_reference"``.
        block_size (`int`, *optional*): rows of ``C_r`` / ``C_c`` per block; by default chosen so that one
            block's temporaries take ~256 MB on CPU, a quarter of the free memory on other devices.
        nnz (`int` or `Sequence[int]`, *optional*): the number of links of the mask (one per layer of a
            stack), when the caller already knows it. ``"auto"`` on CPU picks each layer's kernels by its
            density; with ``nnz`` it reads no count back from the mask. A wrong count changes only which
            (exact) kernels run, never what they compute beyond float32 rounding.

    Returns:
        `torch.Tensor`: float32 scores of ``mask``'s shape on its device; 0.0 at existing links (only
        ``mask == 0`` positions are candidates).

    Example:
        >>> mask = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.2
        >>> scores = ch_scores(mask, "CH2_L3n")
        >>> bool((scores[mask] == 0).all())
        True
        >>> stack = torch.stack([mask, ~mask])  # two layers of one shape, scored together
        >>> torch.equal(ch_scores(stack)[0], scores)
        True
    """
    _check_mask(mask)
    if variant == CH3_L3P:  # the path-based predictor scores one layer at a time
        if mask.dim() == 2:
            return ch3_l3p_scores(mask).to(torch.float32)
        return torch.stack([ch3_l3p_scores(m) for m in mask.unbind(0)]).to(torch.float32)
    kind = l3n_kind(variant)
    check_choice("method", method, CH_METHODS)
    check_choice("ch_precision", precision, CH_PRECISIONS)
    if block_size is not None:
        check_positive_int(block_size, "block_size")
    counts = _check_nnz(nnz, mask)
    if method == "dense_reference":
        if mask.dim() == 3:
            return torch.stack([ch_scores_reference(m, variant) for m in mask]).to(torch.float32)
        return ch_scores_reference(mask, variant).to(torch.float32)
    with torch.no_grad():
        m = mask if mask.dtype == torch.bool else mask != 0
        if method == "auto" and m.device.type != "cpu":
            method = "dense"
        if method == "dense":
            stack = m if m.dim() == 3 else m[None]
            scores = _dense_stack(stack, kind, precision, block_size)
            return scores if m.dim() == 3 else scores[0]
        out = torch.empty(m.shape, dtype=torch.float32, device=m.device)
        if m.dim() == 2:
            return _layer_scores(out, m, kind, method, precision, block_size, counts[0])
        for index in range(m.shape[0]):  # per-layer kernels (CPU: each layer's density picks them)
            _layer_scores(out[index], m[index], kind, method, precision, block_size, counts[index])
        return out


def _check_nnz(nnz, mask: torch.Tensor) -> list[int | None]:
    """One link count (or None: unknown) per layer of ``mask``."""
    layers = mask.shape[0] if mask.dim() == 3 else 1
    if nnz is None:
        return [None] * layers
    values = [nnz] if isinstance(nnz, int) and mask.dim() == 2 else nnz
    per_layer = mask[0].numel() if mask.dim() == 3 else mask.numel()
    if (
        not isinstance(values, (list, tuple))
        or len(values) != layers
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= per_layer for v in values)
    ):
        raise ValueError(
            f"`nnz` must give the number of links of the mask ({layers} int(s) in [0, {per_layer}], a list "
            f"for a stack), got {nnz!r}; or leave it None."
        )
    return list(values)


def _layer_scores(out, m: torch.Tensor, kind, method, precision, block_size, nnz) -> torch.Tensor:
    """Scores of one layer's bool mask ``m``, written into ``out`` (float32, ``m``'s shape)."""
    layer = _Layer(m, nnz)
    if layer.device.type == "cpu" and layer.nnz == 0:  # (reading nnz is free on CPU)
        return out.zero_()
    counts, products = _plan(method, layer)
    _add_row_part(out, layer, kind, counts, products, precision, block_size)  # fills every row of ``out``
    _add_col_part(out, layer, kind, counts, products, precision, block_size)
    return out.masked_fill_(layer.m, 0.0)


# ------------------------------------------------------------------------------------------ internals
def _check_mask(mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"`mask` must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.dim() not in (2, 3):
        raise ValueError(
            f"`mask` must be 2-D (n_out x n_in) or a 3-D stack (B x n_out x n_in) of same-shape layers, "
            f"got shape {tuple(mask.shape)}."
        )


class _Layer:
    """A mask with its degrees and, built on first use, the operand layouts the kernels need."""

    def __init__(self, m: torch.Tensor, nnz: int | None = None):
        self.m = m
        if nnz is not None:
            self.__dict__["nnz"] = nnz  # known to the caller: the CPU plan reads nothing back
        self.shape = tuple(m.shape)
        self.device = m.device
        self.k_row = m.sum(1, dtype=torch.int64).to(torch.float32)
        self.k_col = m.sum(0, dtype=torch.int64).to(torch.float32)

    @cached_property
    def nnz(self) -> int:
        return int(self.k_row.sum())  # a host read: used by the CPU plan only

    @cached_property
    def density(self) -> float:
        return self.nnz / max(self.m.numel(), 1)

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


def _block(block_size: int | None, temp_rows: int, other: int, device: torch.device, batch: int = 1) -> int:
    if block_size is not None:
        return block_size
    # Per column of a block: counts (int32), weights and denominators (fp32), a bool mask, bf16 splits:
    # ~17-23 bytes per temp row, plus the product's output and the gather table: ~8 bytes per row of the
    # other side.
    return max(1, _block_bytes(device) // (batch * (23 * temp_rows + 8 * other)))


def _block_bytes(device: torch.device) -> int:
    """Memory for one block's temporaries: 256 MB on CPU, a share of what is free on an accelerator."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # a driver query, not a stream synchronisation
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(_BLOCK_BYTES // 4, int(_DEVICE_MEMORY_FRACTION * (free + cached)))
    return _BLOCK_BYTES


def _add_row_part(scores, layer: _Layer, kind: str, counts: str, products: str, precision, block_size):
    """scores += G_r @ M, one block of G_r's rows (= columns of the symmetric C_r) at a time."""
    n_out, n_in = layer.shape
    step = _block(block_size, n_out, n_in, layer.device)
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
        g_t = _round_weights(_node_weights(c, layer.k_row[:, None], kind), precision)  # G_r[a, b]
        del c
        # The row part runs first, into the empty output: each block of rows is written exactly once.
        if products == "sparse":
            scores[r0:r1] = _gather_sum(layer.col_lists, g_t).t()
        else:
            with _ieee_fp32_matmul(layer.device):
                torch.mm(g_t.t(), layer.m_f, out=scores[r0:r1])
        del g_t


def _add_col_part(scores, layer: _Layer, kind: str, counts: str, products: str, precision, block_size):
    """scores += (G_c @ M^T)^T, one block of G_c's rows (= columns of the symmetric C_c) at a time."""
    n_out, n_in = layer.shape
    step = _block(block_size, n_in, n_out, layer.device)
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
        g_t = _round_weights(_node_weights(c, layer.k_col[:, None], kind), precision)  # G_c[j, i]
        del c
        if products == "sparse":
            scores[:, c0:c1] += _gather_sum(layer.row_lists, g_t)
        else:
            with _ieee_fp32_matmul(layer.device):
                scores[:, c0:c1].addmm_(layer.m_f, g_t)
        del g_t


def _dense_stack(m: torch.Tensor, kind: str, precision: str, block_size: int | None) -> torch.Tensor:
    """Scores of a stack ``(B, n_out, n_in)`` of bool masks by batched GEMMs, with no host synchronisation.

    Counts: bf16 0/1 operands with fp32 output where the device has it (exact: every product is 0 or 1 and
    fp32 sums are exact below 2**24), else fp32 GEMMs (exact likewise, even with TF32). Products with G:
    by ``precision`` (:func:`_weights_matmul`).
    """
    batch, n_out, n_in = m.shape
    dev = m.device
    bf16 = _has_bf16_fp32_matmul(dev)
    m_counts = m.to(torch.bfloat16 if bf16 else torch.float32)
    m_products = m.to(torch.float32) if bf16 and precision == "tf32" else m_counts
    weight_parts = _WEIGHT_PARTS[_parts_kind(precision, bf16)]
    # Degrees (B, n, 1), converted last: fresh tensors, not views (the fused kernel's guards stay simple).
    k_row = m.sum(2, dtype=torch.int32)[:, :, None].to(torch.float32)
    k_col = m.sum(1, dtype=torch.int32)[:, :, None].to(torch.float32)
    scores = torch.empty(m.shape, dtype=torch.float32, device=dev)
    step = _block(block_size, n_out, n_in, dev, batch)
    for r0 in range(0, n_out, step):
        r1 = min(r0 + step, n_out)
        # c[b, x, a] = C_r[x, a] for a in the block; the parts of g_t[b, x, a] = G_r[a, x].
        c = _count_matmul(m_counts, m_counts[:, r0:r1].transpose(1, 2))
        parts = weight_parts(c, k_row, kind)
        del c
        left = [p.transpose(1, 2) for p in parts]
        scores[:, r0:r1] = _weights_matmul(left, m_products, precision, left=True)
        del parts, left
    step = _block(block_size, n_in, n_out, dev, batch)
    for c0 in range(0, n_in, step):
        c1 = min(c0 + step, n_in)
        # c[b, i, j] = C_c[i, j] for j in the block; the parts of g_t[b, i, j] = G_c[j, i].
        c = _count_matmul(m_counts.transpose(1, 2), m_counts[:, :, c0:c1])
        parts = weight_parts(c, k_col, kind)
        del c
        scores[:, :, c0:c1] += _weights_matmul(parts, m_products, precision, left=False)
        del parts
    return scores.masked_fill_(m, 0.0)


def _parts_kind(precision: str, bf16: bool) -> str:
    """How the node weights enter the GEMMs: three bf16 parts (``"exact"``) or one (``"bf16"``) where
    the device has bf16 GEMMs with fp32 output, else float32 (``"tf32"`` everywhere)."""
    if bf16 and precision != "tf32":
        return "split" if precision == "exact" else "bf16"
    return "fp32"


# Device types whose bf16 GEMMs give fp32 output (``out_dtype``): probed once per device type.
_BF16_FP32_MATMUL: dict[str, bool] = {}


def _has_bf16_fp32_matmul(device: torch.device) -> bool:
    if device.type not in _BF16_FP32_MATMUL:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(1, 16, 16, dtype=torch.bfloat16, device=device)
                ok = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _BF16_FP32_MATMUL[device.type] = ok
    return _BF16_FP32_MATMUL[device.type]


def _count_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact fp32 common-neighbour counts from 0/1 operands (bf16 with fp32 output, or fp32)."""
    if a.dtype == torch.bfloat16:
        return torch.bmm(a, b, out_dtype=torch.float32)
    if a.device.type == "cuda":
        with _fp32_matmul(a.device, "tf32"):  # 0/1 operands are exact in TF32: only the speed changes
            return torch.bmm(a, b)
    return torch.bmm(a, b)  # exact under any fp32 matmul setting (0/1 inputs, fp32 accumulation)


def _weights_matmul(parts, other, precision: str, *, left: bool) -> torch.Tensor:
    """fp32 batched product of node weights (``parts``, from :data:`_WEIGHT_PARTS`) and a 0/1 mask
    ``other``, the weights on the left if ``left``, at ``precision``.

    bf16 parts (bf16 GEMMs with fp32 output): the sum of their products, float32 accuracy for the three
    parts of ``"exact"`` (:func:`_split_bf16`), bf16 for the one part of ``"bf16"``. float32 weights:
    ``"tf32"`` is one TF32 GEMM on CUDA; elsewhere IEEE fp32 GEMMs on the weights rounded as ``precision``
    says.
    """

    def matmul(w: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.bmm(w, other, **kwargs) if left else torch.bmm(other, w, **kwargs)

    if parts[0].dtype == torch.bfloat16:
        out = None
        for part in parts:
            prod = matmul(part, out_dtype=torch.float32)
            out = prod if out is None else out.add_(prod)
        return out
    (w,) = parts
    if precision == "tf32" and w.device.type == "cuda":
        with _fp32_matmul(w.device, "tf32"):
            return matmul(w)
    w = _round_weights(w, precision)
    with _fp32_matmul(w.device, "ieee"):
        return matmul(w)


def _split_bf16(w: torch.Tensor) -> list[torch.Tensor]:
    """Three bf16 tensors whose fp32 sum is ``w`` to float32 precision (each residual is exact in fp32)."""
    hi = w.to(torch.bfloat16)
    rest = w - hi.to(torch.float32)
    mid = rest.to(torch.bfloat16)
    lo = rest.sub_(mid.to(torch.float32)).to(torch.bfloat16)
    return [hi, mid, lo]


def _round_weights(g: torch.Tensor, precision: str) -> torch.Tensor:
    """Round float32 node weights as a GEMM of ``precision`` would read them (round to nearest even)."""
    if precision == "exact":
        return g
    if precision == "bf16":
        return g.to(torch.bfloat16).to(torch.float32)
    bits = g.contiguous().view(torch.int32)  # tf32: keep 10 of the 23 mantissa bits
    odd = bits.bitwise_right_shift(13).bitwise_and_(1)
    return bits.add(0xFFF).add_(odd).bitwise_and_(~0x1FFF).view(torch.float32)


def _node_weights(c: torch.Tensor, k: torch.Tensor, kind: str) -> torch.Tensor:
    """G^T (float32) from a block of common-neighbour counts ``c[y, x]`` and the degrees ``k[y]`` (a column).

    ``c`` is int32 or float32 holding exact integers; it is not modified (the function is pure, so it also
    runs as part of a fused kernel: :data:`_WEIGHT_PARTS`).
    """
    absent = c == 0
    # 1 + E = 1 + max(k - C - 1, 0) = max(k - C, 1), in the counts' own exact dtype.
    denom = torch.sub(k.to(c.dtype), c).clamp_(min=1)
    if kind == "ch2":
        g = torch.div(c + 1, denom)  # true division: float32 even for int32 counts
    elif kind == "ch3":
        g = denom.reciprocal()
    else:  # ch31: (C + 1) / (1 + E) ** (1 + E / (1 + E)), and 1 + E / (1 + E) = 2 - 1 / (1 + E)
        denom = denom.to(torch.float32)
        g = denom.pow(denom.reciprocal().sub_(2.0)).mul_(c + 1)
    return g.to(torch.float32).masked_fill_(absent, 0.0)


def _weights_fp32(c: torch.Tensor, k: torch.Tensor, kind: str) -> tuple[torch.Tensor]:
    """The node weights as one float32 tensor."""
    return (_node_weights(c, k, kind),)


def _weights_bf16(c: torch.Tensor, k: torch.Tensor, kind: str) -> tuple[torch.Tensor]:
    """The node weights rounded to one bf16 tensor (``precision="bf16"`` with bf16 GEMMs)."""
    return (_node_weights(c, k, kind).to(torch.bfloat16),)


def _weights_split(c: torch.Tensor, k: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
    """The node weights as three bf16 parts summing to them (``precision="exact"`` with bf16 GEMMs)."""
    return tuple(_split_bf16(_node_weights(c, k, kind)))


def _weights_compare(tolerance: float):
    """A check of compiled node weights against eager ones: same dtypes and shapes, the parts' sums equal
    within ``tolerance`` relative (exact zeros stay exact)."""

    def compare(actual, expected) -> str | None:
        if [(p.dtype, p.shape) for p in actual] != [(p.dtype, p.shape) for p in expected]:
            return "output dtypes or shapes differ from the eager result"
        a, e = sum(p.double() for p in actual), sum(p.double() for p in expected)
        if not bool(((a - e).abs() <= tolerance * e.abs()).all()):
            return f"node weights differ from the eager ones by more than {tolerance:.1e} relative"
        return None

    return compare


# Node weights straight from a block of counts to the GEMM operands, one kernel on a GPU: ``c`` read once,
# the parts written once (hf_chts.topology._fused; on first use checked against the eager function: the
# sums of the parts within 8 float32 ulps, one bf16 ulp for the single bf16 part, since a compiled pow or
# division may round differently by an ulp).
_WEIGHT_PARTS = {
    "fp32": FusedFunction(_weights_fp32, compare=_weights_compare(2.0**-20)),
    "bf16": FusedFunction(_weights_bf16, compare=_weights_compare(2.0**-7)),
    "split": FusedFunction(_weights_split, compare=_weights_compare(2.0**-20)),
}


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


def _ieee_fp32_matmul(device: torch.device):
    """Full-precision fp32 GEMMs for the products with G, whatever TF32 / bf16 setting the caller chose."""
    return _fp32_matmul(device, "ieee")


@contextmanager
def _fp32_matmul(device: torch.device, precision: str) -> Iterator[None]:
    """fp32 GEMMs at ``precision`` (``"ieee"`` or ``"tf32"``) inside the block, whatever the caller chose.

    Touches the global setting only when it differs, and restores it after.
    """
    backends = {
        "cuda": getattr(torch.backends.cuda, "matmul", None),
        "cpu": getattr(torch.backends.mkldnn, "matmul", None),
    }
    leaf = backends.get(device.type)
    if leaf is not None and hasattr(leaf, "fp32_precision"):  # torch >= 2.9 per-backend API
        previous = leaf.fp32_precision
        effective = previous if previous != "none" else getattr(torch.backends, "fp32_precision", "none")
        if effective == precision or (precision == "ieee" and effective == "none"):
            yield
            return
        leaf.fp32_precision = precision
        try:
            yield
        finally:
            leaf.fp32_precision = previous
        return
    wanted = "highest" if precision == "ieee" else "high"
    previous = torch.get_float32_matmul_precision()
    if previous == wanted:
        yield
        return
    torch.set_float32_matmul_precision(wanted)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
