"""Sparse compute vs dense: one layer's forward + backward, and a whole MLP training step.

    PYTHONPATH=. python benchmarks/bench_sparse_compute.py --out benchmarks/results/sparse_compute_cpu.md
    PYTHONPATH=. python benchmarks/bench_sparse_compute.py --device cuda \
        --out benchmarks/results/sparse_compute_cuda.md
    PYTHONPATH=. python benchmarks/bench_sparse_compute.py --quick   # a few shapes, a few rounds: a smoke run

Per layer (``y = x @ W.T + b`` forward, then backward to the input, the weight and the bias), for each shape,
density, thread count and dtype:

- ``dense``: ``nn.Linear`` on the masked weight (what a masked layer computes without sparse compute);
- ``torch_csr``: a plain torch CSR layer (an autograd function like ours): ``torch.sparse.mm`` on the
  weight's CSR for the output and the input gradient (int64 indices, the operands as they come) and
  ``torch.sparse.sampled_addmm`` for the gradient at the links;
- ``sparseprop``: ``sparseprop.modules.SparseLinear`` (CPU only; a row is left out when the package is not
  installed: ``pip install sparseprop`` in the benchmark's environment, it is not a dependency);
- ``hf_chts``: :func:`hf_chts.sparse_ops.sparse_linear`;
- ``auto``: a masked ``nn.Linear`` on the compute ``SparseTrainingConfig(compute="auto")`` picks for it
  (sparse compute or the dense masked product: its ratio to ``dense`` is what a default run gets).

The whole step: the MLP 784-1000-1000-1000-10 (three sparse hidden layers, a dense classifier), batch 32,
cross-entropy, ``loss.backward()`` and one ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`` step, dense
(masked ``nn.Linear`` weights, every parameter in the optimizer) vs sparse (link values in the optimizer).
The trainable numbers plus the optimizer state are counted for both.

Timing: the arms take turns within each round (so load from other jobs hits all of them alike); each figure
is the median over rounds of the mean time of ``--iters`` calls, and each ratio is the median of the
per-round ratios. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_report import git_commit  # benchmarks/, the script's folder, is on sys.path
from torch import nn

from hf_chts.masking import make_masked_, set_compute_
from hf_chts.sparse_ops import LinkIndex, link_values, sparse_linear

# (name, in, out, batch shape)
LAYERS = [
    ("784->1000", 784, 1000, (32,)),
    ("1000->1000", 1000, 1000, (32,)),
    ("768->2048", 768, 2048, (8, 256)),
    ("2048->768", 2048, 768, (8, 256)),
]
DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.3)
MLP_SIZES = (784, 1000, 1000, 1000, 10)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, iters: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def race(arms: dict, rounds: int, iters: int, device: str) -> dict[str, dict[str, float]]:
    """Median time per call of each arm and the median per-round ratio to ``dense``, arms taking turns."""
    for fn in arms.values():  # warm-up
        fn()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name].append(_timed(fn, iters, device))
    out = {}
    for name, series in times.items():
        ratios = [d / t for d, t in zip(times["dense"], series, strict=True)]
        out[name] = {"ms": 1e3 * statistics.median(series), "speedup": statistics.median(ratios)}
    return out


def _random_mask(out_features: int, in_features: int, density: float, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    nnz = max(1, round(density * out_features * in_features))
    flat = torch.randperm(out_features * in_features, generator=gen)[:nnz]
    mask = torch.zeros(out_features * in_features, dtype=torch.bool)
    mask[flat] = True
    return mask.view(out_features, in_features).to(device)


class _ReferenceIndex:
    def __init__(self, index: LinkIndex):
        self.crow, self.col, self.t_order = index.crow.long(), index.col.long(), index.t_order
        self.t_crow, self.t_col = index.t_crow.long(), index.t_col.long()


class _ReferenceCSR(torch.autograd.Function):
    """The plain torch CSR layer: ``torch.sparse.mm`` for the output and the input gradient,
    ``torch.sparse.sampled_addmm`` for the gradient at the links; int64 indices, operands as they come."""

    @staticmethod
    def forward(ctx, x, values, bias, ref):
        out_f, in_f = len(ref.crow) - 1, x.shape[-1]
        x2 = x.reshape(-1, in_f)
        w = torch.sparse_csr_tensor(ref.crow, ref.col, values, (out_f, in_f))
        ctx.save_for_backward(x2, values)
        ctx.ref, ctx.shape = ref, x.shape
        return (torch.sparse.mm(w, x2.t()).t() + bias).reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_y):
        x2, values = ctx.saved_tensors
        ref = ctx.ref
        out_f, in_f = len(ref.crow) - 1, x2.shape[1]
        g2 = grad_y.reshape(-1, out_f)
        w = torch.sparse_csr_tensor(ref.crow, ref.col, values, (out_f, in_f))
        w_t = torch.sparse_csr_tensor(ref.t_crow, ref.t_col, values[ref.t_order], (in_f, out_f))
        grad_x = torch.sparse.mm(w_t, g2.t()).t().reshape(ctx.shape)
        grad_values = torch.sparse.sampled_addmm(w, g2.t(), x2, beta=0.0).values()
        return grad_x, grad_values, g2.sum(0), None


def layer_arms(in_f: int, out_f: int, batch: tuple, density: float, device: str, dtype: torch.dtype) -> dict:
    mask = _random_mask(out_f, in_f, density, device)
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype) * mask
    bias = torch.randn(out_f, device=device, dtype=dtype)
    x = torch.randn(*batch, in_f, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(*batch, out_f, device=device, dtype=dtype)

    dense = nn.Linear(in_f, out_f, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)

    def run_dense():
        dense(x).backward(grad_y)

    index = LinkIndex.from_mask(mask)
    values = link_values(weight, index).requires_grad_()
    bias_p = bias.clone().requires_grad_()

    def run_ours():
        sparse_linear(x, values, index, bias_p).backward(grad_y)

    # the same links as ours (from the mask: a weight drawn as exactly 0.0 stays a link), int64 indices
    ref = _ReferenceIndex(index)
    ref_values = link_values(weight, index).clone().requires_grad_()
    ref_bias = bias.clone().requires_grad_()

    def run_csr():
        _ReferenceCSR.apply(x, ref_values, ref_bias, ref).backward(grad_y)

    auto = make_masked_(nn.Linear(in_f, out_f, device=device, dtype=dtype), mask, name="layer")
    with torch.no_grad():
        auto.weight.copy_(weight)
        auto.bias.copy_(bias)
    set_compute_({"layer": auto}, "auto")  # what a run picks for this layer by default

    def run_auto():
        auto(x).backward(grad_y)

    arms = {"dense": run_dense, "torch_csr": run_csr, "hf_chts": run_ours, "auto": run_auto}
    if device == "cpu" and dtype == torch.float32:
        try:
            from sparseprop.modules import SparseLinear
        except ImportError:
            pass
        else:
            sp = SparseLinear(weight.clone(), nn.Parameter(bias.clone()))
            x2 = x.detach().reshape(-1, in_f).requires_grad_()
            g2 = grad_y.reshape(-1, out_f)

            def run_sparseprop():
                sp(x2).backward(g2)

            arms["sparseprop"] = run_sparseprop
    return arms


class _SparseLayer(nn.Module):
    """A benchmark-local sparse linear layer: link values and a bias as parameters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.index = LinkIndex.from_mask(mask)
        self.values = nn.Parameter(link_values(weight, self.index).clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x):
        return sparse_linear(x, self.values, self.index, self.bias)


def mlp_step_arms(density: float, device: str, batch: int = 32) -> tuple[dict, dict]:
    torch.manual_seed(0)
    dense_layers, sparse_layers = [], []
    for i, (a, b) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True)):
        layer = nn.Linear(a, b, device=device)
        if i < len(MLP_SIZES) - 2:
            mask = _random_mask(b, a, density, device)
            with torch.no_grad():
                layer.weight.mul_(mask)
            sparse_layers.append(_SparseLayer(layer.weight.detach(), layer.bias.detach(), mask))
        else:
            copy = nn.Linear(a, b, device=device)
            copy.load_state_dict(layer.state_dict())
            sparse_layers.append(copy)
        dense_layers.append(layer)

    def model(layers):
        mods = []
        for layer in layers[:-1]:
            mods += [layer, nn.ReLU()]
        return nn.Sequential(*mods, layers[-1])

    dense_model, sparse_model = model(dense_layers), model(sparse_layers)
    x = torch.randn(batch, MLP_SIZES[0], device=device)
    labels = torch.randint(0, MLP_SIZES[-1], (batch,), device=device)
    arms, sizes = {}, {}
    for name, net in (("dense", dense_model), ("hf_chts", sparse_model)):
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), labels).backward()
            opt.step()

        arms[name] = step
        step()  # creates the momentum buffers
        trainable = sum(p.numel() for p in net.parameters())
        state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        sizes[name] = trainable + state
    return arms, sizes


def trainer_steps_per_second(compute: str, steps: int, data_dir: Path | None) -> dict:
    """The MLP recipe (recipes/configs/mlp_mnist.yaml: CHTs, 1% with EM_S) through ``Trainer`` for ``steps``
    steps, one topology update half-way: steps per second as the Trainer reports them."""
    import importlib.util
    import tempfile

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "_bench_mlp_recipe", root / "recipes" / "mlp_image_classification.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # the recipe's dataclasses look their module up
    spec.loader.exec_module(recipe)
    data = ["--data_dir", str(data_dir)] if data_dir else ["--synthetic", "True"]
    with tempfile.TemporaryDirectory() as out:
        argv = [
            str(root / "recipes" / "configs" / "mlp_mnist.yaml"), *data, "--compute", compute,
            "--max_steps", str(steps), "--update_interval", str(steps // 2), "--eval_strategy", "no",
            "--max_eval_samples", "1000", "--output_dir", out, "--logging_steps", str(steps),
            "--disable_tqdm", "True",
        ]  # fmt: skip
        result = recipe.main(*recipe.parse_args(argv))
    return {"steps_per_second": steps / result["train_runtime_seconds"], "steps": steps}


def run(args) -> dict:
    device = args.device
    if args.quick:
        args.trainer_steps = min(args.trainer_steps, 100)
    layers = LAYERS[:2] if args.quick else LAYERS
    densities = (0.01, 0.05) if args.quick else DENSITIES
    threads = (1,) if args.quick or device == "cuda" else tuple(args.threads)
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for dtype in dtypes:
            for name, in_f, out_f, batch in layers:
                for density in densities:
                    res = race(
                        layer_arms(in_f, out_f, batch, density, device, dtype),
                        args.rounds,
                        args.iters,
                        device,
                    )
                    rows.append(
                        dict(kind="layer", layer=name, batch="x".join(map(str, batch)), density=density,
                             threads=n_threads, dtype=str(dtype).replace("torch.", ""), results=res)
                    )  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
        for density in (0.01, 0.05):
            arms, sizes = mlp_step_arms(density, device)
            res = race(arms, args.rounds, args.iters, device)
            rows.append(dict(kind="mlp_step", density=density, threads=n_threads, results=res, numbers=sizes))
            print(json.dumps(rows[-1]), flush=True)
    if args.trainer_steps and device == "cpu":
        torch.set_num_threads(1)
        data_dir = Path(args.data_dir) if Path(args.data_dir).is_dir() else None
        for compute in ("dense", "auto"):
            res = trainer_steps_per_second(compute, args.trainer_steps, data_dir)
            rows.append(dict(kind="trainer", compute=compute, threads=1, data=str(data_dir), **res))
            print(json.dumps(rows[-1]), flush=True)
    return {
        "rows": rows,
        "device": device,
        "machine": (
            torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
        ),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "commit": git_commit(mark_dirty=True),
        "command": "python " + shlex.join(sys.argv),
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"# Sparse compute vs dense ({report['device']})",
        "",
        f"Machine: {report['machine']}, {report['cpus']} CPU cores visible; torch {report['torch']}; commit "
        f"{report['commit']}.",
        f"Command: `{report['command']}`",
        "",
        "Each figure: the median over rounds of the mean time per call (ms); in brackets the median "
        "per-round speed-up over dense (dense time / arm time; > 1 is faster than dense). The arms take "
        "turns in every round.",
        "",
        "## One layer: forward + backward (input, weight and bias gradients)",
        "",
    ]
    layer_rows = [r for r in report["rows"] if r["kind"] == "layer"]
    arms = ["dense", "torch_csr", "sparseprop", "hf_chts", "auto"]
    lines += [
        "| layer | batch | density | threads | dtype | "
        + " | ".join(arms)
        + " | hf_chts vs best other sparse |",
        "|---|---|---|---|---|" + "---|" * (len(arms) + 1),
    ]
    for r in layer_rows:
        res = r["results"]
        cells = [f"{res[a]['ms']:.3f} ({res[a]['speedup']:.1f}x)" if a in res else "n/a" for a in arms]
        others = [res[a]["ms"] for a in ("torch_csr", "sparseprop") if a in res]
        vs = f"{min(others) / res['hf_chts']['ms']:.2f}x" if others else "n/a"
        lines.append(
            f"| {r['layer']} | {r['batch']} | {r['density']:.0%} | {r['threads']} | {r['dtype']} | "
            + " | ".join(cells) + f" | {vs} |"
        )  # fmt: skip
    lines += [
        "",
        "## The MLP 784-1000-1000-1000-10, batch 32: forward, backward and an SGD momentum step",
        "",
        "| density | threads | dense ms | hf_chts ms | speed-up "
        "| trainable + optimizer numbers, sparse / dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in report["rows"] if r["kind"] == "mlp_step"):
        res, n = r["results"], r["numbers"]
        lines.append(
            f"| {r['density']:.0%} | {r['threads']} | {res['dense']['ms']:.3f} | "
            f"{res['hf_chts']['ms']:.3f} | "
            f"{res['hf_chts']['speedup']:.1f}x | {n['hf_chts']:,} / {n['dense']:,} = "
            f"{n['hf_chts'] / n['dense']:.2%} |"
        )
    trainer = [r for r in report["rows"] if r["kind"] == "trainer"]
    if trainer:
        by = {r["compute"]: r for r in trainer}
        lines += [
            "",
            f"## The MLP recipe through Trainer (recipes/configs/mlp_mnist.yaml, {trainer[0]['steps']} "
            "steps, one update, 1 thread)",
            "",
            "| compute | steps/s |",
            "|---|---|",
            *(f"| {r['compute']} | {r['steps_per_second']:.1f} |" for r in trainer),
        ]
        if {"dense", "auto"} <= set(by):
            ratio = by["auto"]["steps_per_second"] / by["dense"]["steps_per_second"]
            lines.append(f"\n`auto` runs {ratio:.1f}x the steps per second of `dense` (one run each).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="Two layer shapes, 1% and 5%, one thread.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (CPU rows).")
    parser.add_argument("--out", default=None, help="Markdown report; the JSON goes beside it.")
    parser.add_argument(
        "--trainer_steps", type=int, default=600, help="Steps of the MLP recipe through Trainer (0: skip)."
    )
    parser.add_argument(
        "--data_dir",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"),
        help="MNIST for the Trainer rows (synthetic images when the folder is absent).",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    report = run(args)
    text = to_markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
