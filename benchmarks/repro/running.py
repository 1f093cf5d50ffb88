"""Running the experiments: data preparation, the recorder callback, one run, a grid of runs, provenance.

Every run calls the matching recipe's ``main()`` unchanged, with a recorder callback added to its Trainer,
and writes ``<results_dir>/runs/<experiment>__<variant>__s<seed>.json``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .registry import EXPERIMENTS, ROOT

ENTRY_POINT = ROOT / "benchmarks" / "reproduce.py"
"""The command-line script; ``run_grid(jobs > 1)`` starts one ``_one`` subprocess of it per run."""


# ------------------------------------------------------------------------------------------------ provenance
def git_commit() -> dict[str, Any]:
    """HEAD commit and whether the working tree differs from it (untracked files count)."""

    def _git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": _git("rev-parse", "HEAD") or None, "dirty": bool(_git("status", "--porcelain"))}


def hardware() -> dict[str, Any]:
    """Where a run executed: CPU model, cores, torch threads, load, accelerator, library versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ------------------------------------------------------------------------------------------------ data
def _mnist_dir(data_dir: Path) -> Path | None:
    folder = data_dir / "mnist"
    return folder if (folder / "t10k-labels-idx1-ubyte.gz").is_file() else None


def prepare_wikitext(data_dir: Path, work_dir: Path, scale: str) -> tuple[str, str]:
    """Plain-text copies of WikiText-2 (tokenized v1) train/valid that the llama recipe reads as ``.txt``.

    The cpu scale keeps the first 12,000 lines of train (about 1/3 of it, ~0.9M words: more than the
    240 x 8 x 128-token budget sees); paragraphs stay separated by blank lines (the recipe's documents).
    Without the shared data (tests) a small synthetic English-like text is written instead.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    train_out, valid_out = (
        work_dir / f"wikitext2_train_{scale}.txt",
        work_dir / f"wikitext2_valid_{scale}.txt",
    )
    if train_out.is_file() and valid_out.is_file():
        return str(train_out), str(valid_out)
    source = data_dir / "wikitext2"
    max_lines = 12000 if scale == "cpu" else 600
    if (source / "wiki.train.tokens.gz").is_file() and (source / "wiki.valid.tokens").is_file():
        with gzip.open(source / "wiki.train.tokens.gz", "rt", encoding="utf-8") as handle:
            train = [line for _, line in zip(range(max_lines), handle, strict=False)]
        valid = (source / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
        if scale != "cpu":
            valid = valid[:200]
    else:
        train, valid = _synthetic_text(2000, seed=0), _synthetic_text(200, seed=1)
    _write_atomic(train_out, "".join(train))
    _write_atomic(valid_out, "".join(valid))
    return str(train_out), str(valid_out)


def _synthetic_text(n_sentences: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat tree quickly slowly big small red blue and then".split()
    lines = []
    for i in range(n_sentences):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + " .\n")
        if i % 5 == 4:
            lines.append("\n")
    return lines


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_multi30k(data_dir: Path, work_dir: Path) -> str:
    """The Multi30k folder (the shared one if present, else a tiny synthetic parallel corpus for tests)."""
    folder = data_dir / "multi30k"
    if (folder / "train.en.gz").is_file():
        return str(folder)
    out = work_dir / "multi30k_synthetic"
    out.mkdir(parents=True, exist_ok=True)
    lexicon = {
        "the": "der",
        "dog": "hund",
        "cat": "katze",
        "runs": "läuft",
        "sleeps": "schläft",
        "big": "große",
    }
    import random

    rng = random.Random(0)
    for split, n in (("train", 200), ("val", 20), ("test_2016_flickr", 20)):
        en, de = [], []
        for _ in range(n):
            sentence = [rng.choice(list(lexicon)) for _ in range(rng.randint(3, 7))]
            en.append(" ".join(sentence))
            de.append(" ".join(lexicon[w] for w in sentence))
        (out / f"{split}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
        (out / f"{split}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
    return str(out)


# ------------------------------------------------------------------------------------------------ recording
def load_recipe(name: str):
    """Import recipes/<name>.py as a module (the recipes folder is not a package).

    Args:
        name (`str`): the recipe's file name without ``.py``, e.g. ``"llama_pretrain"``.
    """
    path = ROOT / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_reproduce_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sparse_probe(model) -> dict[str, float]:
    """Global density of the masked layers (1.0 for a dense model)."""
    from hf_chts.masking import get_masks

    masks = get_masks(model)
    numel = sum(m.numel() for m in masks.values())
    nnz = sum(int(m.sum()) for m in masks.values())
    return {"density": nnz / numel if numel else 1.0}


def _llama_active_mlp_neurons(model) -> float:
    """Fraction of LLaMA MLP hidden neurons with a gate link, an up link and a down link (1.0 if dense)."""
    active, total = 0, 0
    for layer in getattr(getattr(model, "model", model), "layers", []):
        mlp = layer.mlp

        def mask(module):
            return (
                module.weight_mask.bool() if hasattr(module, "weight_mask") else module.weight.detach() != 0
            )

        alive = mask(mlp.gate_proj).any(1) & mask(mlp.up_proj).any(1) & mask(mlp.down_proj).any(0)
        active, total = active + int(alive.sum()), total + alive.numel()
    return active / total if total else 1.0


def _make_recorder(probe: Callable[[Any], dict[str, float]], state_file: Path | None = None):
    """A callback recording, at every log, the step, elapsed seconds and the probe's figures.

    With ``state_file`` (resumable runs) it writes its trace and elapsed time there at every checkpoint and
    takes them back when the run resumes, dropping rows past the checkpoint it resumes from.
    """
    from transformers import TrainerCallback

    class RecorderCallback(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.offset = 0.0  # seconds spent before a resume
            self.trace: list[dict[str, float]] = []

        def elapsed(self) -> float:
            return self.offset + time.perf_counter() - self.start

        def _record(self, state, model) -> None:
            if model is None:
                return
            row = {"step": int(state.global_step), "seconds": self.elapsed()}
            row.update(probe(model))
            if not self.trace or self.trace[-1]["step"] != row["step"]:
                self.trace.append(row)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start = time.perf_counter()
            if state_file is not None and state_file.is_file() and state.global_step > 0:
                saved = json.loads(state_file.read_text())
                self.trace = [row for row in saved["trace"] if row["step"] <= state.global_step]
                self.offset = saved["seconds"]

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:  # after the sparse callback drew the initial masks
                self._record(state, model)

        def on_log(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_save(self, args, state, control, **kwargs):
            if state_file is not None:
                _write_atomic(state_file, json.dumps({"trace": self.trace, "seconds": self.elapsed()}))

    return RecorderCallback()


@contextlib.contextmanager
def _recorded(module, trainer_attr: str, probe, state_file: Path | None = None) -> Iterator[dict[str, Any]]:
    """Swap ``module.<trainer_attr>`` for a subclass adding a recorder callback; yields what it captured."""
    original = getattr(module, trainer_attr)
    captured: dict[str, Any] = {}

    class Recorded(original):
        def __init__(self, *args, **kwargs):
            recorder = _make_recorder(probe, state_file)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), recorder]
            super().__init__(*args, **kwargs)
            captured["trainer"], captured["recorder"] = self, recorder

    setattr(module, trainer_attr, Recorded)
    try:
        yield captured
    finally:
        setattr(module, trainer_attr, original)


def _flags_to_argv(flags: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def llama_recipe_argv(flags: dict[str, Any]) -> list[str]:
    """The llama recipe's command line for these flags: tiny.yaml's defaults, the flags override them."""
    return ["--config", str(ROOT / "recipes" / "configs" / "tiny.yaml"), *_flags_to_argv(flags)]


# ------------------------------------------------------------------------------------------------ one run
def run_one(
    experiment: str, variant: str, seed: int, scale: str, data_dir: Path, work_dir: Path, results_dir: Path
) -> dict[str, Any]:
    """Train one (experiment, variant, seed) and write its JSON; returns the record."""
    import torch

    torch.set_num_threads(1)
    exp = EXPERIMENTS[experiment]
    var = exp.variant(variant)
    flags = {**exp.base[scale], **var.flags, "method": var.method, "seed": seed}
    run_name = f"{experiment}__{variant}__s{seed}"
    out_dir = work_dir / "outputs" / scale / run_name
    common = {"output_dir": str(out_dir), "save_strategy": "no", "report_to": "none"}
    state_file = None
    if exp.resumable:  # a checkpoint every epoch; the same command continues from the newest complete one
        common.update(save_strategy="epoch", save_total_limit=1, resume_from_checkpoint="latest")
        state_file = out_dir / "reproduce_recorder.json"
    provenance = {"git": git_commit(), "hardware": hardware()}
    start = time.perf_counter()

    if exp.recipe == "mlp":
        recipe = load_recipe("mlp_image_classification")
        mnist = _mnist_dir(data_dir)
        data_flags = {"data_dir": str(mnist)} if mnist else {"synthetic": True}
        if not mnist:
            data_flags.update(synthetic_train_size=flags["max_train_samples"], synthetic_test_size=200)
        argv = _flags_to_argv(
            {**flags, **data_flags, **common, "eval_strategy": flags.get("eval_strategy", "no")}
        )

        def probe(model):
            return {**_sparse_probe(model), "active_neurons": recipe.active_hidden_neurons(model)["all"]}

        with _recorded(recipe, "Trainer", probe, state_file) as captured:
            result = recipe.main(*recipe.parse_args(argv))
        metrics = dict(result["metrics"])
        metrics["active_hidden_neurons"] = result["sparsity"]["active_hidden_neurons"]["all"]
        metrics["active_hidden_neurons_per_layer"] = result["sparsity"]["active_hidden_neurons"]
        metrics["density"] = _sparse_probe(captured["trainer"].model)["density"]
        metrics.update(_best_accuracy(captured["trainer"], result))
        config = {
            "recipe_argv": argv,
            "sparse_config": result["sparse_config"],
            "training_args": result["training_args"],
            "model": result["model"],
            "data": {
                "source": result["data"],
                "train": result["num_train_samples"],
                "test": result["num_test_samples"],
            },
        }
    elif exp.recipe == "llama":
        recipe = load_recipe("llama_pretrain")
        train_file, valid_file = prepare_wikitext(data_dir, work_dir, scale)
        llama_flags = dict(flags)
        llama_flags.update(
            dataset=train_file,
            validation_file=valid_file,
            zero_shot_tasks="none",
            eval_strategy="steps",
            torch_num_threads=1,
            data_cache_dir=str(work_dir / "cache"),
            **common,
        )
        argv = llama_recipe_argv(llama_flags)

        def probe(model):
            return {**_sparse_probe(model), "active_neurons": _llama_active_mlp_neurons(model)}

        with _recorded(recipe, "PerplexityTrainer", probe, state_file) as captured:
            result = recipe.main(argv)
        trainer = captured["trainer"]
        metrics = {
            "eval_perplexity": result["eval"]["eval_perplexity"],
            "eval_loss": result["eval"]["eval_loss"],
            "train_loss": result["train"].get("train_loss"),
            "global_step": trainer.state.global_step,
            "density": _sparse_probe(trainer.model)["density"],
            "active_mlp_neurons": _llama_active_mlp_neurons(trainer.model),
            "parameters": result["model"]["parameters"],
            "nonzero_parameters": result["model"]["nonzero_parameters"],
        }
        config = {
            "recipe_argv": argv,
            "sparse_config": result["sparse_training"],
            "training_args": json.loads(trainer.args.to_json_string()),
            "model": {
                k: llama_flags[k]
                for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            },
            "data": result["data"],
        }
    elif exp.recipe == "mt":
        recipe = load_recipe("transformer_translation")
        mt_flags = {
            **flags,
            "data_dir": prepare_multi30k(data_dir, work_dir),
            "tokenizer_cache_dir": str(work_dir / "cache"),
            **common,
        }
        argv = _flags_to_argv(mt_flags)

        def probe(model):
            return {**_sparse_probe(model), "active_neurons": recipe.active_ffn_neurons(model)}

        with _recorded(recipe, "Seq2SeqTrainer", probe, state_file) as captured:
            result = recipe.main(*recipe.parse_args(argv))
        metrics = dict(result["metrics"])
        metrics["density"] = result["sparsity"]["density"]
        metrics["active_ffn_neurons"] = result["sparsity"]["active_ffn_neurons"]
        config = {
            "recipe_argv": argv,
            "sparse_config": result["sparse_config"],
            "training_args": result["training_args"],
            "translation_args": result["translation_args"],
            "model": result["model"],
            "data": {
                "dir": result["data_dir"],
                "train": result["num_train_pairs"],
                "test": result["num_test_pairs"],
            },
        }
        metrics["examples"] = result["examples"]
    else:  # pragma: no cover - the registry only holds the three above
        raise ValueError(f"Unknown recipe kind {exp.recipe!r}.")

    trainer = captured["trainer"]
    record = {
        "experiment": experiment,
        "variant": variant,
        "label": var.title,
        "method": var.method,
        "seed": seed,
        "scale": scale,
        "metrics": metrics,
        "wall_time_seconds": captured["recorder"].offset + time.perf_counter() - start,
        "train_runtime_seconds": trainer.state.log_history[-1].get("train_runtime")
        if trainer.state.log_history
        else None,
        "trace": captured["recorder"].trace,
        "log_history": _global_logs(trainer.state.log_history),
        "config": config,
        **provenance,
        "command": f"python benchmarks/reproduce.py run --experiment {experiment} --variants {variant} "
        f"--seeds {seed} --scale {scale}",
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "runs").mkdir(exist_ok=True)
    path = (
        results_dir / "runs" / f"{run_name}.json"
        if scale == "cpu"
        else results_dir / "runs" / f"{run_name}__{scale}.json"
    )
    _write_atomic(path, json.dumps(record, indent=1, default=_json_default) + "\n")
    return record


def _best_accuracy(trainer, result: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy after every epoch (when evaluated), the best of them, and the best once the topology is
    final (after t_end; the research code counts only those for EM_S runs, whose density is reached there)."""
    history = [
        (int(e["step"]), float(e["eval_accuracy"])) for e in trainer.state.log_history if "eval_accuracy" in e
    ]
    if not history:
        return {}
    sparse = result.get("sparse_config")
    t_end = 0
    if sparse is not None:
        t_end = sparse["t_end"] or int(sparse["t_end_fraction"] * trainer.state.max_steps)
    after = [acc for step, acc in history if step > t_end]
    return {
        "test_accuracy_per_eval": history,
        "best_test_accuracy": max(acc for _, acc in history),
        "best_test_accuracy_after_t_end": max(after) if after else None,
    }


def _global_logs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's log history without the per-layer ``sparsity/<layer>/...`` keys (kept in the traces)."""
    return [{k: v for k, v in entry.items() if k.count("/") < 2} for entry in history]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def run_path(results_dir: Path, experiment: str, variant: str, seed: int, scale: str) -> Path:
    name = f"{experiment}__{variant}__s{seed}"
    return results_dir / "runs" / (f"{name}.json" if scale == "cpu" else f"{name}__{scale}.json")


def run_grid(
    experiments: list[str],
    variants: list[str] | None,
    seeds: list[int] | None,
    scale: str,
    data_dir: Path,
    work_dir: Path,
    results_dir: Path,
    jobs: int = 1,
    force: bool = False,
) -> list[Path]:
    """Run every missing (experiment, variant, seed), ``jobs`` at a time in subprocesses (1 = in process).

    Every run trains on one torch thread. The subprocesses start with ``OMP_NUM_THREADS=1`` and
    ``MKL_NUM_THREADS=1`` unless set; for runs in this process, ``benchmarks/reproduce.py`` sets both before
    torch is imported (``torch.set_num_threads(1)`` alone can leave OpenMP's other threads spinning).
    """
    todo = []
    known = {v.name for name in experiments for v in EXPERIMENTS[name].variants}
    unknown = sorted(set(variants or ()) - known)
    if unknown:
        raise ValueError(f"Unknown variants {unknown} for experiments {experiments}; known: {sorted(known)}.")
    for name in experiments:
        exp = EXPERIMENTS[name]
        names = [v.name for v in exp.variants if variants is None or v.name in variants]
        for seed in seeds if seeds is not None else exp.seeds:
            for variant in names:
                path = run_path(results_dir, name, variant, seed, scale)
                if force or not path.is_file():
                    todo.append((name, variant, seed))
    requested = list(todo)
    # a variant identical to another experiment's run reuses that run's record once it exists
    for item in list(todo):
        name, variant, seed = item
        alias = EXPERIMENTS[name].variant(variant).same_as
        source = run_path(results_dir, alias[0], alias[1], seed, scale) if alias else None
        if source is not None and source.is_file():
            record = json.loads(source.read_text())
            record.update(experiment=name, variant=variant, label=EXPERIMENTS[name].variant(variant).title)
            record["reused_from"] = source.name
            _write_atomic(
                run_path(results_dir, name, variant, seed, scale), json.dumps(record, indent=1) + "\n"
            )
            todo.remove(item)
            _log(f"reused {source.name} for {name}/{variant}/s{seed}")
    # data preparation once, before parallel runs race for the caches
    for name in {t[0] for t in todo}:
        if EXPERIMENTS[name].recipe == "llama":
            prepare_wikitext(data_dir, work_dir, scale)
    if jobs <= 1:
        for name, variant, seed in todo:
            _log(f"start {name}/{variant}/s{seed}")
            record = run_one(name, variant, seed, scale, data_dir, work_dir, results_dir)
            _log(f"done  {name}/{variant}/s{seed}: {_summary(record)}")
    else:
        running: list[tuple[subprocess.Popen, tuple]] = []
        queue = list(todo)
        logs = work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        while queue or running:
            while queue and len(running) < jobs:
                item = queue.pop(0)
                cmd = [
                    sys.executable, str(ENTRY_POINT), "_one", "--experiment", item[0], "--variants", item[1],
                    "--seeds", str(item[2]), "--scale", scale, "--data_dir", str(data_dir),
                    "--work_dir", str(work_dir), "--results_dir", str(results_dir),
                ]  # fmt: skip
                log = open(logs / f"{item[0]}__{item[1]}__s{item[2]}__{scale}.log", "w")  # noqa: SIM115
                env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                env.setdefault("OMP_NUM_THREADS", "1")
                env.setdefault("MKL_NUM_THREADS", "1")
                running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), item))
                _log(f"start {item[0]}/{item[1]}/s{item[2]}")
            time.sleep(2)
            for proc, item in list(running):
                if proc.poll() is not None:
                    running.remove((proc, item))
                    path = run_path(results_dir, item[0], item[1], item[2], scale)
                    status = (
                        _summary(json.loads(path.read_text()))
                        if path.is_file()
                        else f"FAILED rc={proc.returncode}"
                    )
                    _log(f"done  {item[0]}/{item[1]}/s{item[2]}: {status}")
    return [run_path(results_dir, *t, scale) for t in requested]


def _summary(record: dict[str, Any]) -> str:
    exp = EXPERIMENTS[record["experiment"]]
    return f"{exp.metric}={record['metrics'][exp.metric]:.4f} ({record['wall_time_seconds']:.0f} s)"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
