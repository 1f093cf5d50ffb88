"""Elementwise functions run as one compiled kernel where that pays, eagerly elsewhere (docs/DESIGN.md,
Fused kernels).

A chain of elementwise tensor ops costs one pass over memory per op when run eagerly on a GPU; compiled by
``torch.compile`` (Inductor, Triton kernels) it is one pass. :class:`FusedFunction` wraps such a function:

- on device types listed in ``_DEVICE_TYPES`` (CUDA, when Triton is importable) it compiles the function
  lazily, once, with ``dynamic=True`` (new shapes do not recompile); everywhere else, and under a
  ``TorchDispatchMode`` (op counters, fake tensors) or inside a caller's ``torch.compile``, it runs eagerly;
- it checks itself: the first compiled call per device type also runs the function eagerly and compares
  (bit for bit, or with the function's own comparison for float results); on a mismatch or any exception
  while compiling or running, it warns once, naming the function and the reason, and runs eagerly from then
  on. Correctness never depends on the compiler;
- ``HF_CHTS_COMPILE=0`` in the environment turns compiling off (``1``, the default, leaves it on).

The functions must be pure: they return new tensors and modify none of their inputs. Called with
``out=``, the result is written into ``out``, which may be one of the inputs: compiled, one pass that reads
and overwrites it, with no new buffer.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

ENV_VAR = "HF_CHTS_COMPILE"
_ENV_VALUES = ("0", "1")
# Device types where compiled kernels are used. Tests add "cpu" to run the compiled path on a CPU.
_DEVICE_TYPES: frozenset[str] = frozenset({"cuda"})

Compare = Callable[[Any, Any], "str | None"]


def compile_enabled() -> bool:
    """Whether ``HF_CHTS_COMPILE`` allows compiled kernels (unset: yes).

    Raises:
        ValueError: the variable holds a value other than ``"0"`` or ``"1"``.
    """
    value = os.environ.get(ENV_VAR, "1").strip()
    if value not in _ENV_VALUES:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a valid setting; use one of {_ENV_VALUES} "
            f"(0: run fused functions eagerly, 1: compile them on GPUs)."
        )
    return value == "1"


def exact_compare(actual: Any, expected: Any) -> str | None:
    """None when ``actual`` and ``expected`` (tensors or tuples of them) are equal bit for bit, else why."""
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    if len(actual) != len(expected):
        return f"{len(actual)} outputs instead of {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.dtype != e.dtype or a.shape != e.shape:
            return f"output {index} is {a.dtype} {tuple(a.shape)} instead of {e.dtype} {tuple(e.shape)}"
        if not torch.equal(a, e):
            return f"output {index} differs from the eager result"
    return None


class FusedFunction:
    """An elementwise tensor function, compiled into one kernel on GPUs and checked against itself.

    Args:
        fn (`Callable`): a pure function of tensors (and Python constants) returning a tensor or a tuple of
            them.
        compare (`Callable`, *optional*): ``compare(compiled_result, eager_result)`` -> None when they agree,
            else a short reason; defaults to bit-for-bit equality (:func:`exact_compare`).

    Example:
        >>> double = FusedFunction(lambda x: x * 2)
        >>> double(torch.ones(3)).tolist()  # eager on CPU
        [2.0, 2.0, 2.0]
    """

    def __init__(self, fn: Callable[..., Any], *, compare: Compare | None = None):
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.compare = compare or exact_compare
        self._compiled: Callable[..., Any] | None = None
        self._compiled_into: Callable[..., Any] | None = None
        self._checked: set[str] = set()  # device types whose compiled results matched the eager ones
        self._failed: set[str] = set()  # device types that run eagerly after a failure

    def uses_compiled(self, device: torch.device) -> bool:
        """Whether a call on ``device`` now would run the compiled kernel."""
        dev = torch.device(device).type
        if dev in self._failed or dev not in _DEVICE_TYPES or not compile_enabled():
            return False
        if torch.compiler.is_compiling() or _dispatch_mode_active():
            return False
        return dev != "cuda" or _has_triton()

    def verified(self, device: torch.device) -> bool:
        """Whether a call on ``device`` now would run the compiled kernel, already checked there (callers
        size their first call so that its eager check fits in memory)."""
        return self.uses_compiled(device) and torch.device(device).type in self._checked

    def __call__(self, *args: Any, out: torch.Tensor | None = None) -> Any:
        """``fn(*args)``; with ``out`` (a tensor result), written into ``out`` instead, which may be one of
        ``args`` (a compiled kernel then reads and writes it in one pass, with no new buffer)."""
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if not self.uses_compiled(device):
            return self.fn(*args) if out is None else out.copy_(self.fn(*args))
        dev = device.type
        # The first call's eager result, computed before ``out`` (maybe an input) is written.
        expected = self.fn(*args) if dev not in self._checked else None
        try:
            with warnings.catch_warnings():  # the compiler's own deprecation notices are not the user's
                warnings.simplefilter("ignore", DeprecationWarning)
                if out is None:
                    result = self._compile("_compiled", self.fn)(*args)
                else:
                    self._compile("_compiled_into", self._write_into)(out, *args)
                    result = out
            if expected is not None:
                reason = self.compare(result, expected)
                if reason is not None:
                    raise _Mismatch(reason)
                self._checked.add(dev)
            return result
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            self._failed.add(dev)
            what = str(exc) if isinstance(exc, _Mismatch) else f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"hf_chts: the compiled kernel of {self.name} on {dev} failed its check "
                f"({what.strip()[:300]}); running it eagerly from now on (same results, more memory "
                f"passes). Set {ENV_VAR}=0 to skip compiling.",
                RuntimeWarning,
                stacklevel=2,
            )
            if expected is None:  # a later call: a failure while compiling, before anything was written
                expected = self.fn(*args)
            return expected if out is None else out.copy_(expected)

    def _write_into(self, out: torch.Tensor, *args: Any) -> None:
        out.copy_(self.fn(*args))

    def _compile(self, attribute: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The compiled ``fn``, built on first use (``dynamic=True``: shape changes do not recompile)."""
        if getattr(self, attribute) is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=_eager_numerics_options())
            setattr(self, attribute, compiled)
        return getattr(self, attribute)


class _Mismatch(RuntimeError):
    pass


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


# Inductor settings that keep a compiled kernel's numerics those of the eager ops: a cast to bf16 and back
# really rounds (by default a fused kernel keeps the float32 value), and float32 division rounds correctly
# (Triton's ``/`` is approximate by default). Only those this torch version knows are passed.
_EAGER_NUMERICS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True}


def _eager_numerics_options() -> dict[str, bool]:
    from torch._inductor import config

    options = {}
    for name, value in _EAGER_NUMERICS.items():
        holder = config
        for part in name.split("."):
            holder = getattr(holder, part, None)
        if holder is not None:
            options[name] = value
    return options


_TRITON: list[bool] = []


def _has_triton() -> bool:
    if not _TRITON:
        try:
            from torch.utils._triton import has_triton

            _TRITON.append(bool(has_triton()))
        except Exception:  # noqa: BLE001 - no usable Triton: eager kernels
            _TRITON.append(False)
    return _TRITON[0]
