"""Collectives of the sparse-training callback, with a timeout and an error that names the rank.

Every rank keeps identical masks: after a topology update each layer's owner broadcasts its new mask, dense
gradients are summed onto the owner, and the per-layer statistics are gathered. Without a timeout a rank that
is stopped or crashed makes the others wait forever (gloo's default is 30 minutes, and with
``TrainingArguments(use_cpu=True)`` ``ddp_timeout`` does not reach it). :class:`Collectives` runs these
operations in a process group of its own, created with the run's timeout (``TrainingArguments.ddp_timeout``),
and turns a timeout into a ``RuntimeError`` saying which rank waited for which, for how long, and what to do.

Under NCCL the timeout is enforced by PyTorch's NCCL watchdog, which aborts the process group (its message
names the operation); under gloo the waiting rank raises the error below.

Example:

```python
>>> collectives = Collectives(timeout=600)  # (0, 1) and no-ops when torch.distributed is not initialised
>>> collectives.world
1
```
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch

__all__ = ["CollectiveTimeout", "Collectives", "is_dtensor", "rank_world"]

DEFAULT_TIMEOUT = 1800.0  # seconds, TrainingArguments.ddp_timeout's default

_GROUPS: dict[tuple[str, float], Any] = {}


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 shards): it has ``full_tensor`` and a device mesh."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


class CollectiveTimeout(RuntimeError):
    """A collective of the sparse-training callback did not complete within the timeout."""


class Collectives:
    """Broadcast, reduce and gather over all ranks, failing after ``timeout`` seconds instead of hanging.

    Args:
        timeout (`float`, *optional*): seconds a collective may wait, e.g. ``TrainingArguments.ddp_timeout``
            (default 1800). Must be positive.

    Every rank must create its ``Collectives`` at the same point (creating the process group is itself a
    collective); the callback does it in ``on_train_begin``.
    """

    def __init__(self, timeout: float | None = None) -> None:
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(
                f"The collective timeout must be a positive number of seconds (ddp_timeout), got {timeout!r}."
            )
        self.timeout = float(timeout)
        self.rank, self.world = rank_world()
        self.group = None
        if self.world > 1:
            backend = torch.distributed.get_backend()
            key = (str(backend), self.timeout)
            if key not in _GROUPS:
                _GROUPS[key] = torch.distributed.new_group(
                    backend=backend, timeout=datetime.timedelta(seconds=self.timeout)
                )
            self.group = _GROUPS[key]

    def _peer(self, root: int) -> int | None:
        """The rank this one waits for in a collective rooted at ``root`` (None: one of several)."""
        if root != self.rank:
            return root
        return 1 - self.rank if self.world == 2 else None

    def _wait(self, work, what: str, peer: int | None, start: float) -> None:
        try:
            work.wait()
        except RuntimeError as err:
            self._fail(err, what, peer, start)

    def _fail(self, err: RuntimeError, what: str, peer: int | None, start: float) -> None:
        """Re-raise ``err``, as a :class:`CollectiveTimeout` naming the ranks when it is a timeout."""
        waited = time.monotonic() - start
        text = str(err)
        if "imed out" not in text and "imeout" not in text and waited < 0.9 * self.timeout:
            raise err
        other = f"rank {peer}" if peer is not None else "one of the other ranks"
        raise CollectiveTimeout(
            f"hf_chts: rank {self.rank} of {self.world} waited {waited:.0f} s for {other} in the {what} "
            f"and gave up (timeout {self.timeout:.0f} s, TrainingArguments.ddp_timeout): {other} is "
            "stopped, crashed or far behind. Check that process; raise ddp_timeout if a rank is only "
            f"slow. ({text.splitlines()[0] if text else type(err).__name__})"
        ) from err

    def broadcast(self, tensor: torch.Tensor, src: int, what: str = "mask broadcast") -> torch.Tensor:
        """Broadcast ``tensor`` (in place) from rank ``src``; a no-op on one process."""
        if self.world == 1:
            return tensor
        start = time.monotonic()
        work = torch.distributed.broadcast(tensor, src=src, group=self.group, async_op=True)
        self._wait(work, what, self._peer(src), start)
        return tensor

    def reduce_sum(self, tensor: torch.Tensor, dst: int, what: str = "gradient reduction") -> torch.Tensor:
        """Sum ``tensor`` over ranks onto rank ``dst`` (in place); a no-op on one process."""
        if self.world == 1:
            return tensor
        start = time.monotonic()
        work = torch.distributed.reduce(
            tensor, dst=dst, op=torch.distributed.ReduceOp.SUM, group=self.group, async_op=True
        )
        self._wait(work, what, self._peer(dst), start)
        return tensor

    def all_gather_object(self, obj: Any, what: str = "statistics gather") -> list[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` on one process."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        start = time.monotonic()
        try:
            torch.distributed.all_gather_object(gathered, obj, group=self.group)
        except RuntimeError as err:
            self._fail(err, what, self._peer(self.rank), start)
        return gathered
