"""Host reads and working set of one update of the LLaMA-7B structure under a GPU's budgets, on a CPU.

A 7B update's host reads and memory depend on how its layers fall into stacks and chunks, not on the layer
sizes. This keeps the structure (32 blocks of 7 chained layers, shapes in the ratio 11008 : 4096) at a
fraction of the size, and sets the CPU's stack budget to hold what 2**27 entries hold at 7B on a GPU (8
square layers, 2 MLP layers) and the chunk budget to the GPU's. For this checkout's engine and a reference
revision's, side by side: host reads per update (``OpCounter``) and the bytes of live tensors per mask entry
(``PeakLiveBytes``): the live peak, and the working set beyond the returned new and grown masks (2 bytes per
entry).

Usage::

    python benchmarks/bench_chunks.py --reference 542287a
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_topology  # noqa: E402

from hf_chts.config import SparseTrainingConfig  # noqa: E402
from hf_chts.profiling import OpCounter, PeakLiveBytes  # noqa: E402

GPU_STACK_ENTRIES = 1 << 27  # the engine's stack budget off the CPU


def _budgets(engine_module) -> dict:
    """The stack and chunk budgets an engine runs under: its package's ``topology.stacks``, or, in earlier
    revisions, the engine module's own."""
    if hasattr(engine_module, "_STACK_ENTRIES"):
        return {
            "stack": engine_module._STACK_ENTRIES,
            "chunk": getattr(engine_module, "_CHUNK_STACKS", None),
            "chunk_default": getattr(engine_module, "_CHUNK_STACKS_DEFAULT", None),
        }
    stacks = importlib.import_module(engine_module.__name__.rsplit(".", 1)[0] + ".topology.stacks")
    return {
        "stack": stacks.STACK_ENTRIES,
        "chunk": stacks.CHUNK_STACKS,
        "chunk_default": stacks.CHUNK_STACKS_DEFAULT,
    }


def measure(engine_module, hidden: int, intermediate: int) -> dict:
    name = f"7B structure at hidden {hidden}"
    bench_topology.LAYER_SETS[name] = (hidden, intermediate, 32, 4)
    shapes, chains = bench_topology.llama_layer_set(name)
    # as many square layers per stack as 2**27 entries hold of 4096 x 4096
    budgets = _budgets(engine_module)
    budgets["stack"]["cpu"] = GPU_STACK_ENTRIES // (4096 * 4096) * hidden * hidden
    if budgets["chunk"] is not None:
        budgets["chunk"]["cpu"] = budgets["chunk_default"]
    cfg = SparseTrainingConfig(method="chtss", density=0.3, update_interval=10, init="er", seed=0)
    engine = engine_module.TopologyEngine(cfg, shapes, chains=chains, max_steps=100)
    masks = engine.init_masks()
    g = torch.Generator().manual_seed(0)
    weights = {n: (torch.randn(m.shape, generator=g) * m).to(torch.bfloat16) for n, m in masks.items()}
    entries = sum(m.numel() for m in masks.values())
    with PeakLiveBytes() as mem:
        returned = engine.step(50, masks, weights)  # alive past the block: not part of the working set
    del returned
    with OpCounter() as counter:
        engine.step(50, masks, weights)
    return {
        "layers": len(shapes),
        "host_reads": counter.syncs,
        "ops": counter.ops,
        "live_bytes_per_entry": mem.peak / entries,
        "working_bytes_per_entry": mem.peak_temporary / entries,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", default="542287a", help="git revision (or its engine.py file); 'none' to skip"
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden size standing for 4096")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    intermediate = round(args.hidden * 11008 / 4096)
    engines = {"this checkout": importlib.import_module("hf_chts.engine")}
    if args.reference != "none":
        engines[f"reference ({args.reference})"] = bench_topology.reference_engine_module(args.reference)
    print(f"| engine | layers | host reads | ops | live B/entry | working B/entry |  (hidden {args.hidden})")
    print("|---|---|---|---|---|---|")
    for label, module in engines.items():
        r = measure(module, args.hidden, intermediate)
        print(
            f"| {label} | {r['layers']} | {r['host_reads']} | {r['ops']} | {r['live_bytes_per_entry']:.2f} "
            f"| {r['working_bytes_per_entry']:.2f} |"
        )


if __name__ == "__main__":
    main()
