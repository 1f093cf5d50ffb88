"""Sharded topology updates: collectives with a timeout (errors name the rank), gradient and mask sharing.

Every rank keeps identical masks. The layer groups of a topology update are sharded over ranks
(:func:`shard_groups`: group ``i`` on rank ``i % world_size``); dense gradients are averaged onto each layer's
owner (:func:`mean_onto_owners`), each owner computes its layers and broadcasts their new masks
(:func:`share_masks`, one packed broadcast per rank), and the per-layer statistics are gathered.

Without a timeout a rank that is stopped or crashed makes the others wait forever (gloo's default is 30
minutes, and with ``TrainingArguments(use_cpu=True)`` ``ddp_timeout`` does not reach it).
:class:`Collectives` runs these operations in a process group of its own, created with the run's timeout
(``TrainingArguments.ddp_timeout``), and turns a timeout into a ``RuntimeError`` saying which rank waited for
which, for how long, and what to do.

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

import atexit
import datetime
import logging
import time
from typing import Any

import torch

__all__ = [
    "CollectiveTimeout",
    "Collectives",
    "broadcast_from_rank0_",
    "full_tensor",
    "is_dtensor",
    "mean_onto_owners",
    "rank_world",
    "shard_groups",
    "share_masks",
]

logger = logging.getLogger(__name__)

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


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it in the same order)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def shard_groups(groups: list[list[str]], rank: int, world: int) -> tuple[dict[str, int], list[list[str]]]:
    """``({layer: owner rank}, the groups of ``rank``)``: group ``i`` goes to rank ``i % world``."""
    owner = {name: i % world for i, group in enumerate(groups) for name in group}
    mine = [group for i, group in enumerate(groups) if i % world == rank]
    return owner, mine


class CollectiveTimeout(RuntimeError):
    """A collective of the sparse-training callback did not complete within the timeout."""


def _destroy_process_groups() -> None:
    """At exit, destroy the process groups while the interpreter is still whole.

    A run that ends without ``destroy_process_group()`` (``Trainer`` never calls it) leaves gloo's worker
    threads holding tensors; destroying those during interpreter finalization aborts the process (SIGABRT,
    "terminate called without an active exception") after training finished. Registered once, when the first
    of this module's groups is created; a script that destroyed its groups already makes it a no-op.
    """
    _GROUPS.clear()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except (RuntimeError, ValueError) as err:  # never fail an exiting process over its clean-up
            logger.debug("hf_chts: destroying the process groups at exit failed (%s).", err)


def _default_group_timeout_(seconds: float) -> None:
    """Give the default process group (the Trainer's gradient all-reduce) the run's timeout under gloo.

    ``TrainingArguments(use_cpu=True)`` creates it without ``ddp_timeout``, so a rank frozen outside the
    callback's own collectives would make the others wait gloo's 30 minutes. PyTorch sets a group's timeout
    after creation only through ``distributed_c10d._set_pg_timeout``; where that is missing, nothing changes.
    """
    setter = getattr(torch.distributed.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        return
    try:
        setter(datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError, AttributeError) as err:
        logger.warning("hf_chts: could not set the default process group's timeout (%s).", err)


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
                if not _GROUPS:
                    atexit.register(_destroy_process_groups)
                _GROUPS[key] = torch.distributed.new_group(
                    backend=backend, timeout=datetime.timedelta(seconds=self.timeout)
                )
            self.group = _GROUPS[key]
            if "gloo" in str(backend):
                _default_group_timeout_(self.timeout)

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


# ------------------------------------------------------------------------------------------ sharded updates
def share_masks(
    collectives: Collectives,
    owned: dict[str, tuple[torch.Tensor, torch.Tensor]],
    buffers: dict[str, torch.Tensor],
    owner: dict[str, int],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every rank's copy of the new masks and grown positions of every layer.

    Args:
        collectives (`Collectives`): the run's collectives.
        owned: ``{layer: (new mask, grown positions)}`` of the layers this rank computed, shaped like
            ``buffers[layer]``.
        buffers: ``{layer: current mask}`` of every layer, in layer order (same on every rank).
        owner: ``{layer: rank}`` from :func:`shard_groups`.

    Returns:
        ``({layer: new mask}, {layer: grown positions})`` for every layer. On one process ``owned`` as it is;
        otherwise each rank packs its layers (bit 0: link, bit 1: grown) into one flat ``uint8`` buffer and
        broadcasts it: ``world`` collectives per update, not one per layer.
    """
    if collectives.world == 1:
        return {name: pair[0] for name, pair in owned.items()}, {
            name: pair[1] for name, pair in owned.items()
        }
    new, grown = {}, {}
    for src in range(collectives.world):
        names = [name for name in buffers if owner[name] == src]
        if not names:
            continue
        device = buffers[names[0]].device
        if src == collectives.rank:
            packed = torch.cat(
                [
                    (owned[name][0].to(torch.uint8) + 2 * owned[name][1].to(torch.uint8))
                    .to(device)
                    .reshape(-1)
                    for name in names
                ]
            )
        else:
            packed = torch.empty(
                sum(buffers[name].numel() for name in names), dtype=torch.uint8, device=device
            )
        what = f"mask broadcast of {names[0]} and the {len(names) - 1} other layers of rank {src}"
        collectives.broadcast(packed, src=src, what=what)
        offset = 0
        for name in names:
            buf = buffers[name]
            part = packed[offset : offset + buf.numel()].view(buf.shape)
            offset += buf.numel()
            new[name] = (part & 1).bool()
            grown[name] = (part >> 1).bool()
    return new, grown


def mean_onto_owners(
    collectives: Collectives, tensors: dict[str, torch.Tensor], owner: dict[str, int], what: str = "gradient"
) -> dict[str, torch.Tensor]:
    """The mean over ranks of each tensor, on its owner rank only: ``{layer: mean}`` of this rank's layers.

    Every rank passes every layer, in the same order (one reduce per layer); on one process the tensors
    come back as they are.
    """
    if collectives.world == 1:
        return {name: t for name, t in tensors.items() if owner[name] == collectives.rank}
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        collectives.reduce_sum(tensor, dst=owner[name], what=f"{what} reduction of {name}")
        if owner[name] == collectives.rank:
            out[name] = tensor / collectives.world
    return out


def broadcast_from_rank0_(collectives: Collectives, masks: list[torch.Tensor], what: str = "mask") -> None:
    """Overwrite each boolean mask (in place) with rank 0's copy; nothing on one process."""
    if collectives.world == 1:
        return
    for mask in masks:
        packed = mask.to(torch.uint8)
        collectives.broadcast(packed, src=0, what=f"initial {what} broadcast")
        mask.copy_(packed.bool())
