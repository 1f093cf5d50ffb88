"""Speed and peak memory of the topology engine's operations vs a straightforward baseline, side by side.

The baseline does what the research code does: BRF by a per-row loop with ``torch.multinomial``, CH2-L3n with
dense fp32 ``C_r`` and ``C_c`` materialised whole, and soft sampling with ``torch.multinomial`` (which refuses
more than 2**24 categories). Both run in the same process, interleaved, so the ratios hold on a noisy machine.

Usage::

    python benchmarks/bench_topology.py       # all shapes and densities, CPU (+ CUDA if present)
    python benchmarks/bench_topology.py --full-model 130M --out benchmarks/results/topology_update_cpu.md
    python benchmarks/bench_topology.py --shapes 11008x4096 --densities 0.3 --ops ch2 --repeats 3
    python benchmarks/bench_topology.py --out benchmarks/results/topology_cpu.md
    python benchmarks/bench_topology.py --ch-precision-table --out benchmarks/results/ch_precision_cpu.md
    python benchmarks/bench_topology.py --devices cuda --shapes 4096x4096 11008x4096 --densities 0.3 \
        --out benchmarks/results/topology_cuda.md   # GPU: fused vs unfused rows side by side
    HF_CHTS_COMPILE=0 python benchmarks/bench_topology.py --full-model 7B --devices cuda  # without fusion

On a GPU the single-layer ops also run with the fused kernels off (rows ``*_unfused``, ``HF_CHTS_COMPILE=0``
inside the same process), and every measured call follows one untimed call (compilation, one-time checks).

Peak memory is the peak resident-set growth during the call on CPU (sampled every 2 ms from /proc), and
``torch.cuda.max_memory_allocated`` growth on CUDA.

``--full-model 130M 7B`` measures one whole topology update of a LLaMA layer set instead (CHTss settings,
the update at step 50 of 100, density 0.3): the engine of this checkout against the per-layer engine of
``--reference`` (a git revision; its ``hf_chts`` package is loaded beside this one), run alternately in
one process: wall and CPU time, peak memory, the working set (the most bytes held at once by tensors the
update frees before it returns, counted by :class:`hf_chts.profiling.PeakLiveBytes`), host synchronisations
and dispatched ops per update (counted by :class:`hf_chts.profiling.OpCounter`), and whether both give the
same masks. ``--blocks N`` keeps the first
N decoder blocks (the 7B set needs ~60 GB on a CPU in float32; on CUDA the weights are bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable

import torch
from bench_report import (
    command_line,
    git_commit,
    hardware,
    merge_rows,
    write_markdown,
    write_precision_markdown,
    write_update_markdown,
)

from hf_chts.config import SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.profiling import OpCounter, PeakLiveBytes
from hf_chts.topology._fused import ENV_VAR  # the fused kernels' off switch
from hf_chts.topology.init import init_mask
from hf_chts.topology.link_prediction import ch_scores
from hf_chts.topology.percolation import LlamaBlockChain
from hf_chts.topology.regrowth import regrow_links
from hf_chts.topology.removal import remove_links
from hf_chts.topology.rng import stream_key, uniform

SHAPES = {
    "768x2048": (768, 2048),
    "5461x2048": (5461, 2048),
    "4096x4096": (4096, 4096),
    "11008x4096": (11008, 4096),
}
MODEL_OF = {
    "768x2048": "LLaMA-130M",
    "5461x2048": "LLaMA-1B",
    "4096x4096": "LLaMA-7B",
    "11008x4096": "LLaMA-7B",
}


# ---------------------------------------------------------------------------------------------- baselines
def baseline_brf(shape, density, r, generator, device):
    """Per-row loop: each source neuron draws its targets with ``torch.multinomial``."""
    n_out, n_in = shape
    transpose = n_out > n_in
    n_s, n_l = (n_in, n_out) if transpose else (n_out, n_in)
    budget = round(density * n_out * n_in)
    # Every draw on the generator's device (a CUDA generator cannot drive CPU draws).
    dev = generator.device
    degrees = torch.full((n_s,), budget // n_s, dtype=torch.long, device=dev)
    degrees[torch.randperm(n_s, generator=generator, device=dev)[: budget - int(degrees.sum())]] += 1
    alpha = (1 - r) / r
    mask = torch.zeros(n_s, n_l, dtype=torch.bool, device=device)
    j = torch.arange(n_l, dtype=torch.float64, device=dev)
    for i in range(n_s):
        centre = (i * n_l) // n_s
        dist = torch.minimum((j - centre).abs(), n_l - (j - centre).abs())
        p = (1 + dist) ** (-alpha)
        mask[i, torch.multinomial(p, int(degrees[i]), replacement=False, generator=generator)] = True
    return mask.T if transpose else mask


def baseline_ch2(mask):
    """Dense fp32 CH2-L3n: C_r, C_c, E and G materialised whole."""
    m = mask.float()
    k_row, k_col = m.sum(1), m.sum(0)
    c_r, c_c = m @ m.T, m.T @ m
    pos_r, pos_c = (c_r > 0).float(), (c_c > 0).float()
    e_r = torch.clamp(k_row[None, :] - c_r - 1, min=0) * pos_r
    e_c = torch.clamp(k_col[None, :] - c_c - 1, min=0) * pos_c
    g_r = (c_r + pos_r) / (1 + e_r)
    g_c = (c_c + pos_c) / (1 + e_c)
    return g_r @ m + (g_c @ m.T).T


def baseline_soft_removal(mask, scores, n_remove, temperature, generator):
    """``torch.multinomial`` over the existing links (fails beyond 2**24 of them)."""
    idx = mask.flatten().nonzero().squeeze(1)
    p = scores.flatten()[idx].double() ** temperature
    keep = torch.multinomial(p, idx.numel() - n_remove, replacement=False, generator=generator)
    new = torch.zeros_like(mask).flatten()
    new[idx[keep]] = True
    return new.view_as(mask)


def baseline_soft_regrowth(mask, scores, n_grow, generator):
    """``torch.multinomial`` over the empty positions (fails beyond 2**24 of them)."""
    idx = (~mask).flatten().nonzero().squeeze(1)
    p = scores.flatten()[idx].double() + 1e-12
    pick = torch.multinomial(p, n_grow, replacement=False, generator=generator)
    new = mask.clone().flatten()
    new[idx[pick]] = True
    return new.view_as(mask)


# ---------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak growth of resident memory (CPU) or of allocated memory (CUDA) during a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.peak_rss = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak_rss, self._rss()) - self.base


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Median wall time over ``repeats`` runs and the peak memory of the first one; errors are reported.

    On a GPU one untimed run comes first: it compiles the fused kernels (docs/DESIGN.md, Fused kernels) and
    runs their one-time eager check, neither of which belongs in a steady-state time or peak.
    """
    times, peak = [], None
    if device.type == "cuda":
        try:
            del_me = fn()
            torch.cuda.synchronize()
            del del_me
        except (RuntimeError, MemoryError) as err:
            return {"error": str(err).splitlines()[0][:120]}
    for _ in range(repeats):
        try:
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            del out
        except (RuntimeError, MemoryError) as err:
            return {"error": str(err).splitlines()[0][:120]}
        peak = mem.peak if peak is None else peak
    return {"seconds": statistics.median(times), "peak_mb": peak / 2**20, "runs": len(times)}


# ---------------------------------------------------------------------------------------------- operations
def make_ops(shape, density, device, seed):
    """(name, ours, baseline or None) for one layer shape and density."""
    g = lambda: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    mask = init_mask(shape, density, "er", generator=g(), device=device)
    weight = torch.randn(shape, generator=g(), device=device) * mask
    scores = ch_scores(mask)
    n_move = math.floor(0.1 * int(mask.sum()))
    removed = remove_links(mask, weight.abs(), n_move, mode="soft", temperature=9.0, generator=g())

    def ours_sampling():
        m = remove_links(mask, weight.abs(), n_move, mode="soft", temperature=9.0, generator=g())
        return regrow_links(m, n_move, method="ch", mode="soft", scores=scores, generator=g())

    def base_sampling():
        m = baseline_soft_removal(mask, weight.abs(), n_move, 9.0, g())
        return baseline_soft_regrowth(m, scores, n_move, g())

    ops = [
        (
            "stream_uniform",
            lambda: uniform(stream_key(seed, "bench"), shape, device=device),
            lambda: torch.rand(shape, generator=g(), device=device),
        ),
        (
            "init_brf_r0.3",
            lambda: init_mask(
                shape, density, "brf", r=0.3, degree_dist="fixed", generator=g(), device=device
            ),
            lambda: baseline_brf(shape, density, 0.3, g(), device),
        ),
        ("init_er", lambda: init_mask(shape, density, "er", generator=g(), device=device), None),
        ("ch2_l3n", lambda: ch_scores(mask, "CH2_L3n"), lambda: baseline_ch2(mask)),
        (
            "soft_removal",
            lambda: remove_links(mask, weight.abs(), n_move, mode="soft", temperature=9.0, generator=g()),
            lambda: baseline_soft_removal(mask, weight.abs(), n_move, 9.0, g()),
        ),
        (
            "soft_regrowth_sampling",
            lambda: regrow_links(removed, n_move, method="ch", mode="soft", scores=scores, generator=g()),
            lambda: baseline_soft_regrowth(removed, scores, n_move, g()),
        ),
        ("soft_removal+regrowth", ours_sampling, base_sampling),
        (
            "soft_regrowth_with_ch",
            lambda: regrow_links(removed, n_move, method="ch", mode="soft", generator=g()),
            None,
        ),
    ]
    if device.type != "cpu":
        # The same ops with the fused kernels off (HF_CHTS_COMPILE=0): the effect of fusion, one process.
        fused = {"stream_uniform", "ch2_l3n", "soft_regrowth_sampling", "soft_removal+regrowth"}
        ops += [(f"{name}_unfused", _unfused(ours), base) for name, ours, base in ops if name in fused]
    return ops


def _unfused(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the fused kernels off (eager tensor ops)."""

    def run():
        previous = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = "0"
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = previous

    return run


# ------------------------------------------------------------------------------------ full-model updates
LAYER_SETS = {
    # hidden, intermediate, decoder blocks, heads (key-value heads = heads)
    "130M": (768, 2048, 12, 12),
    "1B": (2048, 5461, 24, 32),
    "7B": (4096, 11008, 32, 32),
}


def llama_layer_set(name: str, blocks: int | None = None):
    """Shapes and chains of the 7 sparse layers of every decoder block of a LLaMA size."""
    hidden, inter, n_blocks, heads = LAYER_SETS[name]
    shapes, chains = {}, []
    for i in range(n_blocks if blocks is None else min(blocks, n_blocks)):
        chain = LlamaBlockChain.from_prefix(
            f"model.layers.{i}", num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads
        )
        chains.append(chain)
        for role in ("q", "k", "v", "o"):
            shapes[getattr(chain, role)] = (hidden, hidden)
        shapes.update({chain.gate: (inter, hidden), chain.up: (inter, hidden), chain.down: (hidden, inter)})
    return shapes, chains


def reference_engine_module(revision: str):
    """The engine module of a git revision, with the whole ``hf_chts`` package of that revision beside this
    checkout's (as ``hf_chts_reference``: its topology functions too, not this checkout's). A file is taken
    for a copy of an ``engine.py`` that runs on this checkout's package (machines without the history)."""
    import importlib.util
    import io
    import sys
    import tarfile
    import tempfile
    import types

    if os.path.isfile(revision):
        with open(revision, encoding="utf-8") as f:
            source = f.read().replace("from .", "from hf_chts.")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "reference_engine.py")
            with open(path, "w") as f:
                f.write(source)
            spec = importlib.util.spec_from_file_location("reference_engine", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["reference_engine"] = module  # dataclasses look their module up while being built
            spec.loader.exec_module(module)
        return module
    archive = subprocess.run(["git", "archive", revision, "hf_chts"], capture_output=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="hf_chts_reference_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    # The package without its __init__ (which registers the models with transformers a second time).
    package = types.ModuleType("hf_chts_reference")
    package.__path__ = [os.path.join(folder, "hf_chts")]
    sys.modules["hf_chts_reference"] = package
    return importlib.import_module("hf_chts_reference.engine")


def full_update_rows(set_name, device, reference, repeats, blocks, seed):
    """Time, CPU time, peak memory, host syncs and ops of one full update, ours and the reference's."""
    shapes, chains = llama_layer_set(set_name, blocks)
    cfg = SparseTrainingConfig(method="chtss", density=0.3, update_interval=10, init="er", seed=seed)
    ours = TopologyEngine(cfg, shapes, chains=chains, max_steps=100)
    masks = ours.init_masks(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {n: (torch.randn(m.shape, generator=g, device=device) * m).to(dtype) for n, m in masks.items()}
    engines = {"ours": ours}
    if reference is not None:
        ref_cfg = reference.SparseTrainingConfig.from_dict(cfg.to_dict())  # the reference's own config class
        engines["reference"] = reference.TopologyEngine(ref_cfg, shapes, chains=chains, max_steps=100)
    results = {label: {"seconds": [], "cpu_seconds": []} for label in engines}
    if device.type == "cuda":  # compile the fused kernels and run their one-time checks untimed
        for engine in engines.values():
            engine.step(50, masks, weights)
        torch.cuda.synchronize()
    for label, engine in engines.items():  # first: a CPU's forked child inherits what the allocator kept
        results[label]["peak_mb"] = _peak_mb_of_update(engine, masks, weights, device)
    for label, engine in engines.items():
        with PeakLiveBytes() as live:
            returned = engine.step(50, masks, weights)
        del returned
        results[label].update(
            live_peak_mb=live.peak / 2**20,
            working_mb=live.peak_temporary / 2**20,
            returned_mb=live.live / 2**20,
        )
    outputs = {}
    for _ in range(repeats):
        for label, engine in engines.items():
            t0, c0 = time.perf_counter(), time.process_time()
            new, _, _ = engine.step(50, masks, weights)
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[label]["seconds"].append(time.perf_counter() - t0)
            results[label]["cpu_seconds"].append(time.process_time() - c0)
            outputs[label] = new
            del new
    for label, engine in engines.items():
        with OpCounter() as counter:
            engine.step(50, masks, weights)
        results[label].update(ops=counter.ops, syncs=counter.syncs, sync_ops=dict(counter.sync_ops))
        results[label]["seconds"] = statistics.median(results[label]["seconds"])
        results[label]["cpu_seconds"] = statistics.median(results[label]["cpu_seconds"])
    row = dict(
        measured=time.strftime("%H:%M UTC", time.gmtime()),
        device=device.type,
        hardware=hardware(device),
        layer_set=set_name,
        layers=len(shapes),
        blocks=len(chains),
        ours=results["ours"],
        reference=results.get("reference"),
    )
    if reference is not None:
        row["same_masks"] = all(torch.equal(outputs["ours"][n], outputs["reference"][n]) for n in shapes)
        row["cpu_time_ratio"] = results["ours"]["cpu_seconds"] / results["reference"]["cpu_seconds"]
        row["wall_time_ratio"] = results["ours"]["seconds"] / results["reference"]["seconds"]
    return row


def _peak_mb_of_update(engine, masks, weights, device) -> float:
    """Peak memory growth of one update. On a CPU it runs in a forked child, so that memory the allocator
    kept from an earlier run (the other engine's) cannot hide this one's peak."""
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            engine.step(50, masks, weights)
        return mem.peak / 2**20
    import multiprocessing

    def child(conn):
        # OpenMP's thread pool does not survive a fork: a parallel region in the child would hang.
        torch.set_num_threads(1)
        with PeakMemory(device) as mem:
            engine.step(50, masks, weights)
        conn.send(mem.peak / 2**20)

    parent, end = multiprocessing.get_context("fork").Pipe()
    proc = multiprocessing.get_context("fork").Process(target=child, args=(end,))
    proc.start()
    peak = parent.recv()
    proc.join()
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.05, 0.01])
    parser.add_argument("--ops", nargs="+", default=None, help="substrings of op names to run (default all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-repeats", type=int, default=1, help="repeats of slow baselines")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write a markdown table here (and a .json beside it)")
    parser.add_argument(
        "--ch-precision-table",
        action="store_true",
        help="measure CH2-L3n's ch_precision settings (error vs exact, top-k agreement, time) instead",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the measured rows of an existing --out JSON (re-runs)",
    )
    parser.add_argument(
        "--full-model",
        nargs="+",
        default=None,
        choices=list(LAYER_SETS),
        help="measure one full update of these LLaMA layer sets instead of the single-layer ops",
    )
    parser.add_argument("--blocks", type=int, default=None, help="decoder blocks kept (--full-model)")
    parser.add_argument(
        "--reference",
        default="2f232e3",
        help="git revision (or a file holding its hf_chts/engine.py) whose per-layer engine is measured "
        "beside ours ('none' to skip)",
    )
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if args.ch_precision_table:
        return run_precision_table(args, devices)
    if args.full_model:
        reference = None if args.reference == "none" else reference_engine_module(args.reference)
        rows = []
        for device_name in devices:
            for set_name in args.full_model:
                row = full_update_rows(
                    set_name, torch.device(device_name), reference, args.repeats, args.blocks, args.seed
                )
                row.update(command=command_line(), commit=git_commit(), reference_revision=args.reference)
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.out:
            if args.merge:
                rows = merge_rows(args.out, rows, ("device", "layer_set", "blocks"))
            write_update_markdown(rows, args.out)
        return
    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        for shape_name in args.shapes:
            for density in args.densities:
                for op, ours, base in make_ops(SHAPES[shape_name], density, device, args.seed):
                    if args.ops and not any(s in op for s in args.ops):
                        continue
                    if op.startswith("init_brf") and density != args.densities[0]:
                        base = None  # the per-row loop is slow; once per shape is enough for the ratio
                    r_ours = measure(ours, device, args.repeats)
                    r_base = measure(base, device, args.baseline_repeats) if base is not None else None
                    row = dict(
                        measured=time.strftime("%H:%M UTC", time.gmtime()),
                        device=device_name,
                        hardware=hardware(device),
                        shape=shape_name,
                        model=MODEL_OF[shape_name],
                        density=density,
                        op=op,
                        ours=r_ours,
                        baseline=r_base,
                    )
                    if r_base and "seconds" in r_base and "seconds" in r_ours:
                        row["speedup"] = r_base["seconds"] / r_ours["seconds"]
                        row["memory_ratio"] = r_ours["peak_mb"] / max(r_base["peak_mb"], 1e-9)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        if args.merge:
            rows = merge_rows(args.out, rows, ("device", "shape", "density", "op"))
        write_markdown(rows, args, args.out)


# ---------------------------------------------------------------------------------------------- CH precision
def precision_rows(shape_name, density, device, repeats, seed):
    """CH2-L3n at each ``ch_precision`` vs ``"exact"`` on one ER layer: error, top-k agreement, time."""
    from hf_chts.topology.link_prediction import CH_PRECISIONS

    shape = SHAPES[shape_name]
    mask = init_mask(shape, density, "er", key=seed, device=device)
    exact = ch_scores(mask, "CH2_L3n")
    candidates = ~mask
    cand_exact = exact[candidates]
    positive = cand_exact > 0
    # k = the links one update regrows at zeta = 0.1, and a tighter top 1% of the candidates.
    ks = {"k_update": max(1, int(0.1 * int(mask.sum()))), "k_1pct": max(1, int(0.01 * cand_exact.numel()))}
    top_exact = {name: torch.topk(cand_exact, k).indices for name, k in ks.items()}
    rows = []
    for precision in CH_PRECISIONS:
        timing = measure(lambda p=precision: ch_scores(mask, "CH2_L3n", precision=p), device, repeats)
        got = ch_scores(mask, "CH2_L3n", precision=precision)[candidates]
        diff = (got - cand_exact).abs()
        row = dict(
            device=device.type,
            hardware=hardware(device),
            shape=shape_name,
            model=MODEL_OF[shape_name],
            density=density,
            precision=precision,
            max_error=float(diff.max() / cand_exact.abs().max().clamp(min=1e-30)),
            mean_rel_error=float((diff[positive] / cand_exact[positive]).mean()) if positive.any() else 0.0,
            timing=timing,
        )
        for name, k in ks.items():
            top = torch.topk(got, k).indices
            overlap = torch.zeros(cand_exact.numel(), dtype=torch.bool, device=got.device)
            overlap[top_exact[name]] = True
            row[name] = k
            row[f"agree_{name}"] = float(overlap[top].sum()) / k
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_precision_table(args, devices):
    rows = []
    for device_name in devices:
        for shape_name in args.shapes:
            for density in args.densities:
                rows += precision_rows(
                    shape_name, density, torch.device(device_name), args.repeats, args.seed
                )
    if args.out:
        write_precision_markdown(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
