"""Per-step cost of CHTssCallback: a steady sparse step vs the dense step, LLaMA-130M shapes, real Trainer.

    PYTHONPATH=. python benchmarks/bench_overhead.py --devices cpu --out benchmarks/results/overhead_cpu.md
    PYTHONPATH=. python benchmarks/bench_overhead.py --devices cuda --out benchmarks/results/overhead_cuda.md

The model is the LLaMA-130M shape (hidden 768, intermediate 2048, 12 layers, 12 heads, vocabulary 32,000;
built from a ``LlamaConfig``, nothing downloaded), trained by ``transformers.Trainer`` with its defaults
(fused AdamW, gradient clipping at 1.0) on random tokens: once dense, once sparse under
``CHTssCallback(method="chtss", density=0.3, update_interval=100)``. Only steady steps are measured (the
schedule's first update is at step 100; the runs stop long before), so this is the cost of the masked model
itself, not of topology updates (``bench_topology.py`` measures those).

For each device it reports

- dispatched aten ops and passes over the sparse layers' weights in one steady step, counted with a
  ``TorchDispatchMode`` (``hf_chts/_step_cost.py`` defines both; the counts do not depend on the batch), and
- the step time: ``--rounds`` rounds, each a fresh ``Trainer.train()`` per arm (the arms take turns, first one
  then the other, so load from other jobs hits both alike), ``--steps`` steps each of which the first
  ``--warmup`` are discarded; the ratio of medians and the median of the per-round ratios.

Defaults per device: CPU fp32, batch 1 x 64; CUDA bf16 (``TrainingArguments(bf16=True)``), batch 32 x 256.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch

SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12
)
SHAPE_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32
)
TINY = dict(
    vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4
)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int, n: int, seed: int = 0):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=2048
    )
    return LlamaForCausalLM(config).to(device)


def train_round(model, sparse: bool, device: str, args, count_step: int | None, workdir: str):
    """One ``Trainer.train()`` of ``args.steps`` steps: (step seconds after warm-up, StepCost or None)."""
    from transformers import Trainer, TrainingArguments

    from hf_chts._step_cost import StepCostProbe
    from hf_chts.callback import CHTssCallback
    from hf_chts.config import SparseTrainingConfig
    from hf_chts.masking import find_sparse_modules

    cuda = device.startswith("cuda")
    weights = [m.weight for m in find_sparse_modules(model).values()]
    probe = StepCostProbe(
        weights,
        count_steps=() if count_step is None else (count_step,),
        stop_after=args.steps,
        sync=torch.cuda.synchronize if cuda else None,
    )
    callbacks = []
    if sparse:
        config = SparseTrainingConfig(method="chtss", density=0.3, update_interval=100)
        callbacks.append(CHTssCallback(config, log_per_layer=False))
    training_args = TrainingArguments(
        output_dir=workdir,
        max_steps=1000,  # the schedule's length; the probe stops the run after args.steps steps
        per_device_train_batch_size=args.batch,
        max_grad_norm=1.0,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = Tokens(model.config.vocab_size, args.seq, n=args.batch * (args.steps + 1))
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[*callbacks, probe])
    trainer.train()
    if sparse:
        assert not any(callbacks[0].engine.should_update(t) for t in range(1, args.steps + 1))
    times = [s for t, s in sorted(probe.seconds.items()) if t > args.warmup and t != count_step]
    cost = probe.costs.get(count_step) if count_step is not None else None
    del trainer
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return times, cost


def run(device: str, args) -> dict:
    shape = TINY if args.tiny else {"130M": SHAPE, "1B": SHAPE_1B}[args.model]
    dense_model = build_model(shape, device)
    sparse_model = build_model(shape, device)
    times = {"dense": [], "sparse": []}
    costs = {}
    round_ratios = []
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            count_step = args.warmup + 1 if r == 0 else None
            order = ("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")
            this_round = {}
            for arm in order:
                model = sparse_model if arm == "sparse" else dense_model
                step_times, cost = train_round(model, arm == "sparse", device, args, count_step, workdir)
                times[arm] += step_times
                this_round[arm] = statistics.median(step_times)
                if cost is not None:
                    costs[arm] = cost
            round_ratios.append(this_round["sparse"] / this_round["dense"])
    from hf_chts.masking import get_masks

    masks = list(get_masks(sparse_model).values())
    density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else (platform.processor() or platform.machine()),
        "dtype": "bf16 (autocast)" if device.startswith("cuda") else "fp32",
        "batch": f"{args.batch} x {args.seq}",
        "layers": len(masks),
        "density": density,
        "ops": (costs["dense"].ops, costs["sparse"].ops),
        "passes": (costs["dense"].passes, costs["sparse"].passes),
        "passes_by_op": (dict(costs["dense"].passes_by_op), dict(costs["sparse"].passes_by_op)),
        "median_ms": (1e3 * statistics.median(times["dense"]), 1e3 * statistics.median(times["sparse"])),
        "steps": (len(times["dense"]), len(times["sparse"])),
        "median_ratio": statistics.median(times["sparse"]) / statistics.median(times["dense"]),
        "round_ratio": statistics.median(round_ratios),
        "round_ratios": round_ratios,
    }


def to_markdown(results: list[dict], args, command: str) -> str:
    shape = "tiny LLaMA (hidden 256, 4 layers)" if args.tiny else f"LLaMA-{args.model} shape"
    lines = [
        f"## {args.label}" if args.label else "## Steady-step cost",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s), load average at start {args.load_at_start}. Model: "
        f"{shape}; real `Trainer` (fused AdamW, clip 1.0); sparse arm `chtss`, density 0.5 at the measured "
        f"steps (no update). {args.rounds} rounds x {args.steps} steps per arm, first {args.warmup} of each "
        "round discarded.",
        "",
        "| device | dtype | batch | sparse layers | ops dense | ops sparse | ops ratio | passes dense | "
        "passes sparse | passes ratio | dense ms (median) | sparse ms (median) | step ratio (medians) | "
        "step ratio (median of rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        (od, osp), (pd, ps), (md, ms) = r["ops"], r["passes"], r["median_ms"]
        lines.append(
            f"| {r['device']} ({r['device_name']}) | {r['dtype']} | {r['batch']} | {r['layers']} | "
            f"{od} | {osp} | "
            f"{osp / od:.3f} | {pd} | {ps} | {ps / pd:.3f} | {md:.1f} | {ms:.1f} | {r['median_ratio']:.3f} | "
            f"{r['round_ratio']:.3f} |"
        )
    lines.append("")
    for r in results:
        lines.append(
            f"Passes by op on {r['device']}: dense {r['passes_by_op'][0]}, sparse {r['passes_by_op'][1]}; "
            f"per-round step ratios {', '.join(f'{x:.3f}' for x in r['round_ratios'])}."
        )
    lines.append("")
    if args.notes:
        lines += [args.notes, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument(
        "--model", default="130M", choices=["130M", "1B"], help="LLaMA shape (1B: hidden 2048, 24 layers)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="default: 1 on CPU; on CUDA 32 (130M) or 16 (1B)"
    )
    parser.add_argument("--seq", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="steps per round and arm (CPU 8, CUDA 30)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded steps per round (CPU 2, CUDA 5)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--tiny", action="store_true", help="a small LLaMA instead of the 130M shape (smoke test)"
    )
    parser.add_argument("--label", default="", help="section title in the report")
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    parser.add_argument("--notes", default="", help="free text appended to the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.load_at_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    argv, skip = [], False
    for a in sys.argv[1:]:  # the command without --notes and its text
        if skip or a.startswith("--notes"):
            skip = a == "--notes"
            continue
        argv.append(a)
    command = "PYTHONPATH=. python benchmarks/bench_overhead.py " + shlex.join(argv)
    results = []
    user = {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup")}
    for device in (d.strip() for d in args.devices.split(",")):
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("cuda: skipped (no CUDA device)")
            continue
        defaults = (
            {"batch": 16 if args.model == "1B" else 32, "seq": 256, "steps": 30, "warmup": 5}
            if device.startswith("cuda")
            else {"batch": 1, "seq": 64, "steps": 8, "warmup": 2}
        )
        for key, value in user.items():
            setattr(args, key, defaults[key] if value is None else value)
        start = time.perf_counter()
        result = run(device, args)
        results.append(result)
        (od, osp), (pd, ps) = result["ops"], result["passes"]
        print(
            f"{device}: ops {od} -> {osp} ({osp / od:.3f}x), passes {pd} -> {ps} ({ps / pd:.3f}x), step "
            f"{result['median_ms'][0]:.1f} -> {result['median_ms'][1]:.1f} ms "
            f"(ratio {result['median_ratio']:.3f}, rounds {result['round_ratio']:.3f}) "
            f"in {time.perf_counter() - start:.0f} s"
        )
    if args.out and results:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a" if args.append else "w", encoding="utf-8") as f:
            f.write(("\n" if args.append else "") + to_markdown(results, args, command))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
