"""Tests of recipes/llama_pretrain.py: argument parsing, early errors, and short end-to-end runs of main()."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerState

import hf_chts  # noqa: F401  (registers sparse_llama with the Auto classes)
from hf_chts.config import SparseTrainingConfig
from hf_chts.data import build_stdlib_corpus
from hf_chts.recipe_utils import CyclicRewarmup

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama_pretrain.py"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
CONFIGS = REPO / "recipes" / "configs"

# hidden / intermediate / layers / heads of the research LLaMA sizes (docs/method.md section 8)
RESEARCH_SHAPES = {
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "7b": (4096, 11008, 32, 32),
}

# a model small enough for a few CPU steps in about a second
TINY_MODEL = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--tokenizer_vocab_size", "300", "--max_seq_length", "32",
]  # fmt: skip
SHORT_RUN = [
    "--max_steps", "4", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--eval_steps", "2", "--logging_steps", "2", "--warmup_steps", "1", "--max_eval_samples", "8",
    "--zero_shot_limit", "4", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("llama_pretrain", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["llama_pretrain"] = module  # dataclass annotations resolve through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("llama_pretrain", None)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: one thread is as fast, and much faster on a CPU shared with other jobs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = build_stdlib_corpus(modules=["json", "textwrap", "string", "calendar", "csv", "heapq"])
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    # one cache per test session, shared by test_data.py and test_recipe.py: the corpus is built once
    path = tmp_path_factory.getbasetemp() / "hf_chts_cache"
    path.mkdir(exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("size", sorted(RESEARCH_SHAPES))
def test_research_configs_parse_with_paper_settings(recipe, size):
    model, data, sparse, evaluation, training = recipe.parse_args(
        ["--config", str(CONFIGS / f"llama_{size}.yaml")]
    )
    shape = (model.hidden_size, model.intermediate_size, model.num_hidden_layers, model.num_attention_heads)
    assert shape == RESEARCH_SHAPES[size]
    assert data.max_seq_length == 256 and data.tokenizer_name == "t5-base" and data.dataset == "allenai/c4"
    assert (
        training.bf16
        and training.weight_decay == 0.0
        and training.lr_scheduler_type.value.startswith("cosine")
    )
    assert training.warmup_steps > 0 and training.max_steps >= 10_000
    assert sparse.method == "chtss" and sparse.density == 0.3 and sparse.update_interval == 100
    assert "arc_easy" in evaluation.tasks
    # the authors' LR schedule, dense included: re-warm-up over 10 of every 100 steps, cosine floor 0.1
    assert sparse.rewarmup_steps == 0 and sparse.cyclic_rewarmup_steps == 10
    assert training.lr_scheduler_type.value == "cosine_with_min_lr"
    assert training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    for method in ("dense", "chts"):
        args = recipe.parse_args(["--config", str(CONFIGS / f"llama_{size}.yaml"), "--method", method])
        rewarmup = recipe.build_rewarmup(args[2], recipe.build_sparse_config(args[2], args[4]))
        assert (rewarmup.every, rewarmup.steps) == (100, 10)
    # the authors' LLaMA code: top-k CH regrowth, no chain removal, T 1 -> 9, zeta 0.1
    assert (sparse.regrowth_mode, sparse.chain_removal, sparse.temperature_end) == ("hard", False, 9.0)
    if size == "60m":
        assert (
            training.learning_rate == 3e-3 and training.max_steps == 10_000 and training.warmup_steps == 1000
        )
        assert training.per_device_train_batch_size * training.gradient_accumulation_steps * 8 == 512
    for method in ("dense", "chts", "chtss", "set", "rigl", "mest", "granet", "cht", "static"):
        args = recipe.parse_args(["--config", str(CONFIGS / f"llama_{size}.yaml"), "--method", method])
        config = recipe.build_sparse_config(args[2], args[4])
        assert (config is None) == (method == "dense")


def test_default_is_tiny_config_and_flags_override_yaml(recipe):
    model, data, sparse, evaluation, training = recipe.parse_args([])
    assert model.hidden_size == 128 and data.dataset is None and data.tokenizer_name is None
    assert evaluation.tasks == ["hf_chts_tiny_mc"] and sparse.method == "chtss"
    assert training.use_cpu == (not torch.cuda.is_available())
    model, _, sparse, evaluation, training = recipe.parse_args(
        ["--hidden_size", "64", "--method", "chts", "--density", "0.2", "--brf_r", "0.7",
         "--sparsity_seed", "3", "--zero_shot_tasks", "none", "--learning_rate", "1e-3"]
    )  # fmt: skip
    config = recipe.build_sparse_config(sparse, training)
    assert model.hidden_size == 64 and training.learning_rate == 1e-3 and evaluation.tasks == []
    assert (config.method, config.density, config.brf_r, config.seed) == ("chts", 0.2, 0.7, 3)
    assert config.regrowth == "ch" and config.removal_mode == "soft"  # the preset fills the rest
    # the sparsity seed defaults to the Trainer's seed
    _, _, sparse, _, training = recipe.parse_args(["--seed", "7"])
    assert recipe.build_sparse_config(sparse, training).seed == 7


def test_every_sparse_training_field_is_a_flag(recipe):
    flags = {f.name for f in dataclasses.fields(recipe.SparsityArguments)}
    fields = {f.name for f in dataclasses.fields(SparseTrainingConfig)} - {"seed"}
    assert fields | {"sparsity_seed", *recipe.RECIPE_ONLY_FLAGS} == flags


@pytest.mark.parametrize("method", ["dense", "chts", "chtss"])
def test_default_lr_schedule_is_the_research_one_for_every_method(recipe, method):
    # tiny.yaml: update_interval 20, so the research re-warm-up is 2 of every 20 steps (<= 10%), cosine floor
    _, _, sparse, _, training = recipe.parse_args(["--method", method])
    assert training.lr_scheduler_type.value == "cosine_with_min_lr"
    assert training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    config = recipe.build_sparse_config(sparse, training)
    assert config is None or config.rewarmup_steps == 0
    rewarmup = recipe.build_rewarmup(sparse, config)
    assert (rewarmup.every, rewarmup.steps) == (20, 2)
    assert [rewarmup.factor(s) for s in (0, 1, 2, 19, 20, 21, 22)] == [0, 0.5, 1, 1, 0, 0.5, 1]
    # its own cycle, and off
    _, _, sparse, _, training = recipe.parse_args(["--method", method, "--cyclic_rewarmup_every", "50"])
    rewarmup = recipe.build_rewarmup(sparse, recipe.build_sparse_config(sparse, training))
    assert (rewarmup.every, rewarmup.steps) == (50, 5)
    _, _, sparse, _, training = recipe.parse_args(["--method", method, "--cyclic_rewarmup_steps", "0"])
    assert recipe.build_rewarmup(sparse, recipe.build_sparse_config(sparse, training)) is None


def test_cyclic_rewarmup_refuses_bad_values_and_a_second_rewarmup(recipe):
    def build(*argv):
        _, _, sparse, _, training = recipe.parse_args(list(argv))
        return recipe.build_rewarmup(sparse, recipe.build_sparse_config(sparse, training))

    with pytest.raises(ValueError, match=r"--rewarmup_steps 0.*--cyclic_rewarmup_steps 0"):
        build("--method", "chts", "--rewarmup_steps", "5")
    assert build("--method", "dense", "--rewarmup_steps", "5") is not None  # no topology update to re-warm
    assert build("--method", "chts", "--rewarmup_steps", "5", "--cyclic_rewarmup_steps", "0") is None
    with pytest.raises(ValueError, match="--cyclic_rewarmup_steps must be >= 0"):
        build("--cyclic_rewarmup_steps", "-1")
    with pytest.raises(ValueError, match="--cyclic_rewarmup_every must be a positive"):
        build("--cyclic_rewarmup_every", "0")


def test_bad_arguments_fail_before_any_data_is_read(recipe, monkeypatch, tmp_path):
    monkeypatch.setattr(recipe, "load_lm_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    out = ["--output_dir", str(tmp_path / "out"), "--zero_shot_tasks", "none"]
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        recipe.main([*out, "--push_to_hub", "true"])
    with pytest.raises(ValueError, match="set --max_steps"):
        recipe.main([*out, "--max_steps", "-1"])
    with pytest.raises(ValueError, match="update_interval=500 is larger than t_end"):
        recipe.main([*out, "--update_interval", "500"])
    with pytest.raises(ValueError, match="Unknown method 'magic'.*'dense'"):
        recipe.main([*out, "--method", "magic"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("hidden_size: 64\nnot_an_argument: 1\n")
    with pytest.raises(ValueError, match=r"Unknown keys \['not_an_argument'\]"):
        recipe.main(["--config", str(bad_yaml)])
    with pytest.raises(FileNotFoundError, match="Config file not found"):
        recipe.main(["--config", str(tmp_path / "missing.yaml")])

    # unknown zero-shot task names are checked (by hf_chts.evaluation.resolve_tasks) before the data
    def unknown(tasks, **kwargs):
        raise ValueError(f"Unknown zero-shot task(s) {tasks}")

    monkeypatch.setattr(recipe, "resolve_tasks", unknown)
    with pytest.raises(ValueError, match="Unknown zero-shot task"):
        recipe.main(["--output_dir", str(tmp_path / "out"), "--zero_shot_tasks", "not_a_task"])


def test_data_and_vocab_errors_before_training(recipe, monkeypatch, tmp_path, corpus_file, data_cache):
    monkeypatch.setattr(recipe.PerplexityTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    base = [
        "--output_dir",
        str(tmp_path / "out"),
        "--zero_shot_tasks",
        "none",
        "--data_cache_dir",
        str(data_cache),
    ]
    with pytest.raises(FileNotFoundError, match="not found"):
        recipe.main([*base, "--dataset", str(tmp_path / "missing.jsonl")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="is empty"):
        recipe.main([*base, "--dataset", str(empty)])
    with pytest.raises(ValueError, match="300 tokens but the model's vocab_size is 100"):
        recipe.main([*base, *TINY_MODEL, "--dataset", str(corpus_file), "--vocab_size", "100"])


@pytest.mark.slow
def test_unknown_task_name_fails_before_training(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "load_lm_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ValueError, match="Unknown zero-shot task"):
        recipe.main(
            ["--output_dir", str(tmp_path), "--zero_shot_tasks", "hf_chts_tiny_mc", "not_a_task_name"]
        )


# ------------------------------------------------------------------------------------------- end to end
def _check_outputs(out: Path, method: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method
    ppl, loss = metrics["eval"]["eval_perplexity"], metrics["eval"]["eval_loss"]
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-6) and ppl < 300  # below uniform over 300 tokens
    if HAS_LM_EVAL:  # without the optional lm-eval the default zero-shot evaluation is skipped
        assert 0.0 <= metrics["zero_shot"]["hf_chts_tiny_mc"]["acc"] <= 1.0
    else:
        assert metrics["zero_shot"] == {}
    history = TrainerState.load_from_json(str(out / "trainer_state.json")).log_history
    assert any("eval_perplexity" in entry for entry in history)
    saved = json.loads((out / "all_results.json").read_text())  # trainer.save_metrics
    assert saved["eval_loss"] == loss and saved["train_loss"] == metrics["train"]["train_loss"]
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card
    if HAS_LM_EVAL:
        assert "hf_chts_tiny_mc" in card
        index = ModelCard(card).data.eval_results  # model-index: the Hub shows these
        assert any(r.dataset_name == "hf_chts_tiny_mc" and r.metric_type == "acc" for r in index)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Return the JSON encoding of the object.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    return {"metrics": metrics, "model": model, "card": card}


def test_main_dense_on_local_file(recipe, tmp_path, corpus_file, data_cache, monkeypatch):
    out = tmp_path / "dense"
    args = ["--method", "dense", "--dataset", str(corpus_file), "--data_cache_dir", str(data_cache)]
    trainers = []

    class Recorded(recipe.PerplexityTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            trainers.append(self)

    monkeypatch.setattr(recipe, "PerplexityTrainer", Recorded)
    # the dense run gets the cyclic LR re-warm-up too (1 of every 10 steps here)
    args += ["--update_interval", "10"]
    metrics = recipe.main([*args, *TINY_MODEL, *SHORT_RUN, "--output_dir", str(out)])
    (rewarmup,) = [c for c in trainers[0].callback_handler.callbacks if isinstance(c, CyclicRewarmup)]
    assert (rewarmup.every, rewarmup.steps) == (10, 1)
    assert metrics["train"]["train_loss"] > 0 and metrics["data"]["source"] == "local"
    result = _check_outputs(out, "dense")
    assert type(result["model"]).__name__ == "LlamaForCausalLM"
    summary = result["metrics"]["model"]
    assert "sparse_layers" not in summary
    assert summary["nonzero_parameters"] > 0.99 * summary["parameters"]  # only the padding embedding row is 0


def test_main_chtss_on_embedded_corpus(recipe, tmp_path, data_cache):
    out = tmp_path / "chtss"
    args = ["--method", "chtss", "--density", "0.3", "--update_interval", "1", "--rewarmup_steps", "1",
            "--cyclic_rewarmup_steps", "0"]  # fmt: skip
    metrics = recipe.main(
        [*args, *TINY_MODEL, *SHORT_RUN, "--data_cache_dir", str(data_cache), "--output_dir", str(out)]
    )
    assert metrics["data"]["source"] == "embedded"
    result = _check_outputs(out, "chtss")
    model = result["model"]
    assert type(model).__name__ == "SparseLlamaForCausalLM"
    masks = {n: b for n, b in model.named_buffers() if n.endswith("weight_mask")}
    assert len(masks) == 2 * 7
    # the sigmoid decay 0.5 -> 0.3 ends by t_end (step 3 of 4): the saved masks are at the final density
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(density - 0.3) < 0.01
    assert math.isclose(result["metrics"]["model"]["sparse_layer_density"], density, rel_tol=1e-6)
    for name, mask in masks.items():
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.count_nonzero(weight[~mask]) == 0
    assert "CHTss" in result["card"]


# ------------------------------------------------------------------------------------------- multi-process
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, corpus_file, data_cache):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate_configs/multi_cpu.yaml"),
        "--main_process_port", str(_free_port()), str(RECIPE), *TINY_MODEL, *SHORT_RUN,
        "--max_steps", "20", "--eval_steps", "10", "--update_interval", "5", "--dataset", str(corpus_file),
        "--data_cache_dir", str(data_cache), "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available():
        pytest.skip("multi_cpu.yaml is for machines without CUDA")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["method"] == "chtss"
    assert abs(metrics["model"]["sparse_layer_density"] - 0.3) < 0.01
    _check_outputs(out, "chtss")


def test_default_zero_shot_is_skipped_without_lm_eval(recipe, monkeypatch, caplog):
    # Without the optional lm-eval, the default evaluation is dropped with a warning; named tasks still fail.
    real = importlib.util.find_spec
    missing = lambda name, *a: None if name == "lm_eval" else real(name)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    eval_args = recipe.EvaluationArguments()
    with caplog.at_level("WARNING", logger="llama_pretrain"):
        recipe.check_zero_shot_tasks(eval_args)
    assert eval_args.tasks == [] and "lm-eval is not installed" in caplog.text
    named = recipe.EvaluationArguments(zero_shot_tasks=["arc_easy"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="lm-eval"):
        recipe.check_zero_shot_tasks(named)
