"""Model cards for sparse checkpoints and upload to the Hugging Face Hub.

:func:`render_model_card` fills the template ``hf_chts/model_cards/sparse_llama.md`` (``string.Template``
placeholders) from what a checkpoint folder already holds, plus what you pass:

- ``config.json``: architecture and the sparse-training settings (``sparsity``, a ``SparseTrainingConfig``
  dict, as ``SparseLlamaConfig`` stores it);
- the masks (either checkpoint format): density, in/out degree and active neurons per layer type;
- ``trainer_state.json`` when present: optimizer steps and the last ``eval_loss`` (validation perplexity);
- ``zero_shot_results.json`` when present (written by :mod:`hf_chts.evaluation`).

The card has Hub metadata in its YAML front matter (``library_name``, ``tags``, ``datasets``, ``license``,
``pipeline_tag`` and a ``model-index`` holding the zero-shot accuracies and the validation perplexity as
``huggingface_hub.EvalResult``s, so the Hub shows them) built with ``huggingface_hub.ModelCardData``, and is
saved as the folder's ``README.md``. Repository ids are checked with ``huggingface_hub``'s validator.
:func:`push_to_hub` creates the repository and uploads the folder with ``huggingface_hub.HfApi``.

Example:
    >>> from hf_chts.hub import write_model_card, push_to_hub
    >>> write_model_card("out/llama-60m-chtss", datasets=["allenai/c4"])  # doctest: +SKIP
    >>> push_to_hub("out/llama-60m-chtss", "me/llama-60m-chtss")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .compact import is_compact, read_config, read_masks
from .config import SparseTrainingConfig
from .stats import mask_statistics, mlp_active_neurons, summarize_by_layer_type

TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "sparse_llama.md"
ARXIV_ID = "2501.19107"
CITATION = """@inproceedings{zhang2025brain,
  title         = {Brain network science modelling of sparse neural networks enables Transformers and LLMs
                   to perform as fully connected},
  author        = {Zhang, Yingtao and Cerretti, Diego and Zhao, Jialin and Wu, Wenjing and Liao, Ziheng and
                   Michieli, Umberto and Cannistraci, Carlo Vittorio},
  booktitle     = {Advances in Neural Information Processing Systems (NeurIPS)},
  year          = {2025},
  eprint        = {2501.19107},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2501.19107}
}"""
METHOD_NAMES = {
    "chts": "CHTs (Cannistraci-Hebb training soft rule)",
    "chtss": "CHTss (Cannistraci-Hebb training soft rule with sigmoid density decay)",
    "cht": "CHT (Cannistraci-Hebb training)",
    "set": "SET (sparse evolutionary training)",
    "rigl": "RigL",
    "mest": "MEST",
    "granet": "GraNet",
    "static": "static sparse training (fixed mask)",
}
# files never uploaded by default: pickles and the optimizer state of intermediate checkpoints
DEFAULT_IGNORE = ["checkpoint-*", "checkpoint-*/**", "*.pt", "*.pth", "*.bin", "*.pkl", ".git/**"]

__all__ = [
    "CITATION",
    "TEMPLATE",
    "card_context",
    "check_repo_id",
    "how_to_use",
    "push_to_hub",
    "render_model_card",
    "write_model_card",
]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _training_from_state(path: Path) -> dict[str, Any]:
    """Steps and last eval loss from a ``trainer_state.json`` (read with ``TrainerState.load_from_json``)."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(path))
    losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    out: dict[str, Any] = {"steps": state.global_step or state.max_steps}
    if losses:
        out["eval_loss"] = losses[-1]
    if state.train_batch_size:
        out["per_device_batch_size"] = state.train_batch_size
    return out


def _eval_results(ctx: Mapping[str, Any]) -> list[Any]:
    """The zero-shot results and the validation perplexity as ``huggingface_hub.EvalResult`` (model-index)."""
    from huggingface_hub import EvalResult

    results = []
    zero_shot = (ctx["eval_results"] or {}).get("results", {})
    shots = (ctx["eval_results"] or {}).get("config", {}).get("num_fewshot", 0)
    for task, row in zero_shot.items():
        for metric in ("acc", "acc_norm"):
            if row.get(metric) is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=f"zero-shot {task}" if not shots else f"{shots}-shot {task}",
                    dataset_type=task,
                    dataset_name=task,
                    metric_type=metric,
                    metric_name=f"{metric} ({shots}-shot)",
                    metric_value=float(row[metric]),
                    source_name="lm-evaluation-harness",
                    source_url="https://github.com/EleutherAI/lm-evaluation-harness",
                )
            )
    if ctx["perplexity"] is not None and math.isfinite(ctx["perplexity"]):
        data = ctx["datasets"][0] if ctx["datasets"] else "held-out text"
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="language modelling",
                dataset_type=data,
                dataset_name=f"{data} (validation)",
                metric_type="perplexity",
                metric_value=float(ctx["perplexity"]),
            )
        )
    return results


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _zero_shot_table(results: Mapping[str, Any] | None) -> str:
    if not results:
        return "Not evaluated yet: run `hf-chts eval <folder> --output_dir <folder>` and re-render the card."
    from .evaluation import results_to_markdown

    config = results.get("config", {})
    shots = config.get("num_fewshot", 0)
    limit = config.get("limit")
    note = f"{shots}-shot, lm-eval {results.get('lm_eval_version', '?')}"
    if limit is not None:
        note += f", at most {limit} items per task"
    return results_to_markdown(results).rstrip("\n") + f"\n\n({note}; accuracy ± standard error.)"


def card_context(
    folder: str | os.PathLike,
    *,
    sparsity_config: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    datasets: Sequence[str] | None = None,
    training_steps: int | None = None,
    training_tokens: int | None = None,
    validation_perplexity: float | None = None,
    eval_results: Mapping[str, Any] | str | os.PathLike | None = None,
    notes: str | None = None,
) -> dict[str, Any]:
    """Every figure the card shows, gathered from ``folder`` and the arguments (arguments win).

    Returns a dict with ``config``, ``sparsity``, ``layer_types`` (from
    :func:`~hf_chts.stats.summarize_by_layer_type`), ``mlp_active``, ``training``, ``perplexity``,
    ``eval_results``, ``datasets``, ``model_name``, ``repo_id`` and ``notes``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    config = read_config(folder)
    masks = read_masks(folder)
    from .compact import is_transposed_config

    stats = mask_statistics(masks, transposed=is_transposed_config(config))
    if hasattr(sparsity_config, "to_dict"):  # a SparseTrainingConfig
        sparsity_config = sparsity_config.to_dict()
    sparsity = dict(sparsity_config if sparsity_config is not None else config.get("sparsity") or {})
    if sparsity:
        try:  # the fields the preset decides are stored as None: show the values that trained the model
            sparsity = SparseTrainingConfig.from_dict(sparsity).to_dict(resolved=True)
        except ValueError:
            pass  # written by another version: show what is recorded
    state_path = folder / "trainer_state.json"
    training = _training_from_state(state_path) if state_path.is_file() else {}
    if training_steps is not None:
        training["steps"] = training_steps
    if training_tokens is not None:
        training["tokens"] = training_tokens
    perplexity = validation_perplexity
    if perplexity is None and "eval_loss" in training:
        perplexity = math.exp(training["eval_loss"])
    if isinstance(eval_results, (str, os.PathLike)):
        eval_results = _read_json(Path(eval_results))
    if eval_results is None:
        eval_results = _read_json(folder / "zero_shot_results.json")
    return {
        "config": config,
        "sparsity": sparsity,
        "layer_types": summarize_by_layer_type(stats),
        "mlp_active": mlp_active_neurons(masks),
        "training": training,
        "perplexity": perplexity,
        "eval_results": eval_results,
        "datasets": list(datasets or []),
        "model_name": model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name),
        "repo_id": repo_id or str(folder),
        "notes": notes,
        "compact": is_compact(folder),
    }


def _sections(ctx: Mapping[str, Any]) -> dict[str, str]:
    config, sp, types = ctx["config"], ctx["sparsity"], ctx["layer_types"]
    method = sp.get("method")
    method_name = METHOD_NAMES.get(method, method or "dynamic sparse training (settings not recorded)")
    overall = types.get("all")
    arch = ", ".join(
        f"{label} {config[key]}"
        for key, label in (
            ("hidden_size", "hidden"),
            ("intermediate_size", "intermediate"),
            ("num_hidden_layers", "layers"),
            ("num_attention_heads", "heads"),
            ("vocab_size", "vocabulary"),
        )
        if key in config
    )
    density_sentence = (
        f"Its sparse layers keep **{overall['density']:.1%}** of their links "
        f"({overall['nnz']:,} links in {overall['layers']} sparse layers; embeddings, norms and the LM head "
        "are dense)."
        if overall
        else "This checkpoint carries no sparse masks."
    )
    model_type = config.get("model_type", "causal")
    family = "LLaMA-architecture" if "llama" in model_type else model_type
    summary = (
        f"A {family} language model ({arch}) trained with {method_name} using "
        f"[hf_chts](https://arxiv.org/abs/{ARXIV_ID}), the Hugging Face integration of brain-inspired "
        f"dynamic sparse training. {density_sentence}"
    )
    if ctx["notes"]:
        summary += "\n\n" + ctx["notes"]

    method_text = (
        f"**{method_name}**. The topology of every sparse layer evolves during training: every "
        f"`update_interval` steps a fraction `zeta` of the links is removed "
        f"({_fmt(sp.get('removal'))} scores, {_fmt(sp.get('removal_mode'))} selection) and as many are "
        f"regrown ({_fmt(sp.get('regrowth'))} scores"
        + (
            f", link predictor {sp['ch_variant']}"
            if sp.get("regrowth") == "ch" and sp.get("ch_variant")
            else ""
        )
        + f", {_fmt(sp.get('regrowth_mode'))} selection). Chain removal of inactive neurons: "
        f"{_fmt(sp.get('chain_removal'))}. Final density {_fmt(sp.get('density'))}, "
        f"distributed over layers as {_fmt(sp.get('density_distribution'))}."
        if sp
        else "The sparse-training settings are not recorded in `config.json` (no `sparsity` field)."
    )

    rows = [
        [name, v["layers"], f"{v['density']:.4f}", f"{v['active_out']:.4f}", f"{v['active_in']:.4f}"]
        for name, v in types.items()
    ]
    density_table = (
        _table(["layer type", "layers", "density", "active outputs", "active inputs"], rows)
        if rows
        else "No sparse layers."
    )

    init = sp.get("init")
    if init == "brf":
        initialization = (
            f"Bipartite receptive field (BRF): randomness r = {_fmt(sp.get('brf_r'))}, degree distribution "
            f"`{_fmt(sp.get('brf_degree_dist'))}`, seed {_fmt(sp.get('seed'))}."
        )
    elif init:
        initialization = f"Initial topology `{init}` (not BRF); seed {_fmt(sp.get('seed'))}."
    else:
        initialization = "Not recorded."

    if sp:
        t_end = (
            sp.get("t_end") if sp.get("t_end") is not None else f"{sp.get('t_end_fraction')} x total steps"
        )
        schedule_rows = [
            ["update interval (steps)", sp.get("update_interval")],
            ["last topology update (t_end)", t_end],
            ["drop fraction zeta", f"{_fmt(sp.get('zeta'))} ({_fmt(sp.get('zeta_schedule'))})"],
            [
                "removal temperature",
                f"{_fmt(sp.get('temperature_start'))} -> {_fmt(sp.get('temperature_end'))}",
            ],
            ["density schedule", sp.get("density_schedule")],
        ]
        if sp.get("density_schedule") not in (None, "constant"):
            decay_end = sp.get("decay_end") or f"{sp.get('decay_end_fraction')} x total steps"
            schedule_rows += [
                ["initial density", sp.get("initial_density")],
                ["decay window (steps)", f"{sp.get('decay_start')} -> {decay_end}"],
                ["decay pruning score", sp.get("decay_pruning")],
            ]
        schedule = _table(["setting", "value"], schedule_rows)
    else:
        schedule = "Not recorded."

    training, datasets = ctx["training"], ctx["datasets"]
    training_rows = [
        ["data", ", ".join(datasets) if datasets else None],
        ["optimizer steps", training.get("steps")],
        ["tokens", f"{training['tokens']:,}" if training.get("tokens") else None],
    ]
    if training.get("per_device_batch_size"):
        training_rows.append(["batch size per device", training["per_device_batch_size"]])
    training_text = _table(["", "value"], training_rows)

    active_lines = []
    if overall:
        active_lines.append(
            f"- Active neurons: **{overall['active_neurons']:.2%}** (mean over the sparse layers of the "
            "fraction of their input and output neurons that keep at least one link)."
        )
        active_lines.append(
            f"- All sparse layers: {overall['active_out']:.2%} of output neurons and "
            f"{overall['active_in']:.2%} of input neurons keep at least one link (per type: table above)."
        )
    if ctx["mlp_active"] is not None:
        active_lines.append(
            f"- MLP hidden neurons active through gate, up and down projections: {ctx['mlp_active']:.2%}"
        )
    active = "\n".join(active_lines) if active_lines else "No sparse layers."

    ppl = ctx["perplexity"]
    perplexity = (
        f"**{ppl:.2f}**"
        + (
            f" (exp of the last `eval_loss` {training['eval_loss']:.4f} in trainer_state.json)"
            if "eval_loss" in training and ppl == math.exp(training["eval_loss"])
            else ""
        )
        if ppl is not None
        else "Not recorded."
    )

    return {
        "title": ctx["model_name"],
        "summary": summary,
        "method": method_text,
        "density_table": density_table,
        "initialization": initialization,
        "schedule": schedule,
        "training": training_text,
        "active_neurons": active,
        "perplexity": perplexity,
        "zero_shot": _zero_shot_table(ctx["eval_results"]),
        "how_to_use": how_to_use(config, ctx["repo_id"], compact=ctx["compact"]),
        "repo_id": ctx["repo_id"],
        "citation": CITATION,
    }


def how_to_use(config: Mapping[str, Any], repo_id: str, *, compact: bool = False) -> str:
    """The card's "How to use" text for this model type and checkpoint format."""
    model_type = config.get("model_type") or "causal-lm"
    architecture = (config.get("architectures") or [f"{model_type} model"])[0]
    code = (
        "```python\nfrom hf_chts import AutoSparseModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        f'model = AutoSparseModelForCausalLM.from_pretrained("{repo_id}")  # masks included\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n\n'
    )
    masks = (
        "The weights at pruned positions are exactly zero and every sparse layer carries its mask as the "
        "buffer `weight_mask`, so training on keeps the model sparse (`hf_chts.CHTssCallback` adopts the "
        "settings recorded in `config.json`). "
    )
    if compact:
        plain = (
            "This folder is in the compact format (kept values plus a bitmask, `model.compact.safetensors`): "
            "transformers' own Auto classes cannot read it; `AutoSparseModelForCausalLM` (or "
            "`hf_chts.compact.load_compact`) can. "
        )
    elif model_type == "sparse_llama":
        plain = (
            "`import hf_chts` also registers the `sparse_llama` architecture, so `AutoModelForCausalLM` "
            "loads it as `SparseLlamaForCausalLM`, masks included. "
        )
    else:
        plain = (
            f"A plain `AutoModelForCausalLM.from_pretrained` loads the same weights as a `{architecture}` "
            "without masks (fine for inference; training it would fill the pruned positions). "
        )
    dense = "a plain `LlamaForCausalLM`" if "llama" in model_type else f"a plain `{architecture}`"
    return (
        code
        + masks
        + plain
        + f"`hf-chts export <folder> <out> --format dense` writes {dense} without masks; `--format compact` "
        "writes the kept values plus a bitmask. `hf-chts inspect <folder>` prints the per-layer density, "
        "degrees and active neurons."
    )


def render_model_card(
    folder: str | os.PathLike,
    *,
    template: str | os.PathLike | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub metadata field is called license
    language: str | Sequence[str] | None = "en",
    tags: Sequence[str] = (),
    base_model: str | None = None,
    **context: Any,
):
    """Render the model card of a sparse checkpoint folder.

    Args:
        folder: checkpoint folder (``save_pretrained`` or compact format).
        template: a markdown template with ``${...}`` placeholders; default the shipped ``sparse_llama.md``.
        license (`str`, defaults to ``"apache-2.0"``), language, tags (added to hf_chts' own), base_model:
            Hub metadata.
        **context: forwarded to :func:`card_context` (``sparsity_config``, ``model_name``, ``repo_id``,
            ``datasets``, ``training_steps``, ``training_tokens``, ``validation_perplexity``,
            ``eval_results``, ``notes``).

    Returns:
        `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    ctx = card_context(folder, **context)
    method = ctx["sparsity"].get("method")
    all_tags = ["hf_chts", "sparse", "dynamic-sparse-training", "cannistraci-hebb", f"arxiv:{ARXIV_ID}"]
    if method:
        all_tags.append(method)
    if ctx["config"].get("model_type"):
        all_tags.append(ctx["config"]["model_type"])
    all_tags += [t for t in tags if t not in all_tags]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        tags=all_tags,
        datasets=ctx["datasets"] or None,
        base_model=base_model,
        model_name=ctx["model_name"],
        eval_results=_eval_results(ctx) or None,
    )
    text = Path(template or TEMPLATE).read_text()
    values = _sections(ctx)
    values["card_data"] = card_data.to_yaml()
    try:
        content = string.Template(text).substitute(values)
    except KeyError as err:
        raise ValueError(
            f"The model card template uses the unknown placeholder ${{{err.args[0]}}}; available: "
            f"{', '.join(sorted(values))}."
        ) from err
    return ModelCard(content)


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Render the card (see :func:`render_model_card`) and save it as ``<folder>/README.md``."""
    path = Path(folder) / "README.md"
    render_model_card(folder, **kwargs).save(path)
    return path


def check_repo_id(repo_id: Any) -> str:
    """Return ``repo_id`` if ``huggingface_hub``'s validator accepts it, else raise a ``ValueError``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id or not isinstance(repo_id, str):
        raise ValueError(
            "push_to_hub needs a Hub repository id such as 'your-name/llama-60m-chtss' (--hub_model_id); "
            f"got {repo_id!r}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"Malformed repository id {repo_id!r}: {err} Use 'namespace/name' or 'name'."
        ) from err
    return repo_id


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str | None,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload sparse model trained with hf_chts",
    write_card: bool | None = None,
    card_kwargs: Mapping[str, Any] | None = None,
    ignore_patterns: Sequence[str] | None = None,
):
    """Create ``repo_id`` on the Hub (if needed) and upload ``folder`` with its model card.

    Args:
        folder: checkpoint folder to upload.
        repo_id: ``"user/name"`` or ``"org/name"``.
        token: Hub token; default the one ``huggingface-cli login`` stored.
        private (`bool`, defaults to False): create the repository private.
        revision: branch to push to; default the main branch.
        commit_message: the commit message.
        write_card: None (default) writes ``README.md`` only when the folder has none; True always
            (re)renders it; False never.
        card_kwargs: arguments for :func:`render_model_card`.
        ignore_patterns: files not uploaded; default pickles (``*.bin``, ``*.pt``...) and ``checkpoint-*``.

    Returns:
        the ``CommitInfo`` of the upload.

    Raises:
        ValueError: no or a malformed ``repo_id``.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    if write_card or (write_card is None and not (folder / "README.md").is_file()):
        write_model_card(folder, **{"repo_id": repo_id, **dict(card_kwargs or {})})
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=list(DEFAULT_IGNORE if ignore_patterns is None else ignore_patterns),
    )
