"""Stacks of layers: same-shape layers on one device evolved together as ``(B, n_out, n_in)`` tensors.

Every phase of a topology update (:mod:`.removal`, :mod:`.regrowth`, chain removal here) works on a
:class:`LayerStack`; a single layer is a stack of one. The host reads data back a constant number of times
per stack (:func:`read_counts`, one read per device), never once per layer. :func:`plan_chunks` cuts the
layers of an update into chunks whose stacks fit a memory budget (docs/DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .rows import count_true, host_values, row_positions

__all__ = [
    "LayerStack",
    "chain_layers",
    "group_by_shape",
    "link_positions",
    "make_stacks",
    "plan_chunks",
    "read_counts",
    "remove_chains",
]

# Largest stack, in entries, processed in one piece (its float32 scores and keys dominate the memory).
STACK_ENTRIES = {"cpu": 1 << 24}
STACK_ENTRIES_DEFAULT = 1 << 27
# Largest chunk, in stack budgets per (shape, device): a chunk's boolean masks (old and new) stay alive while
# one stack at a time holds its float temporaries. The host reads a few times per chunk (chain removal's
# passes, the counts it leaves): on a GPU, where each read stalls the device, chunks of 1 / 4 / 8 budgets
# read 416 / 238 / 210 times per update of LLaMA-7B's 224 layers (one chunk: 196), and 8 budgets hold about a
# third of its masks. On a CPU a read costs nothing and one budget keeps the working set smallest.
CHUNK_STACKS = {"cpu": 1}
CHUNK_STACKS_DEFAULT = 8


class LayerStack:
    """Layers of one shape on one device, evolved together as ``(B, n_out, n_in)`` bool masks.

    ``old`` holds the masks before the update and ``mask`` the current ones (the phases replace it, never
    write into ``old``); ``nnz`` is the host-side link count of every layer of ``mask``, kept exact by each
    phase, so that no phase reads a count back. The phases also record what they did, one entry per layer:
    ``decay`` (density-decay prunes), ``removed``, ``regrown``; ``grown`` and ``returned`` are regrowth's
    grown links and its device count of links removed and regrown in the same update.

    Args:
        names (`list[str]`): the layers, in stack order.
        old (`torch.Tensor`): their ``(B, n_out, n_in)`` bool masks.
        nnz (`list[int]`, *optional*): their link counts, when known.

    Example:
        >>> stack = LayerStack(["fc"], torch.tensor([[[True, False], [True, True]]]), nnz=[3])
        >>> stack.shape, stack.nnz
        ((2, 2), [3])
    """

    def __init__(self, names: list[str], old: torch.Tensor, nnz: list[int] | None = None):
        self.names, self.old, self.mask = list(names), old, old
        self.shape: tuple[int, int] = (int(old.shape[1]), int(old.shape[2]))
        self.device: torch.device = old.device
        self.nnz: list[int] = list(nnz) if nnz is not None else []
        self.target: list[int] = []
        self.decay: list[int] = [0] * len(self.names)
        self.removed: list[int] = [0] * len(self.names)
        self.regrown: list[int] = [0] * len(self.names)
        self.grown: torch.Tensor | None = None
        self.returned: torch.Tensor | None = None
        self._cache: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def stacked(self, tensors: Mapping[str, torch.Tensor], float_dtype: bool = False) -> torch.Tensor:
        """The layers' tensors (weights or gradients) as one ``(B, n_out, n_in)`` stack on the stack's device.

        Built once per stack until :meth:`release` (removal reads the weights twice: decay scores, then
        removal scores).
        """
        key = (id(tensors), float_dtype)
        if key not in self._cache:
            parts = [tensors[name].detach().to(self.device) for name in self.names]
            if float_dtype:
                parts = [p.float() for p in parts]
            self._cache[key] = torch.stack(parts)
        return self._cache[key]

    def release(self) -> None:
        """Free the stacked tensors built by :meth:`stacked`."""
        self._cache.clear()


def group_by_shape(
    names: Sequence[str], masks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]
) -> dict[tuple, list[str]]:
    """Layers by ``(shape, device)``, in order of first appearance."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault((shapes[name], masks[name].device), []).append(name)
    return groups


def make_stacks(
    names: Sequence[str], masks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]
) -> list[LayerStack]:
    """:class:`LayerStack` s of ``names``' masks, one per ``(shape, device)`` in order of first appearance;
    a group larger than the stack budget is split evenly."""
    stacks = []
    for (shape, device), members in group_by_shape(names, masks, shapes).items():
        per = max(1, _stack_budget(device) // (shape[0] * shape[1]))
        pieces = math.ceil(len(members) / per)
        size = math.ceil(len(members) / pieces)
        for i in range(0, len(members), size):
            part = members[i : i + size]
            stacks.append(LayerStack(part, torch.stack([masks[name].to(torch.bool) for name in part])))
    return stacks


def _stack_budget(device: torch.device) -> int:
    return STACK_ENTRIES.get(device.type, STACK_ENTRIES_DEFAULT)


def _chunk_budget(device: torch.device) -> int:
    return CHUNK_STACKS.get(device.type, CHUNK_STACKS_DEFAULT) * _stack_budget(device)


def plan_chunks(
    groups: list[list[str]], masks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]
) -> list[list[str]]:
    """Consecutive update groups, as few chunks as keep the entries of every (shape, device) of a chunk
    within the chunk budget, ``CHUNK_STACKS`` stack budgets (a single group larger than that is a chunk of
    its own; :func:`make_stacks` splits a chunk into stacks), evened out: the same number of chunks with the
    smallest even share of entries that still fits."""
    needs = []  # entries of every group, by (shape, device)
    for group in groups:
        need: dict[tuple, int] = {}
        for name in group:
            key = (shapes[name], masks[name].device)
            need[key] = need.get(key, 0) + shapes[name][0] * shapes[name][1]
        needs.append(need)
    fewest = _pack(groups, needs, lambda key: _chunk_budget(key[1]))
    totals: dict[tuple, int] = {}
    for need in needs:
        for key, n in need.items():
            totals[key] = totals.get(key, 0) + n
    even = _pack(groups, needs, lambda key: min(_chunk_budget(key[1]), -(-totals[key] // len(fewest))))
    return even if len(even) == len(fewest) else fewest


def _pack(groups: list[list[str]], needs: list[dict[tuple, int]], limit) -> list[list[str]]:
    """Consecutive groups packed greedily while every key's entries stay within ``limit(key)``."""
    chunks: list[list[str]] = []
    entries: dict[tuple, int] = {}  # of the last chunk
    for group, need in zip(groups, needs, strict=True):
        if chunks and all(entries.get(k, 0) + n <= limit(k) for k, n in need.items()):
            chunks[-1] += group
            entries = {k: entries.get(k, 0) + need.get(k, 0) for k in entries.keys() | need.keys()}
        else:
            chunks.append(list(group))
            entries = need
    return chunks


def read_counts(stacks: Sequence[LayerStack], figure: Callable[[LayerStack], torch.Tensor]) -> dict[str, Any]:
    """``figure(stack)`` (one row per layer) for every stack, read back once per device, by layer name.

    Example:
        >>> stack = LayerStack(["fc"], torch.ones(1, 2, 3, dtype=torch.bool))
        >>> read_counts([stack], lambda s: count_true(s.mask))
        {'fc': 6}
    """
    by_device: dict[torch.device, list[LayerStack]] = {}
    for s in stacks:
        by_device.setdefault(s.device, []).append(s)
    out: dict[str, Any] = {}
    for members in by_device.values():
        values = host_values(torch.cat([figure(s) for s in members]))
        names = [name for s in members for name in s.names]
        out.update(zip(names, values, strict=True))
    return out


def link_positions(mask: torch.Tensor, nnz: Sequence[int]) -> torch.Tensor:
    """``(B, max(nnz))``: the flat positions in a ``(B, n_out, n_in)`` stack of every layer's links,
    ascending, padded with 0 (``nnz[b]``: layer ``b``'s link count)."""
    return row_positions(mask.view(mask.shape[0], -1), nnz)


# ---------------------------------------------------------------------------------------------- chains
def chain_layers(chain: Any) -> list[str]:
    """Layer names of a chain spec (a `LayerChain` has ``layers``; a `LlamaBlockChain` names its seven)."""
    if hasattr(chain, "layers"):
        return list(chain.layers)
    names = [getattr(chain, key) for key in ("q", "k", "v", "o", "gate", "up", "down") if hasattr(chain, key)]
    if not names:
        raise ValueError(f"Unknown chain spec {chain!r}: expected a LayerChain or a LlamaBlockChain.")
    return names


def remove_chains(
    stacks: Sequence[LayerStack], chains: Sequence[Any], shapes: Mapping[str, tuple[int, int]]
) -> dict[str, int]:
    """Chain removal (:mod:`.percolation`) on every chain whose layers are in ``stacks``, to its fixed point.

    Chains of one structure and shapes are processed as one stack of blocks; the host reads once per pass and
    device. Each stack's ``mask`` loses the removed links (in a copy of ``old`` when nothing was pruned yet).

    Returns:
        `dict[str, int]`: links removed from every layer of ``stacks``.
    """
    names = [name for s in stacks for name in s.names]
    where = {name: (s, b) for s in stacks for b, name in enumerate(s.names)}
    kinds: dict[tuple, list[Any]] = {}
    for chain in chains:
        members = chain_layers(chain)
        if members[0] not in where:
            continue
        key = (chain.structure(), tuple((shapes[n], where[n][0].device) for n in members))
        kinds.setdefault(key, []).append(chain)
    if not kinds:
        return dict.fromkeys(names, 0)
    for group in kinds.values():
        for name in (name for chain in group for name in chain_layers(chain)):
            s = where[name][0]
            if s.mask is s.old:  # nothing pruned: the links are cleared in a copy
                s.mask = s.old.clone()
    role_stacks, copies = [], []
    for group in kinds.values():
        slots = list(zip(*(chain_layers(chain) for chain in group), strict=True))
        # A block whose layers live on several devices is processed on its first layer's device.
        device = where[slots[0][0]][0].device
        tensors = []
        for slot in slots:
            tensor, copied = _slot_rows(where, slot, device)
            tensors.append(tensor)
            if copied:
                copies.append((slot, tensor))
        role_stacks.append((group[0], tensors))
    # Every pass that changes something removes a link, so this ends; one host read per pass and device.
    while _any_true([chain.apply_stacked_(tensors) for chain, tensors in role_stacks]):
        pass
    for slot, tensor in copies:
        for j, name in enumerate(slot):
            s, b = where[name]
            s.mask[b].copy_(tensor[j])
    counts = read_counts(stacks, lambda s: count_true(s.mask))
    before = {name: n for s in stacks for name, n in zip(s.names, s.nnz, strict=True)}
    return {name: before[name] - counts[name] for name in names}


def _any_true(flags: list[torch.Tensor]) -> bool:
    """Whether any of the device bools is True, read back once per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    return any(any(host_values(torch.stack(group))) for group in by_device.values())


def _slot_rows(where, slot: Sequence[str], device: torch.device) -> tuple[torch.Tensor, bool]:
    """The masks of ``slot``'s layers (one per chain) as one stack on ``device``, and whether it is a copy.

    Layers evenly spaced in one stack on ``device`` (a chunk's blocks: q, k, v, o, q, ...) are a strided view
    of its mask, so chain removal clears their links in place; any other slot is a copy, to be written back.
    """
    s, first = where[slot[0]]
    rows = [where[name][1] for name in slot]
    stride = rows[1] - first if len(rows) > 1 else 1
    if (
        s.device == device
        and stride > 0
        and all(where[name][0] is s for name in slot)
        and rows == list(range(first, rows[-1] + 1, stride))
    ):
        return s.mask[first : rows[-1] + 1 : stride], False
    return torch.stack([where[name][0].mask[where[name][1]] for name in slot]).to(device), True
