"""Training-speed overhead of CHTssCallback: steps/s with the callback (chtss) vs a plain dense model.

    PYTHONPATH=. python benchmarks/bench_overhead.py                      # CPU (and CUDA when present)
    PYTHONPATH=. python benchmarks/bench_overhead.py --steps 400 --block 20 --threads 2 \
        --out benchmarks/results/overhead_cpu.md

Two copies of a small LLaMA (hidden 256, intermediate 688, 4 layers, 4 heads; the "20M" shape of
ALGORITHM.md section 8 with a 2,000-token vocabulary) train side by side on the same random batches: one
plain, one sparse under ``CHTssCallback(method="chtss", update_interval=100)``. The loop calls the callback's
events exactly where ``transformers.Trainer`` does (``on_step_begin``, forward/backward, gradient clipping,
``on_pre_optimizer_step``, ``optimizer.step()``, ``on_optimizer_step``), so it measures the callback's own
cost (masked forward, re-masking after every step, topology updates) without Trainer bookkeeping. The two
arms alternate in blocks of ``--block`` steps so that load from other processes hits both alike; the report
gives the ratio of mean step times excluding update steps, the time of each topology update, and the ratio
of total times with updates amortised.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch


def build_model(device: str, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Arm:
    """One model + optimizer; ``sparse`` drives CHTssCallback's events like Trainer does."""

    def __init__(self, device: str, vocab: int, steps: int, sparse: bool, update_interval: int, optim: str):
        from transformers import TrainerControl, TrainerState

        from hf_chts.callback import CHTssCallback
        from hf_chts.config import SparseTrainingConfig

        self.device = device
        self.model = build_model(device, vocab)
        self.model.train()
        # "fused" is what Trainer uses by default (optim="adamw_torch_fused" with torch >= 2.8)
        kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[optim]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.0, **kind)
        self.state, self.control = TrainerState(), TrainerControl()
        self.state.max_steps = steps
        self.args = SimpleNamespace(output_dir="unused", resume_from_checkpoint=None)
        self.events = dict(model=self.model, optimizer=self.optimizer)
        self.callback = None
        if sparse:
            config = SparseTrainingConfig(
                method="chtss", density=0.3, update_interval=update_interval, decay_end_fraction=0.7
            )
            self.callback = CHTssCallback(config, log_per_layer=False)
            self.callback.on_train_begin(self.args, self.state, self.control, **self.events)
        self.step_times: list[float] = []
        self.update_times: list[float] = []

    def step(self, batch: torch.Tensor) -> None:
        cb = self.callback
        sync(self.device)
        start = time.perf_counter()
        if cb is not None:
            cb.on_step_begin(self.args, self.state, self.control, **self.events)
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if cb is not None:
            cb.on_pre_optimizer_step(self.args, self.state, self.control, **self.events)
        self.optimizer.step()
        is_update = cb is not None and cb.engine.should_update(self.state.global_step + 1)
        if cb is not None:
            cb.on_optimizer_step(self.args, self.state, self.control, **self.events)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        sync(self.device)
        elapsed = time.perf_counter() - start
        (self.update_times if is_update else self.step_times).append(elapsed)


def run(
    device: str,
    steps: int,
    block: int,
    batch: int,
    seq: int,
    vocab: int,
    update_interval: int,
    warmup: int,
    optim: str = "fused",
):
    generator = torch.Generator().manual_seed(0)
    dense = Arm(device, vocab, steps + warmup, sparse=False, update_interval=update_interval, optim=optim)
    sparse = Arm(device, vocab, steps, sparse=True, update_interval=update_interval, optim=optim)
    # Warm-up steps (allocator, kernels) are run and discarded; the sparse arm's step counter starts after
    # them so its updates fall at update_interval, 2 x update_interval, ... of the measured part.
    for _ in range(warmup):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        dense.step(ids)
        sparse.step(ids)
    sparse.state.global_step = 0
    sparse.callback.last_update_step = 0
    for arm in (dense, sparse):
        arm.step_times.clear()
        arm.update_times.clear()
    done = 0
    block_ratios = []
    while done < steps:
        n = min(block, steps - done)
        batches = [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(n)]
        before = {id(arm): len(arm.step_times) for arm in (dense, sparse)}
        for arm in (dense, sparse) if (done // block) % 2 == 0 else (sparse, dense):
            for ids in batches:
                arm.step(ids)
        # paired ratio over the same batches, run seconds apart: robust to slow changes of machine load
        d_block = dense.step_times[before[id(dense)] :]
        s_block = sparse.step_times[before[id(sparse)] :]
        if d_block and s_block:
            block_ratios.append(statistics.fmean(s_block) / statistics.fmean(d_block))
        done += n
    density = sparse.callback._global_density()
    return dense, sparse, density, block_ratios


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """Mean without the ``cut`` fraction of largest and smallest values (load spikes of other jobs)."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k : len(ordered) - k] if len(ordered) > 2 * k else ordered)


def summarise(device: str, dense: Arm, sparse: Arm, density: float, block_ratios: list[float]) -> dict:
    d_mean = statistics.fmean(dense.step_times)
    s_mean = statistics.fmean(sparse.step_times)
    d_total = sum(dense.step_times) + sum(dense.update_times)
    s_total = sum(sparse.step_times) + sum(sparse.update_times)
    return {
        "device": device,
        "steps": len(dense.step_times) + len(dense.update_times),
        "dense_steps_per_s": 1.0 / d_mean,
        "sparse_steps_per_s": 1.0 / s_mean,
        "dense_median_ms": 1e3 * statistics.median(dense.step_times),
        "sparse_median_ms": 1e3 * statistics.median(sparse.step_times),
        "step_ratio": s_mean / d_mean,
        "median_ratio": statistics.median(sparse.step_times) / statistics.median(dense.step_times),
        "trimmed_ratio": trimmed_mean(sparse.step_times) / trimmed_mean(dense.step_times),
        "block_ratio_median": statistics.median(block_ratios),
        "block_ratios": block_ratios,
        "updates": len(sparse.update_times),
        "update_ms": [1e3 * t for t in sparse.update_times],
        "update_engine_s": sparse.callback.update_seconds_total,
        "total_ratio": s_total / d_total,
        "final_density": density,
    }


def to_markdown(results: list[dict], args, command: str) -> str:
    lines = [
        "# CHTssCallback training-speed overhead",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible "
        f"(shared with other jobs), torch {torch.__version__}, {args.threads} intra-op thread(s), "
        f"load average at start {args.load_at_start}.",
        "",
        "Model: LLaMA hidden 256, intermediate 688, 4 layers, 4 heads, vocab "
        f"{args.vocab}; batch {args.batch} x {args.seq} tokens; AdamW ({args.optim}), clip 1.0, fp32. "
        "Sparse arm: "
        f"`chtss`, density 0.5 -> 0.3 (sigmoid decay ending at 0.7 x steps), update_interval "
        f"{args.update_interval}, t_end = 0.75 x {args.steps}. The two arms alternate in blocks of "
        f"{args.block} steps on the same batches; "
        f"{args.warmup} warm-up steps each are discarded.",
        "",
        "| device | steps | dense steps/s | sparse steps/s | mean step ratio | 10%-trimmed mean ratio | "
        "median step ratio | "
        "median paired-block ratio | updates | update ms (each) | total-time ratio incl. updates | "
        "final density |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        updates = ", ".join(f"{t:.0f}" for t in r["update_ms"]) or "-"
        lines.append(
            f"| {r['device']} | {r['steps']} | {r['dense_steps_per_s']:.2f} | "
            f"{r['sparse_steps_per_s']:.2f} | "
            f"{r['step_ratio']:.3f} | {r['trimmed_ratio']:.3f} | {r['median_ratio']:.3f} | "
            f"{r['block_ratio_median']:.3f} | "
            f"{r['updates']} | {updates} | "
            f"{r['total_ratio']:.3f} | {r['final_density']:.4f} |"
        )
    lines += [
        "",
        "Step ratios: sparse / dense step time over non-update steps (1.05 = 5% slower), as the ratio of",
        "means, of 10%-trimmed means, of medians, and the median over blocks of the ratio of block means",
        "(each block: both arms on the same batches, seconds apart; the figure least moved by other jobs on",
        "a shared machine). It is the cost of the masked forward (`weight * weight_mask` and its backward)",
        "plus re-masking the weights after each optimizer step. Update steps are reported separately (a",
        "topology update on top of a step); the total-time ratio amortises them over the run.",
        "",
    ]
    if args.notes:
        lines += [args.notes, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="measured optimizer steps per arm")
    parser.add_argument("--block", type=int, default=20, help="steps per arm before switching")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--optim", choices=("fused", "foreach", "forloop"), default="fused", help="torch AdamW implementation"
    )
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--notes", default="", help="free text appended to the report")
    parser.add_argument(
        "--append", action="store_true", help="append the report to --out instead of overwriting"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.load_at_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    command = "PYTHONPATH=. python benchmarks/bench_overhead.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--notes")
    )
    results = []
    for device in args.devices.split(","):
        device = device.strip()
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: skipped (no CUDA device in this session)")
            continue
        dense, sparse, density, block_ratios = run(
            device,
            args.steps,
            args.block,
            args.batch,
            args.seq,
            args.vocab,
            args.update_interval,
            args.warmup,
            args.optim,
        )
        result = summarise(device, dense, sparse, density, block_ratios)
        results.append(result)
        print(
            f"{device}: dense {result['dense_steps_per_s']:.2f} steps/s, "
            f"sparse {result['sparse_steps_per_s']:.2f} steps/s, step ratio {result['step_ratio']:.3f} "
            f"(trimmed {result['trimmed_ratio']:.3f}, median {result['median_ratio']:.3f}, "
            f"paired blocks {result['block_ratio_median']:.3f}), "
            f"{result['updates']} updates of {', '.join(f'{t:.0f}' for t in result['update_ms'])} ms, "
            f"total ratio {result['total_ratio']:.3f}, density {density:.4f}"
        )
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as f:
            f.write(("\n" if args.append else "") + to_markdown(results, args, command))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
