"""Reporting: the Markdown tables, claim checks, the static-density ladder and the plots of every experiment.

:func:`report` renders ``<results_dir>/<page>.md`` and ``<experiment>.png`` from the run JSONs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .registry import EXPERIMENTS, Experiment


# ------------------------------------------------------------------------------------------------ report
def load_runs(results_dir: Path, scale: str = "cpu") -> list[dict[str, Any]]:
    runs = []
    for path in sorted((results_dir / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("scale") == scale:
            runs.append(record)
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else float("nan")
    )
    return mean, std


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# a run's active-neuron fraction, under the name its recipe gives it (MLP, LLaMA, translation)
_ACTIVE_KEYS = ("active_hidden_neurons", "active_mlp_neurons", "active_ffn_neurons")


def experiment_table(exp: Experiment, runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table (one row per variant, mean ± std over seeds) and the rows as dicts."""
    digits = _digits(exp)
    rows = []
    for var in exp.variants:
        mine = [r for r in runs if r["variant"] == var.name]
        if not mine:
            continue
        values = [float(r["metrics"][exp.metric]) for r in mine]
        mean, std = _mean_std(values)
        row = {
            "variant": var.name,
            "label": var.title,
            "seeds": sorted(r["seed"] for r in mine),
            "values": values,
            "mean": mean,
            "std": std,
            "density": _mean_std([float(r["metrics"].get("density", 1.0)) for r in mine])[0],
            "wall": _mean_std([float(r["wall_time_seconds"]) for r in mine])[0],
        }
        for key in _ACTIVE_KEYS:
            if key in mine[0]["metrics"]:
                row["active_values"] = [float(r["metrics"][key]) for r in mine]
                row["active"] = _mean_std(row["active_values"])
        for key in ("best_test_accuracy", "best_test_accuracy_after_t_end"):
            values = [r["metrics"].get(key) for r in mine]
            if all(v is not None for v in values):
                row[key] = _mean_std([float(v) for v in values])
        rows.append(row)
    best = (max if exp.higher_is_better else min)((r["mean"] for r in rows), default=None)
    active_header = {
        "mlp": "active hidden neurons",
        "llama": "active MLP neurons",
        "mt": "active FFN neurons",
    }
    best_columns = any("best_test_accuracy" in r for r in rows)
    extra_header = " best over epochs | best after t_end |" if best_columns else ""
    lines = [
        f"| method | {exp.metric_label} (mean ± std) | per seed | seeds |{extra_header} final density | "
        f"{active_header[exp.recipe]} | vs dense | wall time / run |",
        "|---|---:|---|---|" + ("---:|---:|" if best_columns else "") + "---:|---:|---:|---:|",
    ]
    dense = next((r["mean"] for r in rows if r["variant"] == "dense"), None)
    for row in rows:
        value = _fmt(row["mean"], row["std"], digits)
        if row["mean"] == best:
            value = f"**{value}**"
        per_seed = ", ".join(f"{v:.{digits}f}" for v in row["values"])
        active = _fmt(*row["active"], 3) if "active" in row else "-"
        vs_dense = "-" if dense is None or row["variant"] == "dense" else f"{row['mean'] - dense:+.{digits}f}"
        extra = ""
        if best_columns:
            extra = "".join(
                f" {_fmt(*row[k], digits)} |" if k in row else " - |"
                for k in ("best_test_accuracy", "best_test_accuracy_after_t_end")
            )
        lines.append(
            f"| {row['label']} | {value} | {per_seed} | {','.join(map(str, row['seeds']))} |{extra} "
            f"{row['density']:.4f} | {active} | {vs_dense} | {row['wall']:.0f} s |"
        )
    return "\n".join(lines), rows


def per_seed_table(exp: Experiment, runs: list[dict[str, Any]]) -> str:
    """Markdown table of every run (one row per variant and seed, in the page's order)."""
    digits = _digits(exp)
    labels = {v.name: v.title for v in exp.variants}
    lines = [
        f"| method | seed | {exp.metric_label} | best after t_end | active neurons | wall time | commit |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        metrics = r["metrics"]
        best = metrics.get("best_test_accuracy_after_t_end")
        active = next((metrics[k] for k in _ACTIVE_KEYS if k in metrics), None)
        lines.append(
            f"| {labels[r['variant']]} | {r['seed']} | {float(metrics[exp.metric]):.{digits}f} | "
            f"{'-' if best is None else f'{float(best):.{digits}f}'} | "
            f"{'-' if active is None else f'{float(active):.3f}'} | {float(r['wall_time_seconds']):.0f} s | "
            f"{r['git']['commit'][:7]} |"
        )
    return "\n".join(lines)


def _digits(exp: Experiment) -> int:
    return 2 if exp.metric in ("eval_perplexity", "test_bleu") else 4


def _compare(exp: Experiment, mine: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """``mine`` against ``best`` (two table rows): the gap (+ = mine better), its status against the seed
    spread ("agrees" / "disagrees" beyond 2x the largest seed std, else "not resolved", or "matches" when the
    claim only has to match ``best`` (``exp.match_rivals``) and ``mine`` is not worse on every seed) and the
    paired per-seed differences (the same seed shares data order and weight init across methods)."""
    sign = 1 if exp.higher_is_better else -1
    gap = sign * (mine["mean"] - best["mean"])
    stds = [r["std"] for r in (mine, best) if not math.isnan(r["std"])]
    spread = max(stds) if stds else float("nan")
    direction = "agrees" if gap > 0 else "ties" if gap == 0 else "disagrees"
    resolved = direction != "ties" and not math.isnan(spread) and abs(gap) > 2 * spread
    mine_by_seed = dict(zip(mine["seeds"], mine["values"], strict=True))
    best_by_seed = dict(zip(best["seeds"], best["values"], strict=True))
    paired = [
        sign * (mine_by_seed[k] - best_by_seed[k]) for k in sorted(set(mine_by_seed) & set(best_by_seed))
    ]
    same_sign = len(paired) >= 2 and (all(d > 0 for d in paired) or all(d < 0 for d in paired))
    status = direction if resolved or (math.isnan(spread) and gap != 0) else "not resolved"
    # a match: within the seed spread, and not worse on every seed (the paired differences are the finer test)
    worse_on_every_seed = same_sign and gap < 0
    if status == "not resolved" and not math.isnan(spread) and best["variant"] in exp.match_rivals:
        status = "not resolved" if worse_on_every_seed else "matches"
    return {
        "gap": gap,
        "spread": spread,
        "direction": direction,
        "status": status,
        "paired": paired,
        "same_sign": same_sign,
    }


def _paired_text(exp: Experiment, mine: dict[str, Any], c: dict[str, Any]) -> str:
    if len(c["paired"]) < 2:
        return ""
    digits = _digits(exp)
    return (
        f" Paired by seed (+ = {mine['label']} better): "
        f"{', '.join(f'{d:+.{digits}f}' for d in c['paired'])}"
        f" ({'same sign on every seed' if c['same_sign'] else 'mixed signs'})."
    )


def _claim_comparisons(exp: Experiment, rows: list[dict[str, Any]]):
    """(mine, rivals present, best rival, comparison) for every comparison of ``exp`` with finished rows."""
    by_name = {r["variant"]: r for r in rows}
    sign = 1 if exp.higher_is_better else -1
    for name, rivals in exp.comparisons:
        present = [by_name[v] for v in rivals if v in by_name]
        if name not in by_name or not present:
            continue
        mine = by_name[name]
        best = max(present, key=lambda r: sign * r["mean"])
        yield mine, present, best, _compare(exp, mine, best)


def claim_checks(exp: Experiment, rows: list[dict[str, Any]]) -> list[str]:
    """One line per comparison: does ``variant`` beat the best rival here, and is the gap beyond the seeds?"""
    digits = _digits(exp)
    lines = []
    for mine, present, best, c in _claim_comparisons(exp, rows):
        gap, spread, direction = c["gap"], c["spread"], c["direction"]
        if c["status"] == "matches":
            verdict = (
                f"**matches**, as the claim allows (gap within 2x the seed std, {spread:.{digits}f}; "
                f"leans {direction})"
            )
        elif direction == "ties":
            verdict = "**ties** (equal to the digits shown: neither agrees nor disagrees)"
        elif math.isnan(spread):
            verdict = f"**{direction}** with the paper (single seed, no spread estimate)"
        elif c["status"] != "not resolved":
            verdict = f"**{direction}** with the paper (gap > 2x the largest seed std, {spread:.{digits}f})"
        else:
            verdict = f"**not resolved** (gap within 2x the seed std, {spread:.{digits}f}; leans {direction})"
        rival_names = ", ".join(r["label"] for r in present)
        lines.append(
            f"- {mine['label']} vs the best of [{rival_names}] ({best['label']}): "
            f"{mine['mean']:.{digits}f} vs {best['mean']:.{digits}f}, "
            f"{'better' if gap > 0 else 'worse' if gap < 0 else 'equal'} "
            f"by {abs(gap):.{digits}f} -> {verdict}."
            f"{_paired_text(exp, mine, c)}"
        )
    active = _active_check(exp, rows)
    if active is not None:
        row, status = active
        mean, std = row["active"]
        lines.append(
            f"- {row['label']} leaves {_fmt(mean, std, 3)} of the hidden neurons active (per seed: "
            f"{', '.join(f'{v:.3f}' for v in row['active_values'])}); the claim says under "
            f"{exp.active_below:.0%} -> **{status}**."
        )
    return lines


def _active_check(exp: Experiment, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """``exp.verdict_variant``'s active-neuron fraction against the claim's bound: (row, agrees/disagrees)."""
    row = next((r for r in rows if r["variant"] == exp.verdict_variant), None)
    if exp.active_below is None or row is None or "active" not in row:
        return None
    return row, "agrees" if max(row["active_values"]) < exp.active_below else "disagrees"


def claim_verdict(exp: Experiment, rows: list[dict[str, Any]]) -> list[str]:
    """The overall verdict on the claim from its comparisons: reproduced only if every one agrees beyond the
    seed spread (or matches, where the claim only asks to match), not reproduced if one disagrees beyond it,
    else not resolved (also when some are missing)."""
    about = exp.verdict_variant
    found = [f for f in _claim_comparisons(exp, rows) if not about or f[0]["variant"] == about]
    if not found:
        return []
    statuses = [c["status"] for *_, c in found]
    expected = [c for c in exp.comparisons if not about or c[0] == about]
    complete = len(found) == len(expected)
    active = _active_check(exp, rows)
    if active is not None:
        statuses.append(active[1])
    if "disagrees" in statuses:
        verdict = "**not reproduced** at this budget"
    elif complete and all(s in ("agrees", "matches") for s in statuses):
        verdict = "**reproduced** at this budget"
    else:
        verdict = "**not resolved** at this budget"
    kinds = ("agrees", "matches", "disagrees", "not resolved")
    counts = ", ".join(f"{statuses.count(k)} {k}" for k in kinds if k != "matches" or k in statuses)
    missing = "" if complete else f"; {len(expected) - len(found)} comparison(s) lack their runs"
    whose = f" for {found[0][0]['label']}" if about else ""
    return [f"Verdict on the claim{whose}: {verdict} (of its {len(statuses)} checks: {counts}{missing})."]


def ladder_lines(exp: Experiment, rows: list[dict[str, Any]]) -> list[str]:
    """The static-density ladder (``exp.ladder``, increasing density): how the metric moves with density,
    which regime that puts the budget in, and plainly whether dense beats ``exp.ladder_rival``."""
    by_name = {r["variant"]: r for r in rows}
    steps = [by_name[v] for v in exp.ladder if v in by_name]
    if len(steps) < 2:
        return []
    digits = _digits(exp)
    sign = 1 if exp.higher_is_better else -1
    values = ", ".join(f"{r['density']:.0%} {_fmt(r['mean'], r['std'], digits)}" for r in steps)
    better = [sign * (b["mean"] - a["mean"]) > 0 for a, b in zip(steps, steps[1:], strict=False)]
    if all(better):
        regime = (
            "every step up in density helps: this budget is in the capacity-limited regime, the one in which "
            "the paper compares methods"
        )
    elif not any(better):
        regime = (
            "every step up in density hurts: this budget is in the early, under-trained regime (fewer "
            "weights fit faster), not the capacity-limited regime of converged models in which the paper "
            "compares methods"
        )
    else:
        regime = "the metric is not monotone in density: the ladder does not place this budget in one regime"
    lines = [f"- Static-density ladder ({exp.metric_label}, density: value): {values}. Reading: {regime}."]
    dense, rival = by_name.get("dense"), by_name.get(exp.ladder_rival)
    if dense is not None and rival is not None:
        c = _compare(exp, dense, rival)
        answer = "**Yes**" if c["gap"] > 0 else "**No**"
        noise = "" if c["status"] != "not resolved" else " (within 2x the seed std)"
        lines.append(
            f"- Does dense beat {rival['label']} at this budget? {answer}{noise}: "
            f"{dense['mean']:.{digits}f} vs {rival['mean']:.{digits}f}.{_paired_text(exp, dense, c)}"
        )
    return lines


def _curve(record: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in record["log_history"]:
        if key in entry and "step" in entry:
            value = float(entry[key])
            if math.isfinite(value):
                steps.append(int(entry["step"]))
                values.append(value)
    return steps, values


def _last_step(record: dict[str, Any]) -> int:
    return max((int(e.get("step", 0)) for e in record["log_history"]), default=1)


def plot_experiment(
    exp: Experiment, runs: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: Path
) -> list[Path]:
    """Training curves, density and active neurons over time, final metric vs method; returns the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10" if len(exp.variants) <= 10 else "tab20")
    order = {v.name: i for i, v in enumerate(exp.variants)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    eval_key = {"llama": "eval_loss", "mlp": None, "mt": None}[exp.recipe]
    first_seed = min(r["seed"] for r in runs)
    if len(runs) > 12:  # keep the curves readable: one seed; the bar chart shows every seed
        runs = [r for r in runs if r["seed"] == first_seed]
        fig.text(0.01, 0.005, f"Curves: seed {first_seed} only; bars and dots: all seeds.", fontsize=9)
    ax = axes[0, 0]
    for record in runs:
        i = order[record["variant"]]
        steps, loss = _curve(record, "loss")
        style = "-" if record["seed"] == first_seed else "--"
        ax.plot(
            steps,
            loss,
            style,
            color=colors(i % colors.N),
            label=f"{record['label']} s{record['seed']}",
            lw=1.3,
        )
    late = [v for r in runs for st, v in zip(*_curve(r, "loss"), strict=True) if st >= 0.2 * _last_step(r)]
    if late:
        ax.set_ylim(min(late) - 0.05 * (max(late) - min(late) + 1e-3), max(late) * 1.05)
    ax.set(title="training loss (y axis from 20% of training on)", xlabel="optimizer step", ylabel="loss")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    if eval_key:
        for record in runs:
            i = order[record["variant"]]
            steps, loss = _curve(record, eval_key)
            ppl = [math.exp(v) for v in loss]
            style = "-" if record["seed"] == first_seed else "--"
            ax.plot(
                steps,
                ppl,
                style + "o",
                ms=3,
                color=colors(i % colors.N),
                label=f"{record['label']} s{record['seed']}",
            )
        ax.set(title="validation perplexity", xlabel="optimizer step", ylabel="perplexity", yscale="log")
        ax.legend(fontsize=7, ncol=2)
    else:
        for record in runs:
            i = order[record["variant"]]
            trace = record["trace"]
            active = [t.get("active_neurons", 1.0) for t in trace]
            ax.plot([t["step"] for t in trace], active, color=colors(i % colors.N),
                    label=f"{record['label']} s{record['seed']}")  # fmt: skip
        ax.set(
            title=f"fraction of active {'FFN' if exp.recipe == 'mt' else 'hidden'} neurons",
            xlabel="optimizer step",
            ylabel="active",
            ylim=(0, 1.05),
        )
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    for record in runs:
        i = order[record["variant"]]
        trace = record["trace"]
        ax.plot([t["step"] for t in trace], [t["density"] for t in trace], color=colors(i % colors.N),
                label=f"{record['label']} s{record['seed']}")  # fmt: skip
        if eval_key:
            ax.plot([t["step"] for t in trace], [t.get("active_neurons", 1.0) for t in trace], ":",
                    color=colors(i % colors.N))  # fmt: skip
    title = "density of the sparse layers" + (" (solid) and active MLP neurons (dotted)" if eval_key else "")
    ax.set(
        title=title,
        xlabel="optimizer step",
        ylabel="fraction",
        yscale="log" if exp.recipe == "mlp" else "linear",
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    labels = [r["label"] for r in rows]
    means = [r["mean"] for r in rows]
    errs = [0 if math.isnan(r["std"]) else r["std"] for r in rows]
    ax.bar(
        range(len(rows)),
        means,
        yerr=errs,
        color=[colors(order[r["variant"]] % colors.N) for r in rows],
        capsize=4,
    )
    for j, row in enumerate(rows):
        ax.scatter([j] * len(row["values"]), row["values"], color="black", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), labels, rotation=20 if len(rows) <= 8 else 40, ha="right", fontsize=9)
    if means:
        lo, hi = min(min(r["values"]) for r in rows), max(max(r["values"]) for r in rows)
        pad = (hi - lo) * 0.3 + 1e-6
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set(title=f"{final_label(exp)} (bars: mean, dots: seeds)", ylabel=exp.metric_label)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(exp.title)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{exp.name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def final_label(exp: Experiment) -> str:
    """'final <metric>' for the bar chart, without doubling a label that already says 'final'."""
    label = exp.metric_label
    return label if label.lower().startswith("final") else f"final {label}"


# Experiments rendered into another experiment's page, above its (earlier) results: page -> (the page's
# title, its sections in order).
PAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mlp_mnist": (
        "MLP 784-1000-1000-1000-10 on MNIST at 1% density: the paper's budget, then the shorter research "
        "recipe runs, then the earlier setting",
        ("mlp_mnist_paper", "mlp_mnist_research", "mlp_mnist"),
    ),
    "llama_lm": (
        "LLaMA (9M shape) on WikiText-2 at 30% density: the research LR schedule, then the earlier harness",
        ("llama_lm_research", "llama_lm"),
    ),
}


def page_of(name: str) -> str:
    """The page (``<page>.md``) experiment ``name`` is rendered into: a :data:`PAGES` key or its own name."""
    return next((page for page, (_, names) in PAGES.items() if name in names), name)


def report(results_dir: Path, scale: str = "cpu") -> dict[str, list[dict[str, Any]]]:
    """Write ``<page>.md`` and ``<experiment>.png`` for every experiment with finished runs.

    An experiment's page is its own name, or the page of :data:`PAGES` that lists it (the newer setting
    first, the earlier results below it, labelled).
    """
    runs = load_runs(results_dir, scale)
    tables = {}
    sections: dict[str, dict[str, list[str]]] = {}
    for exp in EXPERIMENTS.values():
        order = {v.name: i for i, v in enumerate(exp.variants)}
        mine = sorted(
            (r for r in runs if r["experiment"] == exp.name), key=lambda r: (order[r["variant"]], r["seed"])
        )
        if not mine:
            continue
        table, rows = experiment_table(exp, mine)
        tables[exp.name] = rows
        plots = plot_experiment(exp, mine, rows, results_dir)
        verdict = claim_verdict(exp, rows) if exp.verdict else []
        ladder = ladder_lines(exp, rows)
        first = mine[0]
        hw = first["hardware"]
        load = [round(x, 1) for x in hw["load_average_at_start"] or []]
        lines = [
            f"# {exp.title}",
            "",
            f"Paper claim (docs/method.md section 7): {exp.claim}",
            "",
            *([exp.notes, ""] if exp.notes else []),
            table,
            "",
            "Claim check on these numbers (mean over seeds):",
            "",
            *(claim_checks(exp, rows) or ["- (not enough variants finished to compare)"]),
            "",
            *([*verdict, ""] if verdict else []),
            *(["Which regime is this budget in?", "", *ladder, ""] if ladder else []),
            *(["Every run:", "", per_seed_table(exp, mine), ""] if exp.per_seed else []),
            f"![{exp.name}]({plots[0].name})",
            "",
            "## Setting",
            "",
            f"- Same budget for every method: {_budget(first)}.",
            f"- Seeds: {sorted({r['seed'] for r in mine})} (the seed drives data order, weight init and "
            "topology).",
            f"- Ran on: {hw['cpu']} ({hw['cpu_count']} cores shared with other jobs, no GPU), "
            f"{hw['torch_threads']} torch thread(s) per run, 1-4 runs of the grid in parallel, "
            f"load average at the first run's start {load} (wall times are only indicative on this "
            f"shared CPU); torch {hw['torch']}, transformers {hw['transformers']}; git "
            f"{first['git']['commit']} of the first run, each JSON has its own "
            f"({'dirty' if first['git']['dirty'] else 'clean'}).",
            f"- Base flags (scale `{scale}`): `{json.dumps(exp.base[scale])}`.",
            "- Full configuration of each run (recipe argv, SparseTrainingConfig, TrainingArguments), its "
            f"log history and traces: `runs/{exp.name}__<variant>__s<seed>.json`.",
            "",
            "## Commands",
            "",
            "```bash",
            f"python benchmarks/reproduce.py run --experiment {exp.name} --seeds "
            f"{' '.join(map(str, sorted({r['seed'] for r in mine})))} --jobs 2",
            "python benchmarks/reproduce.py report",
            "```",
        ]
        sections.setdefault(page_of(exp.name), {})[exp.name] = lines
    for page, parts in sections.items():
        title, order = PAGES.get(page, (None, (page,)))
        names = [n for n in order if n in parts]
        text = [f"# {title}", ""] if len(names) > 1 else []
        for i, name in enumerate(names):
            lines = list(parts[name])
            if len(names) > 1:  # sections of a shared page: one level down, the earlier ones labelled
                label = "" if i == 0 else "Earlier results: "
                lines = [("#" + line if line.startswith("#") else line) for line in lines]
                lines[0] = f"## {label}{lines[0][3:]}"
            text += [*lines, ""]
        (results_dir / f"{page}.md").write_text("\n".join(text).rstrip("\n") + "\n", encoding="utf-8")
    return tables


def _budget(record: dict[str, Any]) -> str:
    args = record["config"].get("training_args", {})
    step = record["metrics"].get("global_step")
    batch = args.get("per_device_train_batch_size")
    text = f"{step} optimizer steps of batch {batch}"
    if EXPERIMENTS[record["experiment"]].recipe == "llama":
        seq = record["config"]["data"].get("max_seq_length")
        text += f" x {seq} tokens = {step * batch * seq:,} training tokens"
    return text
