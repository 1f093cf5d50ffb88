"""The paper recipes (MLP on MNIST, Transformer on Multi30k) run end to end for a few steps on tiny settings.

Tests needing the shared data (``../shared/data`` next to the repository) skip when it is absent; the others
use synthetic MNIST-like images or a small parallel corpus written to ``tmp_path``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_chts.datasets_paper import (
    ImageClassificationDataset,
    load_mnist,
    read_idx,
    read_parallel_corpus,
    synthetic_image_classification,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
MULTI30K_DIR = SHARED_DATA / "multi30k"
needs_multi30k = pytest.mark.skipif(not MULTI30K_DIR.is_dir(), reason=f"shared data {MULTI30K_DIR} absent")


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as a module (recipes are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def check_saved_masks(output_dir: Path, density: float, expected_layers: int) -> dict[str, torch.Tensor]:
    """Every saved mask holds ``density`` of its links and every masked weight is exactly 0."""
    state = load_file(output_dir / "model.safetensors")
    masks = {k[: -len(".weight_mask")]: v for k, v in state.items() if k.endswith(".weight_mask")}
    assert len(masks) == expected_layers
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert abs(mask.float().mean().item() - density) < 2 / mask.numel() + 1e-6, name
        assert torch.all(state[f"{name}.weight"][~mask] == 0), name
    return masks


# ------------------------------------------------------------------------------------- data loaders
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def test_read_idx_round_trip_and_errors(tmp_path):
    images, labels = synthetic_image_classification(12, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    x, y = load_mnist(tmp_path, "train")
    assert np.array_equal(x, images) and np.array_equal(y, labels) and y.dtype == np.int64
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", images)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        load_mnist(tmp_path, "test")


def test_synthetic_images_are_deterministic_and_split():
    a, la = synthetic_image_classification(50, seed=0, split="train")
    b, lb = synthetic_image_classification(50, seed=0, split="train")
    c, _ = synthetic_image_classification(50, seed=0, split="test")
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert a.shape == (50, 28, 28) and a.dtype == np.uint8 and set(la.tolist()) == set(range(10))
    item = ImageClassificationDataset(a, la)[3]
    assert item["pixel_values"].shape == (784,) and item["pixel_values"].dtype == torch.float32
    assert int(item["labels"]) == 3


def test_read_parallel_corpus(tmp_path):
    (tmp_path / "test_2016_flickr.en").write_text("a dog\n\nthe cat\n", encoding="utf-8")
    with gzip.open(tmp_path / "test_2016_flickr.de.gz", "wt", encoding="utf-8") as f:
        f.write("ein hund\nleer\ndie katze\n")
    src, tgt = read_parallel_corpus(tmp_path, "test")  # falls back to Multi30k's test file name
    assert src == ["a dog", "the cat"] and tgt == ["ein hund", "die katze"]
    assert read_parallel_corpus(tmp_path, "test", max_samples=1) == (["a dog"], ["ein hund"])
    (tmp_path / "val.en").write_text("x\ny\n")
    (tmp_path / "val.de").write_text("x\n")
    with pytest.raises(ValueError, match="not aligned"):
        read_parallel_corpus(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        read_parallel_corpus(tmp_path, "train")


# ------------------------------------------------------------------------------------- MLP recipe
def mlp_argv(tmp_path, *extra):
    if MNIST_DIR.is_dir():
        data = ["--data_dir", str(MNIST_DIR), "--max_train_samples", "640", "--max_eval_samples", "300"]
    else:
        data = ["--synthetic", "--synthetic_train_size", "640", "--synthetic_test_size", "300"]
    return [
        *data,
        "--hidden_sizes", "128", "128", "128",
        "--max_steps", "20",
        "--update_interval", "5",
        "--per_device_eval_batch_size", "300",
        "--output_dir", str(tmp_path / "out"),
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_mlp_recipe_chts(tmp_path):
    recipe = load_recipe("mlp_image_classification")
    results = recipe.main(*recipe.parse_args(mlp_argv(tmp_path, "--method", "chts", "--density", "0.05")))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["method"] == "chts" and saved["sparse_config"]["density"] == 0.05
    assert saved["sparse_config"]["chain_removal"] is True and saved["metrics"]["global_step"] == 20
    assert saved["wall_time_seconds"] > 0 and 0 <= saved["metrics"]["test_accuracy"] <= 1
    assert set(saved["sparsity"]["layers"]) == {"hidden.0", "hidden.1", "hidden.2"}  # classifier stays dense
    active = saved["sparsity"]["active_hidden_neurons"]
    assert 0 < active["all"] <= 1 and set(active) == {"hidden.0", "hidden.1", "hidden.2", "all"}
    assert results["metrics"] == saved["metrics"]
    masks = check_saved_masks(tmp_path / "out", 0.05, expected_layers=3)
    # the reported fraction agrees with the saved masks (hidden.1: rows of hidden.1 and columns of hidden.2)
    has_in, has_out = masks["hidden.1"].any(dim=1), masks["hidden.2"].any(dim=0)
    assert active["hidden.1"] == pytest.approx((has_in & has_out).float().mean().item())


def test_mlp_recipe_dense_synthetic(tmp_path):
    recipe = load_recipe("mlp_image_classification")
    argv = [
        "--synthetic", "--synthetic_train_size", "320", "--synthetic_test_size", "100",
        "--hidden_sizes", "64", "64", "--max_steps", "20", "--method", "dense",
        "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
    ]  # fmt: skip
    results = recipe.main(*recipe.parse_args(argv))
    assert results["sparse_config"] is None and results["sparsity"]["layers"] == {}
    assert results["metrics"]["test_accuracy"] > 0.3  # the synthetic classes are easy to learn
    assert results["sparsity"]["active_hidden_neurons"]["all"] == 1.0
    assert results["data"] == "synthetic" and results["num_train_samples"] == 320
    assert (tmp_path / "out" / "results.json").is_file() and (
        tmp_path / "out" / "model.safetensors"
    ).is_file()


@pytest.mark.parametrize("method", ["dense", "set"])
def test_mlp_recipe_resumes_a_finished_run_as_finished(tmp_path, method):
    # 7 steps of a 40-step epoch: transformers alone would take step 8 on each resume (and save it)
    recipe = load_recipe("mlp_image_classification")
    argv = [
        "--synthetic", "--synthetic_train_size", "320", "--synthetic_test_size", "100",
        "--hidden_sizes", "64", "64", "--max_steps", "7", "--save_strategy", "steps", "--save_steps", "7",
        "--method", method, "--update_interval", "2",
        "--lr_scheduler_type", "constant", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
    ]  # fmt: skip
    recipe.main(*recipe.parse_args(argv))
    weights = load_file(str(tmp_path / "out" / "checkpoint-7" / "model.safetensors"))
    for _ in range(2):
        results = recipe.main(*recipe.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
        assert results["metrics"]["global_step"] == 7
        assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-7"]
        final = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert all(torch.equal(final[key], value) for key, value in weights.items())


def test_mlp_yaml_config_and_overrides(tmp_path):
    recipe = load_recipe("mlp_image_classification")
    args, sparse, training = recipe.parse_args(
        [
            str(REPO / "recipes" / "configs" / "mlp_mnist.yaml"),
            "--method",
            "set",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert args.hidden_sizes == [1000, 1000, 1000] and sparse.density == 0.01 and sparse.zeta == 0.3
    # the authors' README command for CHTs on MLPs
    assert (sparse.init, sparse.ch_variant, sparse.density_schedule) == ("csti", "CH3_L3p", "em_s")
    assert (sparse.removal_mode, sparse.regrowth_mode, sparse.chain_removal) == ("hard", "soft", True)
    assert args.sparse_init == "swi" and sparse.update_interval == 1875 and training.weight_decay == 5e-4
    assert (
        sparse.method == "set" and training.optim_args == "momentum=0.9" and training.num_train_epochs == 100
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("densty: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        recipe.parse_args(["--config", str(bad)])


def test_mlp_chains_follow_consecutive_sparse_layers():
    recipe = load_recipe("mlp_image_classification")
    order = ["hidden.0", "hidden.1", "hidden.2", "classifier"]
    assert [c.layers for c in recipe.mlp_chains(order, order[:3])] == [("hidden.0", "hidden.1", "hidden.2")]
    assert recipe.mlp_chains(order, ["hidden.0", "hidden.2"]) == []
    assert [c.layers for c in recipe.mlp_chains(order, ["hidden.1", "hidden.2", "classifier"])] == [
        ("hidden.1", "hidden.2", "classifier")
    ]


def test_mlp_missing_data_names_the_fix(tmp_path):
    recipe = load_recipe("mlp_image_classification")
    args, _, _ = recipe.parse_args(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="--synthetic"):
        recipe.load_data(args, 0)


# ------------------------------------------------------------------------------------- Transformer recipe
def mt_argv(tmp_path, data_dir, *extra):
    return [
        "--data_dir", str(data_dir),
        "--max_train_samples", "300", "--max_eval_samples", "32", "--max_test_samples", "16",
        "--tokenizer_vocab_size", "1000", "--tokenizer_cache_dir", str(tmp_path / "cache"),
        "--d_model", "32", "--layers", "1", "--attention_heads", "2", "--ffn_dim", "64",
        "--max_new_tokens", "12", "--max_steps", "12", "--per_device_train_batch_size", "16",
        "--warmup_steps", "2", "--update_interval", "4",
        "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def write_toy_corpus(folder: Path) -> Path:
    """A tiny English-German corpus (templated sentences) in Multi30k's file layout."""
    folder.mkdir()
    nouns = [("dog", "Hund"), ("cat", "Katze"), ("man", "Mann"), ("woman", "Frau"), ("child", "Kind")]
    verbs = [("runs", "läuft"), ("sleeps", "schläft"), ("eats", "isst"), ("plays", "spielt")]
    pairs = [(f"The {n} {v}.", f"Der {m} {w}.") for n, m in nouns for v, w in verbs]
    for split, count in (("train", 300), ("val", 20), ("test_2016_flickr", 20)):
        rows = [pairs[i % len(pairs)] for i in range(count)]
        (folder / f"{split}.en").write_text("\n".join(r[0] for r in rows) + "\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("\n".join(r[1] for r in rows) + "\n", encoding="utf-8")
    return folder


def test_transformer_recipe_set_on_toy_corpus(tmp_path):
    recipe = load_recipe("transformer_translation")
    data = write_toy_corpus(tmp_path / "toy")
    results = recipe.main(*recipe.parse_args(mt_argv(tmp_path, data, "--method", "set", "--density", "0.2")))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["method"] == "set" and saved["metrics"]["global_step"] == 12
    assert 0 <= saved["metrics"]["test_bleu"] <= 100 and saved["metrics"]["val_loss"] > 0
    assert saved["num_test_pairs"] == 16 and results["metrics"] == saved["metrics"]
    # q, k, v, out of 3 attentions (encoder self, decoder self, cross) + fc1, fc2 of 2 blocks = 16 layers
    assert saved["sparsity"]["num_sparse_layers"] == 16
    check_saved_masks(tmp_path / "out", 0.2, expected_layers=16)
    assert len((tmp_path / "out" / "test_translations.txt").read_text().splitlines()) == 16


@needs_multi30k
def test_transformer_recipe_chtss_multi30k(tmp_path):
    recipe = load_recipe("transformer_translation")
    argv = mt_argv(tmp_path, MULTI30K_DIR, "--method", "chtss", "--density", "0.05", "--rewarmup_steps", "2")
    results = recipe.main(*recipe.parse_args(argv))
    config = results["sparse_config"]
    assert (
        config["method"] == "chtss" and config["initial_density"] == 0.5 and config["chain_removal"] is True
    )
    assert results["num_train_pairs"] == 300 and results["metrics"]["global_step"] == 12
    assert results["sparsity"]["density"] == pytest.approx(0.05, abs=1e-3)  # the decay reached the target
    assert 0 < results["sparsity"]["active_ffn_neurons"] <= 1
    check_saved_masks(tmp_path / "out", 0.05, expected_layers=16)


def test_transformer_yaml_config_and_chains(tmp_path):
    recipe = load_recipe("transformer_translation")
    args, sparse, training = recipe.parse_args(
        [str(REPO / "recipes" / "configs" / "transformer_multi30k.yaml"), "--output_dir", str(tmp_path)]
    )
    assert (args.d_model, args.layers, args.attention_heads, args.ffn_dim) == (512, 6, 8, 2048)
    assert sparse.method == "chts" and sparse.density == 0.1 and training.label_smoothing_factor == 0.1
    # the authors' Transformer/iwslt_CHTs.sh: BSW 0.25, soft removal T 1 -> 3, CH2-L3n soft, adaptive zeta
    assert (sparse.init, sparse.bsw_beta, sparse.removal_mode, sparse.temperature_end) == (
        "bsw",
        0.25,
        "soft",
        3.0,
    )
    assert (sparse.ch_variant, sparse.regrowth_mode, sparse.zeta_schedule) == ("CH2_L3n", "soft", "cosine")
    assert sparse.update_interval == 100 and sparse.rewarmup_steps == 20 and sparse.chain_removal
    assert training.max_steps == 20000 and training.warmup_steps == 6000 and training.adam_beta2 == 0.998
    names = [
        "model.encoder.layers.0.self_attn.v_proj", "model.encoder.layers.0.self_attn.out_proj",
        "model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2", "model.decoder.layers.0.fc1",
    ]  # fmt: skip
    chains = {c.layers for c in recipe.marian_chains(names)}
    assert chains == {
        ("model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2"),
        ("model.encoder.layers.0.self_attn.v_proj", "model.encoder.layers.0.self_attn.out_proj"),
    }
    assert len(recipe.marian_chains(names, chain_attention=False)) == 1


def test_mlp_default_data_dir_is_not_a_repository_path(tmp_path, monkeypatch):
    """Without --data_dir the recipe reads $HF_CHTS_DATA_DIR/mnist, not a path of the repository's layout."""
    recipe = load_recipe("mlp_image_classification")
    args, _, _ = recipe.parse_args(["--output_dir", str(tmp_path)])
    monkeypatch.delenv("HF_CHTS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"\$HF_CHTS_DATA_DIR is unset.*--data_dir"):
        recipe.load_data(args, 0)
    monkeypatch.setenv("HF_CHTS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"default folder {tmp_path / 'mnist'} does not exist"):
        recipe.load_data(args, 0)
