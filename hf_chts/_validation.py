"""Input checks shared by the whole package: each raises a ``ValueError`` naming the value and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

import torch


def check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError`` listing the valid names."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; valid values are: {', '.join(map(repr, allowed))}.")
    return value


def check_density(density: float, name: str = "density") -> float:
    """Densities live in (0, 1]: 1.0 is dense, 0.0 would remove every link."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density):
        raise ValueError(f"`{name}` must be a finite number in (0, 1], got {density!r}.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1] (e.g. 0.3 keeps 30% of the links), got {density}.")
    return float(density)


def check_fraction(value: float, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """Check ``value`` lies in [0, 1] (ends open as asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number in [0, 1], got {value!r}.")
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"`{name}` must be in {lo}0, 1{hi}, got {value}.")
    return float(value)


def check_positive_int(value: int, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}.")
    return value


def check_mask_2d(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Masks are 2-D (n_out x n_in) tensors; anything else is refused."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"`{name}` must be a 2-D torch.Tensor, got {type(mask).__name__}.")
    if mask.dim() != 2:
        raise ValueError(
            f"`{name}` must be 2-D (n_out x n_in), got shape {tuple(mask.shape)}; "
            "reshape or pass one layer's mask at a time."
        )
    return mask


def check_shape_2d(shape) -> tuple[int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ValueError(f"`shape` must be a pair (n_out, n_in), got {shape!r}.") from err
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"`shape` must be a pair of positive sizes (n_out, n_in), got {shape!r}.")
    return shape


def check_finite_nonnegative(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    """Sampling weights must be finite and >= 0."""
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).sum().item()
        raise ValueError(f"`{name}` contains {bad} NaN or infinite values; scores must be finite.")
    if (scores < 0).any():
        raise ValueError(f"`{name}` must be non-negative, got a minimum of {scores.min().item()}.")
    return scores


def link_count(shape: tuple[int, int], density: float) -> int:
    """The exact number of links a layer of ``shape`` holds at ``density``: ``round(d * n_out * n_in)``."""
    n_out, n_in = shape
    return int(round(density * n_out * n_in))


# Other libraries' names for a config field (torchao, llm-compressor and sparsimony speak of sparsity).
FIELD_ALIASES: dict[str, Callable[[Any], str]] = {
    "sparsity": lambda v: (
        f"hf_chts speaks of density, the fraction of links kept: use density={1 - v:.4g} for sparsity={v}"
        if isinstance(v, (int, float)) and 0 <= v < 1
        else "hf_chts speaks of density, the fraction of links kept (density = 1 - sparsity)"
    ),
}


def refuse_unknown_fields_(cls: type) -> None:
    """Make the dataclass ``cls`` refuse an unknown keyword with the closest field name (or the alias's fix),
    not Python's bare ``TypeError``."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in names:
                hint = FIELD_ALIASES[key](kwargs[key]) if key in FIELD_ALIASES else None
                close = difflib.get_close_matches(key, names, n=1)
                hint = hint or (
                    f"did you mean {close[0]}=?" if close else f"valid fields: {', '.join(names)}"
                )
                raise TypeError(f"{cls.__name__} has no field {key!r}; {hint}.")
        init(self, *args, **kwargs)

    cls.__init__ = __init__


def document_fields_(cls: type) -> None:
    """Append an ``Args:`` section to the dataclass ``cls``'s docstring from its fields' ``help`` metadata,
    so ``help(cls)`` documents every field."""
    lines = ["", "    Args:"]
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else f", defaults to {f.default!r}"
        text = textwrap.fill(
            f"{f.name} (`{f.type}`{default}): {f.metadata.get('help', '')}",
            width=108,
            initial_indent="        ",
            subsequent_indent="            ",
        )
        lines.append(text)
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"
