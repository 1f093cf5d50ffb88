"""Cost of drawing the initial masks of a LLaMA-7B layer set, and proof that every device draws the same.

The engine draws every initial mask from counter-based streams (docs/DESIGN.md, Randomness), so a mask is
the same whether drawn on CPU or on a GPU. This measures one layer of each 7B shape (a block holds four
4096 x 4096, two 11008 x 4096 and one 4096 x 11008) and extrapolates to the 32 blocks (224 layers); with
more than one device it also checks that the masks are bit-identical.

Usage::

    python benchmarks/bench_init.py                                  # CPU (+ CUDA if present)
    python benchmarks/bench_init.py --devices cpu --out benchmarks/results/init_7b_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from hf_chts.topology.init import init_mask
from hf_chts.topology.rng import stream_key

# (n_out, n_in): layers of that shape per LLaMA-7B block.
BLOCK = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
BLOCKS = 32


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--method", default="brf", choices=["er", "brf", "bsw", "bsf"])
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    params = {"r": 0.3} if args.method == "brf" else {}
    rows, masks = [], {}
    for device in devices:
        total = 0.0
        for shape, per_block in BLOCK.items():
            key = stream_key(0, "init", f"{shape}")
            init_mask((64, 64), args.density, args.method, key=key, device=device, **params)  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            mask = init_mask(shape, args.density, args.method, key=key, device=device, **params)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            total += seconds * per_block * BLOCKS
            masks.setdefault(shape, []).append(mask.cpu())
            rows.append(dict(device=device, shape=f"{shape[0]}x{shape[1]}", seconds=seconds))
            print(json.dumps(rows[-1]), flush=True)
        rows.append(
            dict(device=device, shape=f"7B layer set ({BLOCKS * sum(BLOCK.values())} layers)", seconds=total)
        )
        print(json.dumps(rows[-1]), flush=True)
    identical = all(all(torch.equal(m[0], other) for other in m[1:]) for m in masks.values())
    print(f"identical on {devices}: {identical}")
    if args.out:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
        lines = [
            f"# Initial masks of a LLaMA-7B layer set ({args.method}, density {args.density})",
            "",
            f"Command: `python benchmarks/bench_init.py {' '.join(__import__('sys').argv[1:])}`",
            f"Commit: {commit.strip()}; torch {torch.__version__}; Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {torch.get_num_threads()} CPU threads",
            "",
            "One layer of each shape timed once; the layer set is extrapolated (x layers per block x 32).",
            f"Masks bit-identical on {', '.join(devices)}: {identical}.",
            "",
            "| device | layer | s |",
            "|---|---|---|",
        ]
        lines += [f"| {r['device']} | {r['shape']} | {r['seconds']:.2f} |" for r in rows]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
