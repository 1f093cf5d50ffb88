"""Learning-rate re-warmup: scale the learning rate for one optimizer step and restore it right after.

After a topology update the regrown links start at 0.0 with a zeroed optimizer state; with
``SparseTrainingConfig.rewarmup_steps = k`` the ``s``-th optimizer step after the update (``1 <= s <= k``)
runs at ``s / (k + 1)`` of the scheduler's learning rate (docs/method.md section 8). The scheduler itself is
never touched: :class:`LearningRateScale` multiplies ``param_group["lr"]`` before ``optimizer.step()`` and
puts the saved values back right after, so the schedule continues as if nothing happened.

Example:

```python
>>> [rewarmup_factor(step, last_update_step=100, steps=3) for step in (100, 101, 102, 103, 104)]
[1.0, 0.25, 0.5, 0.75, 1.0]
```
"""

from __future__ import annotations

from typing import Any

__all__ = ["LearningRateScale", "rewarmup_factor"]


def rewarmup_factor(step: int, last_update_step: int, steps: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (counted from 1) after the update at
    ``last_update_step``: ``(step - last_update_step) / (steps + 1)`` for the ``steps`` steps that follow an
    update, else 1.0 (also before the first update, ``last_update_step <= 0``, and with ``steps <= 0``)."""
    if steps <= 0 or last_update_step <= 0:
        return 1.0
    since = step - last_update_step
    return since / (steps + 1) if 1 <= since <= steps else 1.0


class LearningRateScale:
    """Multiplies an optimizer's learning rates for one step; :meth:`restore_` puts the saved values back.

    Example:

    ```python
    >>> import torch
    >>> optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> scale = LearningRateScale()
    >>> scale.scale_(optimizer, 0.5); optimizer.param_groups[0]["lr"]
    0.05
    >>> scale.restore_(optimizer); optimizer.param_groups[0]["lr"]
    0.1
    ```
    """

    def __init__(self) -> None:
        self._saved: list[float] | None = None

    @property
    def active(self) -> bool:
        """Whether learning rates are scaled now (saved values wait for :meth:`restore_`)."""
        return self._saved is not None

    def scale_(self, optimizer: Any, factor: float) -> None:
        """Multiply every ``param_group["lr"]`` by ``factor``; a factor of 1.0 changes nothing."""
        if optimizer is None or factor == 1.0:
            return
        if self._saved is not None:
            self.restore_(optimizer)  # never scale twice without restoring in between
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def restore_(self, optimizer: Any) -> None:
        """Put back the learning rates saved by :meth:`scale_` (nothing when none are saved)."""
        if self._saved is not None and optimizer is not None:
            for group, lr in zip(optimizer.param_groups, self._saved, strict=True):
                group["lr"] = lr
        self._saved = None
