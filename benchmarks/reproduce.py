#!/usr/bin/env python
"""Reproduce the paper's headline comparisons (arXiv 2501.19107, docs/method.md section 7) at a small scale.

Four named experiments, each a grid of (variant, seed) runs that share one budget of steps / tokens:

- ``mlp_mnist``    MLP 784-1000-1000-1000-10 on MNIST at 1% density: dense, SET, RigL, CHT, CHTs, CHTss.
- ``llama_lm``     a tiny LLaMA (the 9M shape) on WikiText-2 at 30% density: dense, SET, RigL, MEST, GraNet,
                   CHT, CHTs, CHTss (validation perplexity on the WikiText-2 validation split).
- ``brf_ablation`` CHTs on llama_lm's setting with BRF r in {0, 0.3, 0.6, 1.0}, ER and BSW initialisation.
- ``mt_multi30k``  a small Marian encoder-decoder on Multi30k en->de at 5% density: dense, CHTss, SET (BLEU).

Every run calls the matching recipe's ``main()`` (recipes/mlp_image_classification.py,
recipes/llama_pretrain.py, recipes/transformer_translation.py) unchanged, with a recorder callback added
to its Trainer, and writes ``benchmarks/results/runs/<experiment>__<variant>__s<seed>.json``: the final
metrics, the Trainer's log history, density and active neurons over time, wall time, hardware, git
commit, seed and the full configuration (recipe arguments, sparse-training config, TrainingArguments).
``report`` renders ``benchmarks/results/<experiment>.md`` tables and PNG plots from those files.

Commands (from the repository root; the data is read from ``../shared/data`` unless ``--data_dir`` is given):

    python benchmarks/reproduce.py list
    python benchmarks/reproduce.py run --experiment mlp_mnist --seeds 0 1 --jobs 2
    python benchmarks/reproduce.py run --experiment llama_lm --seeds 0 --jobs 2
    python benchmarks/reproduce.py run --experiment llama_lm --seeds 1 --variants dense set rigl chts chtss
    python benchmarks/reproduce.py run --experiment brf_ablation --seeds 0 --jobs 2
    python benchmarks/reproduce.py run --experiment mt_multi30k --seeds 0 --jobs 2
    python benchmarks/reproduce.py report
    # the smallest configuration of every experiment, a few steps each (what tests/test_reproduce.py runs):
    python benchmarks/reproduce.py run --experiment all --scale smoke --results_dir /tmp/repro_smoke

Finished runs are skipped (their JSON exists) unless ``--force``. ``--scale cpu`` (the default) is the reduced
setting sized for a shared 2-core CPU; ``--scale smoke`` a few steps on tiny data (synthetic when the shared
data is absent).

Every run trains on one torch thread. Run as a script, this file sets ``OMP_NUM_THREADS=1`` and
``MKL_NUM_THREADS=1`` (unless they are set) before torch is imported, so the runs of ``--jobs 1`` (in this
process) get the same single-thread pools as the subprocesses of ``--jobs 2`` and more:
``torch.set_num_threads(1)`` alone left OpenMP's other threads spinning.

The harness itself is the package ``benchmarks/repro/`` (``registry.py``: the experiments as data;
``running.py``: data preparation, recording, the runs; ``reporting.py``: tables, claim checks, plots);
this file is its command line.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before anything imports torch (see above); not when a test loads this file
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests): make `repro` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from repro import (  # noqa: E402
    DEFAULT_DATA_DIR,
    EXPERIMENTS,
    RESULTS_DIR,
    SCALES,
    report,
    run_grid,
    run_one,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="List the experiments, their variants and default seeds.")
    for name in ("run", "_one"):
        p = sub.add_parser(
            name, help="Run an experiment grid (missing runs only)." if name == "run" else argparse.SUPPRESS
        )
        p.add_argument("--experiment", nargs="+", required=True, help=f"{list(EXPERIMENTS)} or 'all'.")
        p.add_argument("--variants", nargs="+", default=None, help="Subset of the variants (default: all).")
        p.add_argument("--seeds", nargs="+", type=int, default=None, help="Default: the experiment's seeds.")
        p.add_argument("--scale", choices=SCALES, default="cpu")
        p.add_argument("--jobs", type=int, default=1, help="Runs in parallel (subprocesses, 1 thread each).")
        p.add_argument("--force", action="store_true", help="Re-run runs whose JSON exists.")
        p.add_argument(
            "--data_dir", default=str(DEFAULT_DATA_DIR), help="Shared data folder (../shared/data)."
        )
        p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "hf_chts_reproduce"),
                       help="Prepared data, caches, recipe outputs and logs.")  # fmt: skip
        p.add_argument("--results_dir", default=str(RESULTS_DIR))
        p.add_argument(
            "--no_report", action="store_true", help="Do not render the tables and plots afterwards."
        )
    p = sub.add_parser("report", help="Render benchmarks/results/*.md and *.png from the run JSONs.")
    p.add_argument("--results_dir", default=str(RESULTS_DIR))
    p.add_argument("--scale", choices=SCALES, default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for exp in EXPERIMENTS.values():
            print(
                f"{exp.name}: {exp.title}; variants {[v.name for v in exp.variants]}; seeds {list(exp.seeds)}"
            )
        return 0
    if args.command == "report":
        for name, rows in report(Path(args.results_dir), args.scale).items():
            print(name, {r["variant"]: round(r["mean"], 4) for r in rows})
        return 0
    experiments = list(EXPERIMENTS) if args.experiment == ["all"] else args.experiment
    for name in experiments:
        if name not in EXPERIMENTS:
            raise SystemExit(f"Unknown experiment {name!r}; choose from {list(EXPERIMENTS)} or 'all'.")
    paths = (Path(args.data_dir), Path(args.work_dir), Path(args.results_dir))
    if args.command == "_one":
        run_one(experiments[0], args.variants[0], args.seeds[0], args.scale, *paths)
        return 0
    run_grid(experiments, args.variants, args.seeds, args.scale, *paths, jobs=args.jobs, force=args.force)
    if not args.no_report:
        report(Path(args.results_dir), args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
