"""Count dispatched aten ops and host synchronisations of a piece of code.

:class:`OpCounter` is a ``TorchDispatchMode``: every aten op that reaches the dispatcher is counted, and
those that read device data back to the host are counted again as host synchronisations. On a CPU the
same code path runs as on a GPU, so the counts measured on a CPU are the ones a GPU would pay:

- scalar reads: ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``), ``aten::is_nonzero``
  (``bool(t)``), ``aten::equal``;
- ops whose output size depends on the data: ``nonzero``, ``unique``, ``masked_select``, boolean indexing
  (``t[mask]``, ``t[mask] = v``), ``repeat_interleave`` without ``output_size``, ``bincount`` and friends;
- copies to the host (``.cpu()``, ``.to("cpu", copy=True)``, then ``.tolist()``), and blocking copies from the
  host to a device (a pageable, blocking copy waits for the device's queue to drain).

``torch.nonzero_static`` has a fixed output size and does not synchronise; it is counted as an op only.
``Tensor.tolist()`` on a CPU tensor dispatches nothing, so code that wants its host reads counted (as the
topology engine does) reads through an explicit ``.to("cpu", copy=True)`` first.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter"]

_SCALAR_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}
_DATA_DEPENDENT = {
    "nonzero",
    "argwhere",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "masked_select",
    "bincount",
    "histc",
    "histogram",
    "_assert_async",
}


def _is_bool_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


def _device_of(x) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


class OpCounter(TorchDispatchMode):
    """Count aten ops (``ops``), host synchronisations (``syncs``) and which ops synchronised (``sync_ops``).

    Example:
        >>> with OpCounter() as counter:
        ...     _ = int(torch.ones(3).sum())
        >>> counter.ops, counter.syncs
        (2, 1)
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.op_names: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()

    def _is_sync(self, name: str, args, kwargs) -> bool:
        if name in _SCALAR_READS or name in _DATA_DEPENDENT:
            return True
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(_is_bool_tensor(i) for i in (indices or ()) if i is not None)
        if name == "repeat_interleave":
            return (
                isinstance(args[0], torch.Tensor)
                and kwargs.get("output_size") is None
                and (len(args) == 1 or isinstance(args[1], torch.Tensor))
            )
        if name == "_to_copy":
            src, dst = _device_of(args[0]), kwargs.get("device")
            if dst is None or src is None:
                return False
            dst = torch.device(dst)
            if dst.type == "cpu":
                return True  # a read back to the host (or, on a CPU, an explicit host copy)
            return src.type == "cpu" and not kwargs.get("non_blocking", False)
        if name == "copy_":
            dst, src = _device_of(args[0]), _device_of(args[1])
            if dst is None or src is None or dst.type == src.type:
                return False
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            return dst.type == "cpu" or not non_blocking
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        self.ops += 1
        self.op_names[name] += 1
        if self._is_sync(name, args, kwargs):
            self.syncs += 1
            self.sync_ops[name] += 1
        return func(*args, **kwargs)
