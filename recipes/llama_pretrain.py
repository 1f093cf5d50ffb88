#!/usr/bin/env python
"""Pretrain a LLaMA from scratch with brain-inspired dynamic sparse training (CHTs, CHTss, ...) or dense.

The LLaMA pretraining recipe of arXiv 2501.19107, runnable anywhere: with no argument it trains a tiny
sparse LLaMA (CHTss, 30% final density) on the embedded corpus (the Python standard library's docstrings)
with a byte-level BPE trained on the spot, on CPU, in a few minutes, without network.

Launch commands (from the repository root, with the package installed: `pip install -e .`):

    # the embedded default = --config recipes/configs/tiny.yaml
    python recipes/llama_pretrain.py
    # the dense baseline, or any other method / setting (every SparseTrainingConfig field is a flag)
    python recipes/llama_pretrain.py --method dense --output_dir outputs/llama_tiny_dense
    python recipes/llama_pretrain.py --method chts --density 0.1 --brf_r 0.3
    # re-warm the LR after each topology update only (sparse runs), instead of every cycle for every method
    python recipes/llama_pretrain.py --method chts --cyclic_rewarmup_steps 0 --rewarmup_steps 10

    # the paper's LLaMA-60M on C4 with the T5 tokenizer, one node of GPUs (DDP)
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/llama_pretrain.py \
        --config recipes/configs/llama_60m.yaml --dataset allenai/c4 --dataset_config en --method chtss
    # LLaMA-1B with FSDP2, the dense baseline
    accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml recipes/llama_pretrain.py \
        --config recipes/configs/llama_1b.yaml --method dense
    # two CPU processes (gloo), e.g. to check a distributed run on a laptop
    accelerate launch --config_file recipes/accelerate_configs/multi_cpu.yaml recipes/llama_pretrain.py \
        --max_steps 40 --update_interval 10 --eval_steps 20

    # your own text: a .txt / .jsonl file (optionally .gz) or a folder of them; any Hub tokenizer
    python recipes/llama_pretrain.py --dataset data/my_corpus.jsonl --text_field text --tokenizer_name t5-base

    # publish: model, tokenizer, metrics and model card
    python recipes/llama_pretrain.py --push_to_hub --hub_model_id <user>/llama-tiny-chtss

Arguments: ``--config file.yaml`` sets defaults (keys = the flags below); flags on the command line win.
``python recipes/llama_pretrain.py --help`` lists them all: model shape (ModelArguments), data
(DataArguments), the sparse-training method (SparsityArguments), zero-shot evaluation (EvaluationArguments)
and everything of ``transformers.TrainingArguments``.

Outputs in ``--output_dir``: ``model.safetensors`` + ``config.json`` (loads with
``AutoModelForCausalLM.from_pretrained`` after ``import hf_chts``), the tokenizer, ``metrics.json``
(validation perplexity, zero-shot accuracy, sparsity, data summary), ``zero_shot_results.json``/``.md``,
``README.md`` (the model card, zero-shot results in its ``model-index``) and the Trainer's
``trainer_state.json`` (training log), ``train_results.json`` / ``eval_results.json`` / ``all_results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import get_token
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_chts.callback import CHTssCallback
from hf_chts.config import METHODS, SparseTrainingConfig
from hf_chts.data import check_vocab_fits, load_lm_data
from hf_chts.evaluation import evaluate, resolve_tasks
from hf_chts.finished_run import FinishedRunGuard
from hf_chts.hub import check_repo_id, push_to_hub, write_model_card
from hf_chts.masking import dense_parameter_count
from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM, sparsity_summary
from hf_chts.recipe_utils import CyclicRewarmup, apply_yaml_defaults, resolve_resume_checkpoint

logger = logging.getLogger("llama_pretrain")
DEFAULT_ZERO_SHOT_TASKS = ("hf_chts_tiny_mc",)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
DENSE = "dense"
METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class ModelArguments:
    """Shape of the LLaMA (docs/method.md section 8 lists the research sizes; see recipes/configs/)."""

    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    intermediate_size: int = field(default=352, metadata={"help": "Width of the MLP (gate/up/down)."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Number of attention heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "KV heads (GQA); default: all."})
    vocab_size: int | None = field(
        default=None, metadata={"help": "Embedding rows; default: the tokenizer's size. Must be >= it."}
    )
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Default: --max_seq_length."})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base."})
    initializer_range: float = field(default=0.02, metadata={"help": "Std of the normal weight init."})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "Tie lm_head to the input embedding."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "'eager', 'sdpa' or 'flash_attention_2'."}
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of torch (torch.set_num_threads); default: torch's choice. The tiny config "
            "uses 1: its small matrices gain little from more, and one thread stays fast on a busy CPU."
        },
    )


@dataclass
class DataArguments:
    """Training text and tokenizer (see hf_chts.data)."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Default: the embedded corpus. A local .txt/.jsonl file (optionally .gz) or folder, or "
            "a Hub dataset name streamed with `datasets` (the paper: allenai/c4 with --dataset_config en)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (C4: en)."})
    text_field: str = field(default="text", metadata={"help": "JSON key / column holding the text."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation text."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Hub split for validation (C4: validation); default: a hash hold-out."},
    )
    validation_fraction: float = field(default=0.05, metadata={"help": "Documents held out by hash."})
    streaming: bool | None = field(
        default=None, metadata={"help": "Stream Hub data (default for Hub names)."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local path (the paper: t5-base); default: a byte-level BPE trained here."
        },
    )
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the BPE trained here."})
    tokenizer_train_documents: int = field(
        default=100_000, metadata={"help": "Streamed documents the BPE is trained on (Hub datasets)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per training block (the paper: 256)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on validation blocks."})
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of corpus/tokenizer/tokens; default $HF_CHTS_CACHE or ~/.cache."},
    )


def _sparsity_arguments() -> type:
    """SparsityArguments: every SparseTrainingConfig field as a flag, plus `--method dense`.

    Built from the config dataclass so a field added there is a flag here without editing the recipe.
    ``seed`` becomes ``--sparsity_seed`` (``--seed`` is the Trainer's); it defaults to the Trainer's seed.
    """
    hints = typing.get_type_hints(SparseTrainingConfig)
    hints["method"] = str  # checked by `sparse_config` with a message naming the presets and "dense"
    fields = []
    for f in dataclasses.fields(SparseTrainingConfig):
        name, default, meta = f.name, f.default, dict(f.metadata)
        if name == "method":
            default = "chtss"
            meta["help"] = f"'{DENSE}' (no sparse training) or a preset: {', '.join(METHODS)}."
        if name == "seed":
            name, default = "sparsity_seed", None
            hints[name] = int | None
            meta["help"] = "Seed of the topology (init masks, soft sampling); default: --seed."
        fields.append(
            (name, hints[f.name if f.name != "seed" else name], field(default=default, metadata=meta))
        )
    help_ = "Also log every layer's density, turnover and active neurons at update steps (long lines)."
    fields.append(("log_per_layer", bool, field(default=False, metadata={"help": help_})))
    help_ = (
        "Re-warm the learning rate from 0 over this many steps at the start of every cycle of "
        "--cyclic_rewarmup_every steps, for every method, dense included: the authors' LLaMA schedule (10 "
        "of every 100). Never more than 10%% of the cycle (2 of every 20). 0 = off. Use it instead of "
        "--rewarmup_steps (re-warm-up after topology updates, sparse runs only): set that to 0."
    )
    fields.append(("cyclic_rewarmup_steps", int, field(default=0, metadata={"help": help_})))
    help_ = "Cycle of --cyclic_rewarmup_steps in optimizer steps; default: --update_interval."
    fields.append(("cyclic_rewarmup_every", int | None, field(default=None, metadata={"help": help_})))
    cls = dataclasses.make_dataclass("SparsityArguments", fields)
    cls.__module__, cls.__doc__ = __name__, "The sparse-training method: every SparseTrainingConfig field."
    return cls


SparsityArguments = _sparsity_arguments()
# the recipe's own flags among SparsityArguments (not SparseTrainingConfig fields)
RECIPE_ONLY_FLAGS = ("log_per_layer", "cyclic_rewarmup_steps", "cyclic_rewarmup_every")


@dataclass
class EvaluationArguments:
    """Zero-shot evaluation after training (lm-eval, see hf_chts.evaluation)."""

    zero_shot_tasks: list[str] = field(
        default_factory=lambda: list(DEFAULT_ZERO_SHOT_TASKS),
        metadata={
            "help": "lm-eval tasks run after training; default: the offline tiny task. The paper: "
            "arc_easy arc_challenge piqa boolq hellaswag winogrande openbookqa (data from the Hub, or local "
            "files with --zero_shot_local_data_dir). 'none' skips the evaluation."
        },
    )
    zero_shot_local_data_dir: str | None = field(
        default=None, metadata={"help": "Folder of local task files (arc_easy.jsonl ...) for offline runs."}
    )
    zero_shot_include_path: str | None = field(default=None, metadata={"help": "Folder of extra YAML tasks."})
    zero_shot_num_fewshot: int = field(default=0, metadata={"help": "In-context examples per item."})
    zero_shot_limit: int | None = field(default=None, metadata={"help": "Items per task (default: all)."})
    zero_shot_batch_size: int = field(default=8, metadata={"help": "Batch size of the zero-shot evaluation."})

    @property
    def tasks(self) -> list[str]:
        return [t for t in self.zero_shot_tasks if t.lower() != "none"]


def parse_args(argv: list[str] | None = None):
    """Parse ``--config file.yaml`` (default: configs/tiny.yaml) and the flags, which override the file."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, SparsityArguments, EvaluationArguments, TrainingArguments),
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--config", default=None, help=f"YAML file of defaults (default: {DEFAULT_CONFIG}).")
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    config_path = Path(pre.parse_known_args(argv)[0].config or DEFAULT_CONFIG)
    if not config_path.is_file():
        raise FileNotFoundError(f"Config file not found: {config_path}.")
    if not torch.cuda.is_available():
        # Without this a multi-process CPU launch runs each process alone (accelerate needs cpu=True).
        parser.set_defaults(use_cpu=True)
    apply_yaml_defaults(parser, config_path)
    *parsed, _ = parser.parse_args_into_dataclasses(args=argv)
    return parsed


# ---------------------------------------------------------------------------------------------- trainer bits
class PerplexityTrainer(Trainer):
    """A Trainer that logs ``eval_perplexity = exp(eval_loss)`` with every evaluation."""

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(logs["eval_loss"]) if logs["eval_loss"] < 700 else math.inf
        super().log(logs, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ helpers
def build_sparse_config(sparse_args, training_args: TrainingArguments) -> SparseTrainingConfig | None:
    """The SparseTrainingConfig of the flags, or None for ``--method dense``; checked against max_steps."""
    values = dataclasses.asdict(sparse_args)
    for name in RECIPE_ONLY_FLAGS:
        values.pop(name)
    if values["method"] == DENSE:
        return None
    if values["method"] not in METHODS:
        raise ValueError(
            f"Unknown method {values['method']!r}; use {DENSE!r} or one of {', '.join(METHODS)}."
        )
    seed = values.pop("sparsity_seed")
    values["seed"] = training_args.seed if seed is None else seed
    config = SparseTrainingConfig(**values)
    if training_args.max_steps <= 0:
        raise ValueError(
            "Sparse training needs a fixed number of optimizer steps for its schedules: set --max_steps."
        )
    config.check_against_steps(training_args.max_steps)
    return config


def build_rewarmup(sparse_args, sparse_config: SparseTrainingConfig | None) -> CyclicRewarmup | None:
    """The cyclic learning-rate re-warm-up of ``--cyclic_rewarmup_steps`` (None when off), for any method.

    Its length comes from :meth:`hf_chts.recipe_utils.CyclicRewarmup.research` (at most 10% of the cycle).
    Refuses to stack it on the sparse callback's re-warm-up after topology updates (``--rewarmup_steps``).
    """
    steps, every = sparse_args.cyclic_rewarmup_steps, sparse_args.cyclic_rewarmup_every
    if steps < 0:
        raise ValueError(f"--cyclic_rewarmup_steps must be >= 0 (0 = off), got {steps}.")
    if every is not None and every < 1:
        raise ValueError(f"--cyclic_rewarmup_every must be a positive number of steps, got {every}.")
    if not steps:
        return None
    if sparse_config is not None and sparse_config.rewarmup_steps:
        raise ValueError(
            f"--cyclic_rewarmup_steps {steps} and --rewarmup_steps {sparse_config.rewarmup_steps} would both "
            "re-warm the learning rate: pass --rewarmup_steps 0 (the authors' LLaMA schedule re-warms every "
            "cycle) or --cyclic_rewarmup_steps 0 (re-warm-up after topology updates only)."
        )
    return CyclicRewarmup.research(every or sparse_args.update_interval, steps)


def check_push(training_args: TrainingArguments) -> dict[str, Any] | None:
    """Validate ``--push_to_hub`` before training and take it over from the Trainer (one push at the end)."""
    if not training_args.push_to_hub:
        return None
    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id <user or org>/<repo name>.")
    check_repo_id(training_args.hub_model_id)
    token = training_args.hub_token or get_token()
    if token is None:
        raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN.")
    push = {"repo_id": training_args.hub_model_id, "token": token, "private": training_args.hub_private_repo}
    training_args.push_to_hub = False  # no pushes of intermediate checkpoints
    return push


def build_model(model_args: ModelArguments, data_args: DataArguments, tokenizer, sparse_config):
    """A LlamaForCausalLM (dense) or SparseLlamaForCausalLM with the given shape and the tokenizer's ids."""
    vocab_size = model_args.vocab_size or len(tokenizer)
    check_vocab_fits(tokenizer, vocab_size)
    shape = dataclasses.asdict(model_args)
    shape.pop("torch_num_threads")
    shape["vocab_size"] = vocab_size
    shape["max_position_embeddings"] = model_args.max_position_embeddings or data_args.max_seq_length
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sparse_config is None:
        config = LlamaConfig(**shape, **special)
        model_cls = LlamaForCausalLM
    else:
        config = SparseLlamaConfig(**shape, **special, sparsity=sparse_config.to_dict())
        model_cls = SparseLlamaForCausalLM
    return model_cls(config)


def check_zero_shot_tasks(eval_args: EvaluationArguments) -> None:
    """Fail on unknown task names now rather than after training (lm-eval resolves names offline)."""
    if not eval_args.tasks:
        return
    default = tuple(eval_args.zero_shot_tasks) == DEFAULT_ZERO_SHOT_TASKS
    if default and importlib.util.find_spec("lm_eval") is None:
        # The default evaluation is a bonus: without the optional lm-eval the run goes on without it. Tasks
        # the user named still fail here, with the install hint.
        logger.warning(
            "lm-eval is not installed, so the default zero-shot evaluation (%s) is skipped; "
            "pip install 'hf_chts[eval]' to run it, or pass --zero_shot_tasks none to silence this.",
            ", ".join(DEFAULT_ZERO_SHOT_TASKS),
        )
        eval_args.zero_shot_tasks = ["none"]
        return
    with tempfile.TemporaryDirectory(prefix="hf_chts_tasks_") as task_dir:
        resolve_tasks(
            eval_args.tasks,
            task_dir=task_dir,
            local_data_dir=eval_args.zero_shot_local_data_dir,
            include_path=eval_args.zero_shot_include_path,
        )


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts, and the density of the sparse layers when there are masks."""
    summary: dict[str, Any] = {
        "parameters": dense_parameter_count(model),  # the dense layout, whatever the compute
        "nonzero_parameters": sum(
            int(torch.count_nonzero(t)) for t in model.state_dict().values() if t.is_floating_point()
        ),
    }
    sparse = sparsity_summary(model)
    if sparse["numel"]:
        summary["sparse_layers"] = len(sparse["per_layer"])
        summary["sparse_layer_density"] = sparse["density"]
        summary["density_per_projection"] = {k: v["density"] for k, v in sparse["per_projection"].items()}
    return summary


# ------------------------------------------------------------------------------------------------ recipe
def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, sparse_args, eval_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )

    if model_args.torch_num_threads:
        torch.set_num_threads(model_args.torch_num_threads)

    # 1. Everything that can be wrong with the arguments fails here, before any data or training.
    push = check_push(training_args)
    sparse_config = build_sparse_config(sparse_args, training_args)
    rewarmup = build_rewarmup(sparse_args, sparse_config)
    check_zero_shot_tasks(eval_args)

    # 2. Data and tokenizer (the main process builds the caches, the others read them).
    with training_args.main_process_first(desc="data and tokenizer"):
        data = load_lm_data(
            data_args.dataset,
            dataset_config=data_args.dataset_config,
            text_field=data_args.text_field,
            validation_file=data_args.validation_file,
            validation_split=data_args.validation_split,
            validation_fraction=data_args.validation_fraction,
            streaming=data_args.streaming,
            tokenizer_name=data_args.tokenizer_name,
            tokenizer_vocab_size=data_args.tokenizer_vocab_size,
            tokenizer_train_documents=data_args.tokenizer_train_documents,
            max_seq_length=data_args.max_seq_length,
            max_eval_samples=data_args.max_eval_samples,
            cache_dir=data_args.data_cache_dir,
        )
    tokenizer = data.tokenizer
    logger.info("Data: %s", json.dumps(data.info))

    # 3. Model: a dense LLaMA, or a SparseLlama whose q,k,v,o,gate,up,down carry masks (drawn by BRF/ER ...).
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, tokenizer, sparse_config)
    logger.info("Model: %s", json.dumps(model_summary(model)))

    # 4. Train. CHTssCallback evolves the topology every update_interval steps (and, with --rewarmup_steps,
    # re-warms the LR after each update); attached ahead of the --report_to loggers, so they see its keys.
    # CyclicRewarmup re-warms the LR every cycle, for dense runs too.
    callbacks = [rewarmup] if rewarmup is not None else []
    if sparse_config is None:  # CHTssCallback is a FinishedRunGuard itself
        callbacks.append(FinishedRunGuard())
    trainer = PerplexityTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        processing_class=tokenizer,
        data_collator=data.data_collator,
        callbacks=callbacks,
    )
    if sparse_config is not None:
        CHTssCallback(sparse_config, log_per_layer=sparse_args.log_per_layer).attach(trainer)
    train_result = trainer.train(
        resume_from_checkpoint=resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir
        )
    )
    eval_metrics = trainer.evaluate()

    # 5. Save model + tokenizer (the Trainer gathers FSDP shards and writes from the main process only).
    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return {}

    # 6. Zero-shot evaluation, metrics, model card and push: main process only.
    final_model = trainer.model
    if trainer.is_fsdp_enabled:  # sharded parameters: evaluate the gathered checkpoint instead
        dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        final_model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=dtype).to(training_args.device)
    zero_shot = {}
    if eval_args.tasks:
        zero_shot = evaluate(
            final_model,
            tokenizer,
            eval_args.tasks,
            local_data_dir=eval_args.zero_shot_local_data_dir,
            include_path=eval_args.zero_shot_include_path,
            num_fewshot=eval_args.zero_shot_num_fewshot,
            limit=eval_args.zero_shot_limit,
            batch_size=eval_args.zero_shot_batch_size,
            output_dir=output_dir,  # zero_shot_results.json / .md, read by the model card
        )
    metrics = {
        "method": DENSE if sparse_config is None else sparse_config.method,
        "world_size": training_args.world_size,
        "train": train_result.metrics,
        "eval": eval_metrics,
        "zero_shot": zero_shot.get("results", {}),
        "model": model_summary(final_model),
        "data": data.info,
        "sparse_training": None if sparse_config is None else sparse_config.to_dict(resolved=True),
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    # the Trainer's own metric files: train_results.json, eval_results.json and all_results.json
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("eval", eval_metrics)
    tokens_per_step = (
        data_args.max_seq_length
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    write_model_card(
        output_dir,
        repo_id=push["repo_id"] if push else None,
        datasets=[data_args.dataset] if data.info["source"] == "hub" else None,
        training_steps=trainer.state.global_step,
        training_tokens=trainer.state.global_step * tokens_per_step,
        validation_perplexity=eval_metrics.get("eval_perplexity"),
        notes=f"Trained with recipes/llama_pretrain.py on {data.info['description']}; "
        f"tokenizer: {data.info['tokenizer']}.",
    )
    if push is not None:
        push_to_hub(output_dir, write_card=False, **push)
    logger.info(
        "Saved to %s. Validation perplexity %.2f.", output_dir, eval_metrics.get("eval_perplexity", math.nan)
    )
    return metrics


if __name__ == "__main__":
    main()
