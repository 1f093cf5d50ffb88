"""Pinned masks: the engine's masks for a fixed seed are part of the contract (docs/DESIGN.md, Randomness).

A run resumed from a checkpoint, another rank, or another device must draw the very same masks, and so must
a later version of the package: a faster way of computing the random streams or of selecting links must not
change a single bit. These digests were recorded from the engine and must only change on purpose (a
deliberate change of the method, with a note in the changelog).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from hf_chts.config import METHODS, SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.topology.percolation import LayerChain

# Layers larger than the CPU tile of the random stream, stacked (a, b) and alone (c, d).
SHAPES = {"a": (96, 200), "b": (96, 200), "c": (200, 96), "d": (40, 72)}
CHAIN = LayerChain(["a", "c"])


def digest(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to(torch.uint8).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def evolve(method: str, device: str = "cpu") -> tuple[str, str, str]:
    """Digests of the initial masks and of the masks after the updates at steps 10 and 20."""
    cfg = SparseTrainingConfig(method=method, density=0.3, update_interval=10, seed=3)
    engine = TopologyEngine(cfg, SHAPES, chains=[CHAIN], max_steps=100)
    masks = engine.init_masks(device)
    out = [digest(masks)]
    g = torch.Generator().manual_seed(11)  # weights and gradients drawn on the CPU, then moved
    for step in (10, 20):
        weights = {n: (torch.randn(m.shape, generator=g) * m.cpu()).to(device) for n, m in masks.items()}
        grads = {n: torch.randn(m.shape, generator=g).to(device) for n, m in masks.items()}
        masks, _, _ = engine.step(step, masks, weights, grads)
        assert all(m.device.type == torch.device(device).type for m in masks.values())
        out.append(digest(masks))
    return tuple(out)


PINNED = {
    "static": ("6372a2c88966ec38", "6372a2c88966ec38", "6372a2c88966ec38"),
    "set": ("208d5453ae1f652a", "2f0c6432f11c86af", "1b292d2a30f3282c"),
    "rigl": ("208d5453ae1f652a", "2bb5fb6135c99213", "7cd8cc616b880a0e"),
    "mest": ("208d5453ae1f652a", "70f902f588292f4f", "9392f5298aa3b0af"),
    "granet": ("39abd2789852ed21", "f3fa61465d6bbaee", "e5f94409adf58fa4"),
    "cht": ("6b786dc5d14c486f", "76467eaa244c6e6d", "3d01fc1e2e7aa8c8"),
    "chts": ("6372a2c88966ec38", "fffc04507fb41a2a", "c4d3cd2c71302d4f"),
    "chtss": ("b7c7823f0d8e2a80", "5b8cc19a59d815a9", "48597223b8a8884a"),
}


@pytest.mark.parametrize("method", METHODS)
def test_masks_are_pinned(method):
    assert evolve(method) == PINNED[method]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_masks_are_pinned_on_cuda(method):
    # The same masks on every device: the digests recorded on a CPU.
    assert evolve(method, "cuda") == PINNED[method]
