"""Correlated sparse topological initialisation (CSTI): links where the input features correlate most.

The score of a position ``(a, j)`` of an ``(n_out, n_in)`` layer is the absolute Pearson correlation of input
features ``a mod F`` and ``j mod F`` over calibration inputs ``X`` (``samples x F``), with the diagonal
(a feature with itself) and constant features (zero variance) scored 0. For a layer of shape ``(F, F)`` that
is the correlation matrix itself; for any other shape it is the correlation matrix tiled 2 x 2 and cut to the
layer's shape from the top-left corner, which is how the authors' MLP code (``--dim 2``) initialises every
sparse layer of the MLP from the input pixels. The layer keeps the ``round(density * n_out * n_in)``
highest-scoring positions exactly; ties (the tiled copies, zero scores) are broken at random.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._validation import check_shape_2d, link_count
from .rng import random_bits

__all__ = ["abs_correlation", "csti_init", "csti_mask", "csti_scores", "load_calibration_inputs"]


def _as_inputs(inputs: Any) -> torch.Tensor:
    if inputs is None:
        raise ValueError(
            "init='csti' needs calibration inputs: pass `inputs=X` (a samples x n_features tensor, e.g. the "
            "flattened training images), or `csti_inputs=` to the engine / callback / sparsify_."
        )
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(
            "CSTI `inputs` must be a 2-D tensor or array (samples x n_features), got "
            f"{type(inputs).__name__}."
        )
    if inputs.dim() != 2 or inputs.shape[0] < 2 or inputs.shape[1] < 1:
        raise ValueError(
            f"CSTI `inputs` must be 2-D (samples x n_features) with at least 2 samples, got shape "
            f"{tuple(inputs.shape)}; flatten each sample into one row."
        )
    if not torch.isfinite(inputs).all():
        raise ValueError("CSTI `inputs` contain NaN or infinite values; clean or drop those samples.")
    return inputs


@torch.no_grad()
def abs_correlation(inputs: Any) -> torch.Tensor:
    """``|Pearson correlation|`` of the columns of ``inputs`` (``samples x F``): float32 ``F x F``.

    The diagonal is 0 and every entry involving a constant column is 0 (never NaN). Computed in float64.

    Example:
        >>> x = torch.tensor([[0.0, 1.0, 5.0], [1.0, 3.0, 5.0], [2.0, 5.0, 5.0]])
        >>> abs_correlation(x)
        tensor([[0., 1., 0.],
                [1., 0., 0.],
                [0., 0., 0.]])
    """
    x = _as_inputs(inputs).to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    norm = x.square().sum(0).sqrt()
    scale = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    x = x * scale  # unit-norm columns; a constant column becomes all zeros
    corr = (x.T @ x).abs().clamp_(max=1.0)
    corr.fill_diagonal_(0.0)
    return corr.to(torch.float32)


def csti_scores(shape: tuple[int, int], inputs: Any = None, *, correlation: torch.Tensor | None = None):
    """CSTI scores of an ``(n_out, n_in)`` layer: the input correlation tiled 2 x 2 and cut to ``shape``.

    Pass ``inputs`` (``samples x F``) or a precomputed ``correlation`` (``F x F``, from
    :func:`abs_correlation`). Each side of the layer must be at most ``2 F``.
    """
    n_out, n_in = check_shape_2d(shape)
    corr = abs_correlation(inputs) if correlation is None else correlation
    width = corr.shape[0]
    if n_out > 2 * width or n_in > 2 * width:
        raise ValueError(
            f"CSTI tiles the {width} x {width} input correlation 2 x 2, which cannot cover a layer of shape "
            f"({n_out}, {n_in}); pass calibration inputs with at least {(max(n_out, n_in) + 1) // 2} "
            "features (columns), or use another init for this layer."
        )
    rows = torch.arange(n_out, device=corr.device) % width
    cols = torch.arange(n_in, device=corr.device) % width
    return corr[rows[:, None], cols[None, :]]


@torch.no_grad()
def csti_mask(
    shape: tuple[int, int],
    density: float,
    inputs: Any = None,
    *,
    correlation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    key: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``(n_out, n_in)`` mask of the ``round(density * n_out * n_in)`` highest CSTI scores.

    Args:
        shape (`tuple[int, int]`): ``(n_out, n_in)`` (``nn.Linear`` layout).
        density (`float`): fraction of links, in (0, 1], as SparseTrainingConfig checks (not checked again
            here).
        inputs: calibration inputs, ``samples x F`` (tensor or NumPy array); or ``correlation`` instead.
        correlation (`torch.Tensor`, *optional*): a precomputed :func:`abs_correlation` (shared by layers).
        generator (`torch.Generator`, *optional*): draws the stream key that breaks ties between equal
            scores, when ``key`` is not given (without either: torch's default RNG).
        key (`int`, *optional*): the stream key of the tie-breaking (:func:`hf_chts.topology.rng.stream_key`).
        device: where the mask lives (default: the generator's device, else CPU).

    Example:
        >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
        >>> int(csti_mask((12, 8), 0.25, x).sum())
        24
    """
    n_out, n_in = check_shape_2d(shape)
    if key is None:
        dev = generator.device if generator is not None else "cpu"
        key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=dev).item())
    elif generator is not None:
        raise ValueError("Give `generator` or `key`, not both: the key alone decides the tie-breaking.")
    work = (
        torch.device(device)
        if device is not None
        else (generator.device if generator else torch.device("cpu"))
    )
    if correlation is None:
        correlation = abs_correlation(_as_inputs(inputs).to(work))
    scores = csti_scores((n_out, n_in), correlation=correlation.to(work)).reshape(-1)
    k = link_count((n_out, n_in), density)
    # Random tie-breaking: sort a random permutation of the scores stably, largest first.
    perm = torch.argsort(random_bits(key, scores.numel(), device=work))
    order = torch.sort(scores[perm], descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=work)
    mask.index_fill_(0, perm[order[:k]], True)
    return mask.view(n_out, n_in)


def csti_init(shape, density, *, generator=None, key=None, device=None, **params: Any) -> torch.Tensor:
    """``init_mask(shape, density, "csti", inputs=X)``: :func:`csti_mask` with its parameters checked."""
    unknown = sorted(set(params) - {"inputs", "correlation"})
    if unknown:
        raise ValueError(
            f"Unknown parameter(s) {', '.join(map(repr, unknown))} for init method 'csti'; valid parameters "
            "are: 'inputs', 'correlation'."
        )
    if params.get("inputs") is None and params.get("correlation") is None:
        _as_inputs(None)  # raises, naming the fix
    return csti_mask(shape, density, generator=generator, key=key, device=device, **params)


def load_calibration_inputs(source: Any) -> torch.Tensor:
    """CSTI calibration inputs: a tensor / array as is, or a path to a ``.pt`` tensor or ``.npy`` array."""
    if source is None or isinstance(source, (torch.Tensor, np.ndarray)):
        return _as_inputs(source)
    path = str(source)
    if path.endswith(".npy"):
        return _as_inputs(np.load(path))
    if path.endswith(".pt"):
        return _as_inputs(torch.load(path, map_location="cpu", weights_only=True))
    raise ValueError(
        f"CSTI calibration inputs {path!r}: expected a .pt file (a torch tensor) or a .npy file, samples x "
        "n_features."
    )
