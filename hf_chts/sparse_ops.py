"""Sparse products of a linear layer whose weight lives only at its links.

A sparse layer ``y = x @ W.T + b`` with a ``(out, in)`` boolean mask stores the weight as a vector of its
link values, in row-major order of the links (the order of ``mask.nonzero()``). :class:`LinkIndex` holds the
index structures of one mask: the CSR rows and columns of ``W`` and of ``W.T`` and the flat positions of the
links. It is rebuilt at each topology update (one host read, for the number of links), never during a step.

:func:`sparse_linear` is the autograd function of the layer:

- forward: ``y.T = W @ x.T`` (a CSR x dense product), plus the bias;
- input gradient: ``dx.T = W.T @ dy.T`` (the CSR of ``W.T``, its values a gather of the link values);
- weight gradient only at the links: ``dW[i, j] = dy[:, i] . x[:, j]`` for every link ``(i, j)`` (a sampled
  dense x dense product), so the gradient, like the values and the optimizer state, has one entry per link.

The layer's activations come out in the transposed layout the next sparse product reads (``y`` is a
column-major view of ``y.T``), so a chain of sparse layers moves no data between them.
Nothing here knows about modules, masks buffers or optimizers: :mod:`hf_chts.masking` builds on it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "COMPUTE_MODES",
    "LinkIndex",
    "dense_from_links",
    "link_values",
    "links_kept_from",
    "sparse_linear",
]

# torch warns once per process that its sparse CSR support is in beta; the products used here are the stable
# core (CSR x dense and the sampled dense x dense), so the warning would only be noise in a user's log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


# How a sparse layer computes (SparseTrainingConfig.compute): these kernels, dense products on the masked
# weight, or per layer whichever is faster (hf_chts.masking.compute decides).
COMPUTE_MODES = ("auto", "sparse", "dense")


@dataclass(frozen=True)
class LinkIndex:
    """Index structures of one ``(out, in)`` mask: the layer's links in row-major order.

    Attributes:
        shape (`tuple[int, int]`): ``(out, in)`` of the weight.
        nnz (`int`): number of links.
        flat (`torch.LongTensor` of shape `(nnz,)`): ``row * in + col`` of every link, increasing.
        crow, col (`torch.Tensor`): CSR row pointers and column indices of ``W`` (links in storage order).
        t_crow, t_col (`torch.Tensor`): CSR row pointers and column indices of ``W.T``.
        t_order (`torch.LongTensor` of shape `(nnz,)`): storage position of each link of ``W.T``'s CSR, so
            ``values[t_order]`` are ``W.T``'s CSR values.
    """

    shape: tuple[int, int]
    nnz: int
    flat: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_order: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> LinkIndex:
        """The index of a 2-D boolean mask (one host read: the number of links)."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(
                f"LinkIndex.from_mask needs a 2-D torch.bool mask, got {tuple(mask.shape)} {mask.dtype}."
            )
        out_features, in_features = mask.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # increasing: row-major order
        rows, cols = flat // in_features, flat % in_features
        # int32 indices where they fit: the CPU kernels run faster on them; int64 beyond 2**31 entries
        itype = torch.int32 if max(mask.numel(), 1) < 2**31 else torch.int64
        crow = _row_pointers(rows, out_features, itype)
        # W.T's CSR: links ordered by (col, row); a stable sort of the columns keeps rows increasing
        t_order = torch.sort(cols, stable=True).indices
        t_crow = _row_pointers(cols[t_order], in_features, itype)
        return cls(
            shape=(out_features, in_features),
            nnz=flat.numel(),
            flat=flat,
            crow=crow,
            col=cols.to(itype),
            t_crow=t_crow,
            t_col=rows[t_order].to(itype),
            t_order=t_order,
        )

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def mask(self) -> torch.Tensor:
        """The boolean ``(out, in)`` mask this index was built from."""
        mask = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.device)
        mask[self.flat] = True
        return mask.view(self.shape)


def _row_pointers(rows: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow.to(dtype)


def link_values(weight: torch.Tensor, index: LinkIndex) -> torch.Tensor:
    """The values of ``weight`` (``(out, in)``) at the links of ``index``, in storage order (a copy)."""
    return weight.reshape(-1)[index.flat]


def dense_from_links(values: torch.Tensor, index: LinkIndex) -> torch.Tensor:
    """The dense ``(out, in)`` weight: ``values`` at the links, exactly 0.0 everywhere else."""
    dense = torch.zeros(index.shape[0] * index.shape[1], dtype=values.dtype, device=values.device)
    dense[index.flat] = values
    return dense.view(index.shape)


def links_kept_from(old: LinkIndex, new: LinkIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """For every link of ``new``: its storage position in ``old`` and whether it was a link there.

    Returns ``(source, kept)``: ``new_values = torch.where(kept, old_values[source], 0)`` carries kept links
    and starts new ones at 0. Works on the sorted flat positions (no dense map of the layer).
    """
    if old.shape != new.shape:
        raise ValueError(f"Cannot map links of a {old.shape} layer onto a {new.shape} layer.")
    if old.nnz == 0:
        zeros = torch.zeros(new.nnz, dtype=torch.int64, device=new.device)
        return zeros, torch.zeros(new.nnz, dtype=torch.bool, device=new.device)
    source = torch.searchsorted(old.flat, new.flat).clamp_(max=old.nnz - 1)
    kept = old.flat[source] == new.flat
    return source, kept


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, index: LinkIndex):
        out_features, in_features = index.shape
        x2 = x.reshape(-1, in_features)
        x_t = x2.t().contiguous()  # (in, N); free when x is a sparse layer's output
        y_t = torch.sparse.mm(_csr(index.crow, index.col, values, index.shape), x_t)  # (out, N)
        if bias is not None:
            y_t.add_(bias.unsqueeze(1))
        ctx.save_for_backward(x_t, values)
        ctx.index, ctx.x_shape, ctx.has_bias = index, x.shape, bias is not None
        return y_t.t().reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_y):
        x_t, values = ctx.saved_tensors
        index: LinkIndex = ctx.index
        out_features, in_features = index.shape
        grad_y_t = grad_y.reshape(-1, out_features).t().contiguous()  # (out, N)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            w_t = _csr(index.t_crow, index.t_col, values[index.t_order], (in_features, out_features))
            grad_x = torch.sparse.mm(w_t, grad_y_t).t().reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            pattern = _csr(index.crow, index.col, values, index.shape)
            # (out, N) @ (N, in) sampled at the links; x_t.t() is a column-major view (read fastest)
            grad_values = torch.sparse.sampled_addmm(pattern, grad_y_t, x_t.t(), beta=0.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y_t.sum(1)
        return grad_x, grad_values, grad_bias, None


def sparse_linear(
    x: torch.Tensor, values: torch.Tensor, index: LinkIndex, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for the weight ``W`` whose links are ``index`` and link values ``values``.

    Args:
        x (`torch.Tensor` of shape `(..., in)`): the input.
        values (`torch.Tensor` of shape `(nnz,)`): the link values in storage order (see :class:`LinkIndex`).
        index (`LinkIndex`): the links.
        bias (`torch.Tensor` of shape `(out,)`, *optional*).

    Returns:
        `torch.Tensor` of shape `(..., out)`. Gradients flow to ``x``, ``values`` (one per link) and ``bias``.
    """
    if values.shape != (index.nnz,):
        raise ValueError(f"values has shape {tuple(values.shape)}; the index has {index.nnz} links.")
    if x.shape[-1] != index.shape[1]:
        raise ValueError(f"Input has {x.shape[-1]} features; the layer takes {index.shape[1]}.")
    return _SparseLinear.apply(x, values, bias, index)
