"""Zero-shot evaluation of (sparse) causal LMs with lm-eval-harness, online or fully offline.

The model is wrapped in lm-eval's ``HFLM`` as an in-memory object, so a sparse model (masks as buffers,
masked weights exactly 0) is evaluated exactly as it trains. Three sources of tasks:

- lm-eval's own tasks, by name (the paper's set by default: :data:`PAPER_TASKS`); their data comes from the
  Hugging Face Hub, so they need a connection or a filled ``datasets`` cache;
- tasks shipped with hf_chts under ``hf_chts/data/tasks``:

  - ``hf_chts_tiny_mc``: 20 multiple-choice items with their data, for tests and smoke runs;
  - ``<task>_local`` definitions (``arc_easy_local``, ``arc_challenge_local``, ``piqa_local``,
    ``openbookqa_local``, ``boolq_local``, ``winogrande_local``, ``hellaswag_local``,
    ``lambada_openai_local``) for local files: llm-foundry ICL jsonl (``{"query", "choices", "gold"}``,
    WinoGrande ``{"context_options", "continuation", "gold"}``, LAMBADA ``{"context", "continuation"}``)
    and the original HellaSwag jsonl. Point ``local_data_dir`` at a folder holding such files (searched
    recursively by file name, e.g. ``arc_easy.jsonl``); with it, a paper task name (``arc_easy``) means its
    local version;
- your own YAML task folders (``include_path``), read by lm-eval's ``TaskManager``.

A shipped YAML names its data as ``${HF_CHTS_TASK_DIR}/...`` or ``${HF_CHTS_DATA_FILE}``; at run time the
definitions are written, with absolute paths filled in, to a temporary folder given to ``TaskManager`` as
``include_path``. So the tasks work wherever the package is installed, and with ``HF_DATASETS_OFFLINE=1``
and ``HF_HUB_OFFLINE=1``.

Example:
    >>> from hf_chts.evaluation import evaluate
    >>> results = evaluate(model, tokenizer, tasks=["hf_chts_tiny_mc"], output_dir="eval")  # doctest: +SKIP
    >>> results["results"]["hf_chts_tiny_mc"]["acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "hellaswag", "winogrande", "openbookqa")
TASKS_DIR = Path(__file__).resolve().parent / "data" / "tasks"
RESULTS_JSON = "zero_shot_results.json"
RESULTS_MD = "zero_shot_results.md"
# metrics shown in the markdown table, in this order, when a task reports them
TABLE_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "exact_match")
_HEADER = re.compile(r"#\s*hf_chts:\s*(.*)")
_INSTALL_HINT = "Zero-shot evaluation needs lm-eval: pip install 'hf_chts[eval]' (or pip install lm-eval)."

__all__ = [
    "PAPER_TASKS",
    "LocalTask",
    "packaged_tasks",
    "local_tasks",
    "available_local_tasks",
    "resolve_tasks",
    "evaluate",
    "summarize_results",
    "results_to_markdown",
    "save_results",
]


@dataclass(frozen=True)
class LocalTask:
    """A shipped task definition for local files.

    Attributes:
        name: lm-eval task name (``arc_easy_local``).
        alias: the lm-eval task it stands in for (``arc_easy``).
        patterns: file-name patterns searched recursively under ``local_data_dir``.
        template: the YAML template shipped in ``hf_chts/data/tasks/local``.
    """

    name: str
    alias: str
    patterns: tuple[str, ...]
    template: Path

    def find(self, data_dir: str | os.PathLike) -> Path | None:
        """The first file (sorted) under ``data_dir`` matching one of the patterns, or None."""
        for pattern in self.patterns:
            hits = sorted(p for p in Path(data_dir).rglob(pattern) if p.is_file())
            if hits:
                return hits[0]
        return None


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err


def packaged_tasks() -> dict[str, Path]:
    """Self-contained tasks shipped with hf_chts (``{name: folder}``), e.g. ``hf_chts_tiny_mc``."""
    return {p.parent.name: p.parent for p in sorted(TASKS_DIR.glob("*/*.yaml")) if p.parent.name != "local"}


def local_tasks() -> dict[str, LocalTask]:
    """Every shipped local-file task definition, by name (read from the YAML headers)."""
    tasks = {}
    for template in sorted((TASKS_DIR / "local").glob("*.yaml")):
        header = {}
        for line in template.read_text().splitlines():
            match = _HEADER.match(line)
            if match:
                header.update(kv.split("=", 1) for kv in match.group(1).split())
        name = template.stem
        tasks[name] = LocalTask(
            name=name,
            alias=header.get("alias", name),
            patterns=tuple(header.get("data_file", name + ".jsonl").split(",")),
            template=template,
        )
    return tasks


def available_local_tasks(local_data_dir: str | os.PathLike) -> dict[str, Path]:
    """The local tasks whose data file exists under ``local_data_dir``: ``{task name: data file}``."""
    data_dir = Path(local_data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"local_data_dir {str(data_dir)!r} is not a folder.")
    found = {}
    for name, task in local_tasks().items():
        path = task.find(data_dir)
        if path is not None:
            found[name] = path
    return found


def _materialize(out_dir: Path, local_data_dir: str | os.PathLike | None) -> dict[str, str]:
    """Write the shipped YAMLs with absolute data paths into ``out_dir``; return ``{task: source}``."""
    written: dict[str, str] = {}
    for name, folder in packaged_tasks().items():
        target = out_dir / name
        target.mkdir(parents=True)
        for path in folder.iterdir():
            if path.suffix == ".yaml":
                text = path.read_text().replace("${HF_CHTS_TASK_DIR}", str(folder))
                (target / path.name).write_text(text)
            elif path.suffix == ".py":
                shutil.copy(path, target / path.name)
        written[name] = str(folder)
    if local_data_dir is not None:
        target = out_dir / "local"
        target.mkdir()
        for helper in (TASKS_DIR / "local").glob("*.py"):
            shutil.copy(helper, target / helper.name)
        tasks = local_tasks()
        for name, data_file in available_local_tasks(local_data_dir).items():
            text = tasks[name].template.read_text().replace("${HF_CHTS_DATA_FILE}", str(data_file.resolve()))
            (target / f"{name}.yaml").write_text(text)
            written[name] = str(data_file)
    return written


def _unknown_task_error(unknown: Sequence[str], known: Iterable[str], local: Iterable[str]) -> ValueError:
    known = list(known)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        if close:
            hints.append(f"{name!r}: did you mean {', '.join(close)}?")
    local = sorted(local)
    return ValueError(
        f"Unknown zero-shot task(s) {', '.join(map(repr, unknown))}. "
        + (" ".join(hints) + " " if hints else "")
        + f"Offline tasks available here: {', '.join(local) or '(none)'}. "
        f"Paper tasks (lm-eval, data from the Hub): {', '.join(PAPER_TASKS)}. "
        f"Shipped local-file tasks (need --local_data_dir with their files): {', '.join(local_tasks())}. "
        "Add your own YAML tasks with include_path; `lm-eval ls tasks` lists every lm-eval task."
    )


def resolve_tasks(
    tasks: Sequence[str] | str | None,
    *,
    task_dir: str | os.PathLike,
    local_data_dir: str | os.PathLike | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_lm_eval_tasks: bool = True,
) -> tuple[list[str], Any]:
    """Turn task names into lm-eval names and a ``TaskManager``, failing early on unknown names.

    Args:
        tasks: names (list or comma-separated string). None: every local task found under
            ``local_data_dir`` if given, else :data:`PAPER_TASKS`.
        task_dir: an empty folder that receives the shipped definitions with absolute paths; it must live
            until the evaluation has loaded its data.
        local_data_dir: folder with local data files (see the module docstring); a paper task name whose
            local version has a file there is mapped to it (``arc_easy`` -> ``arc_easy_local``).
        include_path: extra folder(s) of YAML task definitions.
        include_lm_eval_tasks: also index lm-eval's own tasks (about 8 s); skipped automatically when every
            requested name is a shipped or ``include_path`` task.

    Returns:
        ``(names, task_manager)``.

    Raises:
        ValueError: an unknown name, listing the available ones and close matches.
    """
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    task_dir = Path(task_dir)
    written = _materialize(task_dir, local_data_dir)
    extra = (
        []
        if include_path is None
        else [include_path]
        if isinstance(include_path, (str, Path))
        else list(include_path)
    )
    for path in extra:
        if not Path(path).exists():
            raise FileNotFoundError(f"include_path {str(path)!r} does not exist.")
    paths = [str(task_dir), *map(str, extra)]

    if tasks is None:
        local_found = [n for n in written if n.endswith("_local")]
        names = local_found if local_data_dir is not None else list(PAPER_TASKS)
        if not names:
            raise ValueError(
                f"No local task data found under {str(local_data_dir)!r}. Expected files named like "
                + ", ".join(sorted({p for t in local_tasks().values() for p in t.patterns}))
                + "; or pass tasks explicitly."
            )
    else:
        names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
        if not names:
            raise ValueError("`tasks` is empty; give at least one task name, e.g. 'hf_chts_tiny_mc'.")
    if local_data_dir is not None:
        by_alias = {t.alias: t.name for t in local_tasks().values() if t.name in written}
        names = [by_alias.get(n, n) for n in names]
    names = list(dict.fromkeys(names))

    manager = TaskManager(include_path=paths, include_defaults=False)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown and include_lm_eval_tasks:
        manager = TaskManager(include_path=paths, include_defaults=True)
        unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise _unknown_task_error(unknown, manager.all_tasks, written)
    return names, manager


def _load_model_and_tokenizer(model: Any, tokenizer: Any, device: str | None):
    import torch

    if isinstance(model, (str, os.PathLike)):
        from .compact import load_sparse_model

        folder = Path(model)
        model = load_sparse_model(folder, device=device or "cpu")
        if tokenizer is None:
            tokenizer = folder
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load a tokenizer from {str(tokenizer)!r}; pass `tokenizer=` (--tokenizer) with a "
                "local tokenizer folder."
            ) from err
    if tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is a model object.")
    if device is not None:
        model = model.to(device)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"`model` must be a model object or a checkpoint folder, got {type(model).__name__}."
        )
    return model.eval(), tokenizer


def summarize_results(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``results`` block as ``{task: {metric: value, metric_stderr: value, "n_samples": n}}``.

    Filter suffixes (``,none``) are dropped; stderr values that lm-eval reports as ``"N/A"`` become None.
    """
    n_samples = raw.get("n-samples", {})
    summary: dict[str, dict[str, Any]] = {}
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "," not in key:
                continue
            metric, _, flt = key.partition(",")
            metric = metric if flt == "none" else f"{metric} ({flt})"
            row[metric] = None if value == "N/A" else value
        if task in n_samples:
            row["n_samples"] = n_samples[task].get("effective")
        summary[task] = row
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def results_to_markdown(results: dict[str, Any]) -> str:
    """A markdown table (one row per task, columns acc / acc_norm / perplexity ... with ± stderr)."""
    rows = results["results"]
    metrics = [m for m in TABLE_METRICS if any(m in r for r in rows.values())]
    lines = ["| task | n | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for task, row in rows.items():
        cells = []
        for metric in metrics:
            value, err = row.get(metric), row.get(f"{metric}_stderr")
            cells.append(_fmt(value) + (f" ± {_fmt(err)}" if err is not None and value is not None else ""))
        lines.append(f"| {task} | {_fmt(row.get('n_samples'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_results(results: dict[str, Any], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``zero_shot_results.json`` and ``.md`` into ``output_dir``; return both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    md_path.write_text(results_to_markdown(results))
    return json_path, md_path


def _fitting_lm(model: Any, tokenizer: Any, batch_size: int | str) -> Any:
    """lm-eval's ``HFLM``, except that a continuation longer than the model's context is scored on its last
    ``max_length`` tokens (and counted in ``lm.truncated``) instead of failing lm-eval's bare assertion."""
    from lm_eval.models.huggingface import HFLM

    class FittingHFLM(HFLM):
        truncated = 0
        scored = 0

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            fitted = []
            for key, context, continuation in requests:
                if len(continuation) > self.max_length:
                    continuation = continuation[-self.max_length :]
                    self.truncated += 1
                fitted.append((key, context, continuation))
            self.scored += len(fitted)
            return super()._loglikelihood_tokens(fitted, *args, **kwargs)

    return FittingHFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records ``git describe`` of the working directory, whose error outside a repository would
    reach the terminal; run it with its stderr discarded."""
    import lm_eval.evaluator as lm_evaluator

    def git_hash() -> str | None:
        try:
            out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
        except (subprocess.CalledProcessError, OSError):
            return None
        return out.strip().decode() or None

    original = getattr(lm_evaluator, "get_git_commit_hash", None)
    lm_evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        if original is not None:
            lm_evaluator.get_git_commit_hash = original


def evaluate(
    model: Any,
    tokenizer: Any = None,
    tasks: Sequence[str] | str | None = None,
    *,
    local_data_dir: str | os.PathLike | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    output_dir: str | os.PathLike | None = None,
    include_lm_eval_tasks: bool = True,
    seed: int = 1234,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Zero-shot (or few-shot) evaluation of a causal LM with lm-eval's ``HFLM``.

    Args:
        model: a ``PreTrainedModel`` (evaluated in memory) or a checkpoint folder (``save_pretrained`` or
            compact format; masks restored).
        tokenizer: tokenizer object or folder; default the checkpoint folder when ``model`` is a folder.
        tasks: task names (see :func:`resolve_tasks`); default the paper's tasks, or every local task found
            under ``local_data_dir``.
        local_data_dir: folder with local data files for the ``*_local`` tasks.
        include_path: extra folder(s) of lm-eval YAML task definitions.
        num_fewshot (`int`, defaults to 0): in-context examples per item.
        limit: at most this many items per task (an int), or a fraction (a float < 1). None: all.
        batch_size (`int` or `"auto"`, defaults to 8).
        device: move the model there first (``"cuda"``, ``"cpu"``); default: leave it where it is.
        output_dir: when given, write ``zero_shot_results.json`` and ``zero_shot_results.md`` there.
        include_lm_eval_tasks (`bool`, defaults to True): allow lm-eval's own task names.
        seed (`int`, defaults to 1234): lm-eval's random, numpy, torch and few-shot seeds.
        bootstrap_iters (`int`, defaults to 1000): bootstrap resamples for non-mean metrics' stderr.

    Returns:
        ``{"results": {task: {metric: value, metric_stderr: value, "n_samples": n}}, "config": {...},
        "lm_eval_version": str, "date": str}``.

    Raises:
        ValueError: unknown task names (before any model call), or a missing tokenizer.
        ImportError: lm-eval is not installed (with the install command).
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate

    model, tokenizer = _load_model_and_tokenizer(model, tokenizer, device)
    with tempfile.TemporaryDirectory(prefix="hf_chts_tasks_") as task_dir:
        names, manager = resolve_tasks(
            tasks,
            task_dir=task_dir,
            local_data_dir=local_data_dir,
            include_path=include_path,
            include_lm_eval_tasks=include_lm_eval_tasks,
        )
        lm = _fitting_lm(model, tokenizer, batch_size)
        with _quiet_git_hash():
            raw = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    if raw is None:  # non-zero ranks under a distributed launch
        return {}
    if lm.truncated:
        logger.warning(
            "hf_chts: %d of %d scored continuations were longer than the model's context (%d tokens) and "
            "were scored on their last %d tokens; their items' accuracies are approximate.",
            lm.truncated,
            lm.scored,
            lm.max_length,
            lm.max_length,
        )
    import lm_eval

    results = {
        "results": summarize_results(raw),
        "config": {
            "model": getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
            "tasks": names,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "seed": seed,
            "local_data_dir": None if local_data_dir is None else str(local_data_dir),
            "truncated_continuations": lm.truncated,
        },
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if output_dir is not None:
        save_results(results, output_dir)
    return results
