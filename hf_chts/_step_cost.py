"""The cost of one training step, counted on any device: dispatched aten ops and passes over the weights.

Used by ``tests/test_step_cost.py`` (the regression thresholds) and ``benchmarks/bench_overhead.py``.

- **ops**: every aten op that reaches the dispatcher below autograd (a ``TorchDispatchMode`` sees each
  one: forward, backward, gradient clipping, the optimizer, the callbacks). On a GPU each is at least one
  kernel launch, so at small and medium model sizes the count tracks the step time.
- **passes**: how many times a step streams the tracked weights through memory. Each non-view op that
  writes a tensor shaped like a tracked weight (any order of dimensions) counts once per such tensor; an op
  over lists (``_foreach_*``, fused optimizers) counts once per weight, i.e. the largest number of
  weight-shaped tensors in any one of the lists it writes (a fused AdamW writing the parameter and its two
  moments of 84 weights counts 84).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

__all__ = ["StepCost", "StepCostCounter", "StepCostProbe"]


@dataclass
class StepCost:
    """What one step cost: ``ops`` dispatched, ``passes`` over the tracked weights, by op name."""

    ops: int = 0
    passes: int = 0
    passes_by_op: Counter = field(default_factory=Counter)
    seconds: float = 0.0


class StepCostCounter(TorchDispatchMode):
    """Count dispatched aten ops and passes over tensors shaped like ``weights`` while active.

    Args:
        weights: the tensors (or shapes) whose passes are counted, e.g. the sparse layers' weights.
    """

    def __init__(self, weights: Iterable[torch.Tensor | tuple[int, ...]]):
        super().__init__()
        self.shapes = {tuple(sorted(w.shape if isinstance(w, torch.Tensor) else w)) for w in weights}
        self.cost = StepCost()

    def _weight_like(self, value) -> int:
        items = value if isinstance(value, (list, tuple)) else (value,)
        return sum(1 for t in items if isinstance(t, torch.Tensor) and tuple(sorted(t.shape)) in self.shapes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.cost.ops += 1
        if not func.is_view:
            written = []
            for i, arg in enumerate(func._schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    written.append(args[i] if i < len(args) else kwargs.get(arg.name))
            if not written:
                written = list(out) if isinstance(out, tuple) else [out]
            passes = max((self._weight_like(value) for value in written), default=0)
            if passes:
                self.cost.passes += passes
                self.cost.passes_by_op[func.overloadpacket.__name__] += passes
        return out


class StepCostProbe(TrainerCallback):
    """Count and time chosen optimizer steps of a ``Trainer`` run, from ``on_step_begin`` to ``on_step_end``.

    Put it last in the callback list. The counter is entered in ``on_step_begin`` (after the callbacks before
    it ran theirs) and left in ``on_step_end``: the window holds the forward and backward passes, gradient
    clipping, the optimizer step, every callback's ``on_pre_optimizer_step`` / ``on_optimizer_step``, the
    scheduler step and ``zero_grad``.

    Args:
        weights: tensors (or shapes) whose passes are counted.
        count_steps: optimizer steps (1-based) to count; the others are only timed.
        stop_after: ask the Trainer to stop after this step.
        sync: a function run before reading the clock (e.g. ``torch.cuda.synchronize``).
    """

    def __init__(
        self,
        weights: Iterable[torch.Tensor | tuple[int, ...]],
        count_steps: Collection[int] = (),
        stop_after: int | None = None,
        sync=None,
    ):
        self.shapes = [tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w) for w in weights]
        self.count_steps = set(count_steps)
        self.stop_after = stop_after
        self.sync = sync
        self.costs: dict[int, StepCost] = {}
        self.seconds: dict[int, float] = {}
        self._counter: StepCostCounter | None = None
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if self.sync is not None:
            self.sync()
        if step in self.count_steps:
            self._counter = StepCostCounter(self.shapes)
            self._counter.__enter__()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.sync is not None:
            self.sync()
        seconds = time.perf_counter() - self._start
        self.seconds[state.global_step] = seconds
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter.cost.seconds = seconds
            self.costs[state.global_step] = self._counter.cost
            self._counter = None
        if self.stop_after is not None and state.global_step >= self.stop_after:
            control.should_training_stop = True
