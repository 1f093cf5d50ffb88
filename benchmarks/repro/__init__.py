"""The reproduction harness behind ``benchmarks/reproduce.py``, in three parts.

- :mod:`repro.registry`: the experiments as data (:class:`Experiment`, :class:`Variant`, the flags per scale).
- :mod:`repro.running`: data preparation, the recorder callback, :func:`run_one`, :func:`run_grid`.
- :mod:`repro.reporting`: tables, claim checks, plots and :func:`report`.

``benchmarks/`` must be on ``sys.path``: it is when the script runs, and ``benchmarks/reproduce.py`` adds it
when it is loaded by path.
"""

from __future__ import annotations

from .registry import DEFAULT_DATA_DIR, EXPERIMENTS, RESULTS_DIR, ROOT, SCALES, Experiment, Variant, register
from .reporting import (
    PAGES,
    claim_checks,
    claim_verdict,
    experiment_table,
    final_label,
    ladder_lines,
    load_runs,
    page_of,
    per_seed_table,
    plot_experiment,
    report,
)
from .running import (
    ENTRY_POINT,
    git_commit,
    hardware,
    llama_recipe_argv,
    load_recipe,
    prepare_multi30k,
    prepare_wikitext,
    run_grid,
    run_one,
    run_path,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "ENTRY_POINT",
    "EXPERIMENTS",
    "PAGES",
    "RESULTS_DIR",
    "ROOT",
    "SCALES",
    "Experiment",
    "Variant",
    "claim_checks",
    "claim_verdict",
    "experiment_table",
    "final_label",
    "git_commit",
    "hardware",
    "ladder_lines",
    "per_seed_table",
    "llama_recipe_argv",
    "load_recipe",
    "load_runs",
    "page_of",
    "plot_experiment",
    "prepare_multi30k",
    "prepare_wikitext",
    "register",
    "report",
    "run_grid",
    "run_one",
    "run_path",
]
