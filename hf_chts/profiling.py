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

import weakref
from collections import Counter

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "PeakLiveBytes"]

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
        ...     _ = int(torch.ones(3).sum())  # ones, sum, and the read of the sum
        >>> counter.ops, counter.syncs
        (3, 1)
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


class PeakLiveBytes(TorchDispatchMode):
    """Bytes held by the tensors that ops allocate inside the block: an allocator-independent working set.

    ``peak``: the most bytes held at once; ``live``: the bytes still held when the block ends (its results);
    ``peak_temporary``: the most bytes held at once by tensors freed before the block ends, i.e. the working
    set beyond the results, however many results have piled up by then.

    An op's output whose storage neither an input nor an earlier output holds is a new allocation of its
    storage's size; it is held until the last tensor seen with that storage (the output, and the views and
    in-place results taken of it inside the block) is freed. Resident memory cannot tell this on a CPU: the
    allocator keeps freed memory for reuse. Memory that tensors made outside the block or by NumPy hold is
    not counted.

    Example:
        >>> with PeakLiveBytes() as mem:
        ...     a = torch.ones(1000)  # 4000 bytes, freed
        ...     b = a * 2  # 4000 bytes, the result
        ...     del a
        >>> mem.peak, mem.live, mem.peak_temporary
        (8000, 4000, 4000)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_temporary = 0
        self._held: dict[int, list[int]] = {}  # storage address -> [allocation, bytes, tensors alive]
        self._events: list[tuple[int, int]] = []  # (allocation, +bytes when allocated / -bytes when freed)
        self._block = 0  # counts the blocks: a tensor freed after its block's end changes nothing

    def _release(self, block: int, address: int) -> None:
        if block != self._block:
            return
        entry = self._held[address]
        entry[2] -= 1
        if entry[2] == 0:
            self.live -= entry[1]
            self._events.append((entry[0], -entry[1]))
            del self._held[address]

    def __enter__(self):
        self.live = self.peak = self.peak_temporary = 0
        self._block += 1
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._block += 1  # the figures are those of the block's end
        kept = {entry[0] for entry in self._held.values()}
        held = 0
        for allocation, change in self._events:
            if allocation not in kept:
                held += change
                self.peak_temporary = max(self.peak_temporary, held)
        self._events.clear()
        self._held.clear()
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address in self._held:
                self._held[address][2] += 1
            elif address in inputs or storage.nbytes() == 0:
                continue  # a view or an in-place result of a tensor from outside the block
            else:
                self._held[address] = [len(self._events), storage.nbytes(), 1]
                self._events.append((len(self._events), storage.nbytes()))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, self._block, address)
        return out
