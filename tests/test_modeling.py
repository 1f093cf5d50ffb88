"""Tests of hf_chts.modeling: SparseLlamaConfig / SparseLlamaForCausalLM on a tiny local LLaMA, offline.

Tiny config: hidden 32, 2 layers, 4 heads, 2 kv heads (head_dim 8), intermediate 64, vocab 128.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_chts.config import SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.masking import MaskedLinear, apply_masks_, get_masks
from hf_chts.modeling import (
    SPARSE_PROJECTIONS,
    SparseLlamaConfig,
    SparseLlamaForCausalLM,
    llama_chains,
    register,
    sparsity_summary,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
SPARSITY = {"method": "chts", "density": 0.3, "seed": 0}
SHAPES = {  # (n_out, n_in) of every projection of the tiny config
    "q_proj": (32, 32),
    "k_proj": (16, 32),
    "v_proj": (16, 32),
    "o_proj": (32, 32),
    "gate_proj": (64, 32),
    "up_proj": (64, 32),
    "down_proj": (32, 64),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(sparsity=None, **kwargs) -> SparseLlamaConfig:
    return SparseLlamaConfig(**TINY, sparsity=dict(SPARSITY if sparsity is None else sparsity), **kwargs)


def make_model(weight_seed: int = 0, **kwargs) -> SparseLlamaForCausalLM:
    torch.manual_seed(weight_seed)  # the weights; masks are seeded by config.sparsity["seed"]
    return SparseLlamaForCausalLM(tiny_config(**kwargs))


def input_ids() -> torch.Tensor:
    return (torch.arange(12).reshape(2, 6) * 7) % TINY["vocab_size"]


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(input_ids()).logits


def layer_names(projections=SPARSE_PROJECTIONS, layers=range(2)) -> list[str]:
    parent = {
        p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in projections
    }
    return [f"model.layers.{i}.{parent[p]}.{p}" for i in layers for p in projections]


def clone_masks(model) -> dict[str, torch.Tensor]:
    return {name: mask.clone() for name, mask in get_masks(model).items()}


def rewrite_checkpoint(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def assert_masked_zero(model) -> None:
    for name, mask in get_masks(model).items():
        weight = model.get_submodule(name).weight
        assert torch.count_nonzero(weight[~mask]) == 0, name


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_and_serialisation():
    config = tiny_config()
    assert config.model_type == "sparse_llama"
    assert config.sparsity == SparseTrainingConfig(**SPARSITY).to_dict(resolved=True)
    assert config.sparse_projections == list(SPARSE_PROJECTIONS)
    assert config.sparse_layer_names() == layer_names()
    data = config.to_dict()
    assert data["model_type"] == "sparse_llama" and data["sparsity"]["density"] == 0.3
    # whatever the base LlamaConfig of this transformers version does not round-trip itself is left out
    base = LlamaConfig().to_dict()
    unstable = set(base) ^ set(LlamaConfig.from_dict(base).to_dict())
    stable = {k: v for k, v in data.items() if k not in unstable}
    again = SparseLlamaConfig.from_dict(data).to_dict()
    assert {k: v for k, v in again.items() if k not in unstable} == stable
    # a SparseTrainingConfig object is accepted and stored as its dict
    from_object = SparseLlamaConfig(**TINY, sparsity=SparseTrainingConfig(method="chtss", density=0.1))
    assert from_object.sparsity["initial_density"] == 0.5
    assert from_object.sparse_training_config == SparseTrainingConfig(method="chtss", density=0.1)
    # the default is a full SparseTrainingConfig
    assert SparseLlamaConfig(**TINY).sparsity == SparseTrainingConfig().to_dict(resolved=True)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="density"):
        tiny_config({"density": 1.5})
    with pytest.raises(ValueError, match="Unknown SparseTrainingConfig fields"):
        tiny_config({"densty": 0.3})
    with pytest.raises(ValueError, match="lm_head"):
        tiny_config(sparse_projections=["q_proj", "lm_head"])
    config = tiny_config()
    with pytest.raises(ValueError, match="density"):
        config.sparsity = {"density": 0.0}
    with pytest.raises(ValueError, match="No sparse layer left"):
        tiny_config({"exclude_modules": ["layers"]}).sparse_layer_names()
    with pytest.raises(ValueError, match="SparseLlamaConfig"):
        SparseLlamaForCausalLM(LlamaConfig(**TINY))


# ------------------------------------------------------------------------------------------ fresh model
def test_fresh_model_masks_exact_counts_and_zeros():
    model = make_model()
    masks = get_masks(model)
    assert list(masks) == layer_names()
    state = model.state_dict()
    for name, mask in masks.items():
        module = model.get_submodule(name)
        n_out, n_in = SHAPES[name.rsplit(".", 1)[-1]]
        assert isinstance(module, MaskedLinear)
        assert mask.dtype == torch.bool and mask.shape == module.weight.shape == (n_out, n_in)
        assert int(mask.sum()) == round(0.3 * n_out * n_in), name
        assert torch.equal(state[f"{name}.weight_mask"], mask)  # persistent buffer
        assert torch.count_nonzero(module.weight[mask]) == mask.sum()  # kept weights were initialised
    assert_masked_zero(model)
    # embeddings, norms and lm_head stay dense
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in masks)
    assert type(model.lm_head) is torch.nn.Linear


def test_masks_are_seeded_and_come_from_the_engine():
    a, b = make_model(weight_seed=0), make_model(weight_seed=1)
    for name, mask in get_masks(a).items():
        assert torch.equal(mask, get_masks(b)[name]), name
    other = make_model(sparsity={**SPARSITY, "seed": 1})
    assert any(not torch.equal(m, get_masks(other)[n]) for n, m in get_masks(a).items())
    # initialisation lives in one place: the engine's init_masks
    cfg = SparseTrainingConfig(**SPARSITY)
    shapes = {name: tuple(mask.shape) for name, mask in get_masks(a).items()}
    expected = TopologyEngine(cfg, shapes, max_steps=cfg.update_interval).init_masks()
    for name, mask in get_masks(a).items():
        assert torch.equal(mask, expected[name]), name


def test_chtss_starts_at_the_initial_density():
    model = make_model(sparsity={"method": "chtss", "density": 0.1})
    for name, mask in get_masks(model).items():
        n_out, n_in = SHAPES[name.rsplit(".", 1)[-1]]
        assert int(mask.sum()) == round(0.5 * n_out * n_in), name


def test_sparse_projection_subsets():
    mlp_only = make_model(sparse_projections=["down_proj", "gate_proj", "up_proj"])
    assert mlp_only.config.sparse_projections == ["gate_proj", "up_proj", "down_proj"]  # canonical order
    assert list(get_masks(mlp_only)) == layer_names(("gate_proj", "up_proj", "down_proj"))
    assert type(mlp_only.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert llama_chains(mlp_only) == []
    first_only = make_model(sparsity={**SPARSITY, "exclude_modules": [r"layers\.1\."]})
    assert list(get_masks(first_only)) == layer_names(layers=[0])


def test_forward_ignores_masked_weights():
    model = make_model()
    before = logits_of(model)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[~q.weight_mask] = 5.0
    apply_masks_(q)  # weights written directly are re-masked (the forward relies on masked weights = 0.0)
    torch.testing.assert_close(logits_of(model), before, rtol=0, atol=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.weight"][~q.weight_mask] = 5.0
    model.load_state_dict(state)  # a checkpoint with non-zero masked weights is zeroed on load
    assert torch.all(q.weight[~q.weight_mask] == 0.0)
    torch.testing.assert_close(logits_of(model), before, rtol=0, atol=0)
    # and the gradient of every masked weight is exactly 0 (all sparse layers use the masked forward)
    model(input_ids(), labels=input_ids()).loss.backward()
    for name, mask in get_masks(model).items():
        assert torch.count_nonzero(model.get_submodule(name).weight.grad[~mask]) == 0, name


def test_init_weights_again_never_redraws_masks():
    model = make_model()
    q = model.model.layers[0].self_attn.q_proj
    custom = torch.zeros_like(q.weight_mask)
    custom[:, :3] = True
    with torch.no_grad():
        q.weight_mask.copy_(custom)
    for mask in get_masks(model).values():  # as after moving buffers with .to(device)
        mask.__dict__.pop("_is_hf_initialized", None)
    model.init_weights()
    assert torch.equal(q.weight_mask, custom)


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize(
    "save_dtype, load_kwargs, expected_dtype",
    [
        (torch.float32, {}, torch.float32),
        (torch.bfloat16, {"dtype": torch.bfloat16}, torch.bfloat16),
        (torch.bfloat16, {"torch_dtype": torch.bfloat16}, torch.bfloat16),
        (torch.float32, {"dtype": torch.bfloat16}, torch.bfloat16),
    ],
    ids=["fp32", "bf16-dtype", "bf16-torch_dtype", "fp32-ckpt-as-bf16"],
)
def test_save_load_round_trip(tmp_path, save_dtype, load_kwargs, expected_dtype):
    model = make_model().to(save_dtype)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "sparse_llama" and saved["sparsity"]["density"] == 0.3
    assert (
        load_file(tmp_path / "model.safetensors")["model.layers.0.mlp.up_proj.weight_mask"].dtype
        == torch.bool
    )

    loaded = SparseLlamaForCausalLM.from_pretrained(tmp_path, **load_kwargs)
    assert loaded.config.sparsity == model.config.sparsity
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key, value in original.items():
        got = reloaded[key]
        if key.endswith("weight_mask"):
            assert got.dtype == torch.bool and torch.equal(got, value), key
        elif value.is_floating_point():
            assert got.dtype == expected_dtype, key
            assert torch.equal(got, value.to(expected_dtype)), key  # bit-equal (0.0 stays 0.0)
    assert_masked_zero(loaded)
    torch.testing.assert_close(logits_of(loaded), logits_of(model.to(expected_dtype)), rtol=0, atol=0)


def test_auto_classes_in_a_fresh_process(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "scripts" / "check_auto_classes.py"
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(out)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config_class"] == "SparseLlamaConfig" and report["model_type"] == "sparse_llama"
    assert report["model_class"] == "SparseLlamaForCausalLM"
    assert report["sparsity"] == model.config.sparsity
    assert report["mask_dtypes"] == ["torch.bool"]
    expected = {
        f"{name}.weight_mask": hashlib.sha256(mask.numpy().tobytes()).hexdigest()
        for name, mask in get_masks(model).items()
    }
    assert report["mask_sha256"] == expected
    torch.testing.assert_close(
        torch.tensor(report["logits"]), logits_of(model).flatten(), rtol=1e-6, atol=1e-6
    )


def test_register_is_idempotent():
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    register()
    assert type(AutoConfig.for_model("sparse_llama")) is SparseLlamaConfig
    assert AutoModelForCausalLM.from_config(tiny_config()).__class__ is SparseLlamaForCausalLM


# ------------------------------------------------------------------------------------------ dense checkpoints
@pytest.mark.parametrize("how", ["sparsity-kwarg", "config"])
def test_dense_checkpoint_loads_masked(tmp_path, how):
    torch.manual_seed(3)
    dense = LlamaForCausalLM(LlamaConfig(**TINY))
    dense.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    sparsity = {"method": "chts", "density": 0.2, "seed": 5}
    if how == "config":
        model = SparseLlamaForCausalLM.from_pretrained(tmp_path, config=tiny_config(sparsity))
    else:
        model = SparseLlamaForCausalLM.from_pretrained(tmp_path, sparsity=sparsity)
    assert isinstance(model.config, SparseLlamaConfig) and model.config.model_type == "sparse_llama"
    assert model.config.sparsity["density"] == 0.2

    fresh = make_model(sparsity=sparsity)  # the masks a new model with these settings draws
    masks = get_masks(model)
    assert list(masks) == layer_names()
    dense_state = dense.state_dict()
    for name, mask in masks.items():
        n_out, n_in = SHAPES[name.rsplit(".", 1)[-1]]
        assert mask.dtype == torch.bool and int(mask.sum()) == round(0.2 * n_out * n_in), name
        assert torch.equal(mask, get_masks(fresh)[name]), name  # well-formed and seeded, not garbage
        weight = model.get_submodule(name).weight
        expected = torch.where(mask, dense_state[f"{name}.weight"], torch.zeros(()))
        assert torch.equal(weight, expected), name  # dense weight where kept, exactly 0.0 elsewhere
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(model.state_dict()[key], dense_state[key]), key

    # and it saves as a sparse model
    model.save_pretrained(tmp_path / "sparse")
    assert json.loads((tmp_path / "sparse" / "config.json").read_text())["model_type"] == "sparse_llama"


def test_sparse_checkpoint_without_masks_raises(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.endswith("weight_mask")])
    with pytest.raises(ValueError) as info:
        SparseLlamaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.weight_mask" in message and "14" in message
    assert "LlamaForCausalLM.from_pretrained" in message and "init_missing_masks=True" in message

    # the fix: draw fresh masks; the loaded weights are zeroed outside them
    loaded = SparseLlamaForCausalLM.from_pretrained(tmp_path, init_missing_masks=True)
    for name, mask in get_masks(loaded).items():
        assert torch.equal(mask, get_masks(model)[name]), name  # same config seed -> same masks
    assert_masked_zero(loaded)


def test_partially_missing_masks_raise(tmp_path):
    make_model().save_pretrained(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_mask"))
    with pytest.raises(
        ValueError, match=r"lacks 1 of its masks: model\.layers\.1\.mlp\.down_proj\.weight_mask"
    ):
        SparseLlamaForCausalLM.from_pretrained(tmp_path)


def test_wrong_mask_shape_raises(tmp_path):
    make_model().save_pretrained(tmp_path)
    key = "model.layers.1.self_attn.k_proj.weight_mask"
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(key, torch.ones(16, 31, dtype=torch.bool)))
    with pytest.raises(ValueError) as info:
        SparseLlamaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "model.layers.1.self_attn.k_proj" in message
    assert "(16, 31)" in message and "expected (16, 32)" in message


def test_wrong_mask_dtype_raises(tmp_path):
    make_model().save_pretrained(tmp_path)
    key = "model.layers.0.mlp.gate_proj.weight_mask"
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(key, t[key].float()))
    with pytest.raises(ValueError) as info:
        SparseLlamaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj" in message
    assert "torch.float32" in message and "expected torch.bool" in message


# ------------------------------------------------------------------------------------------ dense export
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_to_dense(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie)
    dense = model.to_dense()
    assert type(dense) is LlamaForCausalLM and dense.config.model_type == "llama"
    assert not any(k.endswith("weight_mask") for k in dense.state_dict())
    assert not any(isinstance(m, MaskedLinear) for m in dense.modules())
    if tie:
        assert dense.lm_head.weight is dense.model.embed_tokens.weight
    torch.testing.assert_close(logits_of(dense), logits_of(model), rtol=0, atol=0)
    for name in get_masks(model):
        assert torch.equal(dense.get_submodule(name).weight, model.get_submodule(name).weight), name
    # an independent copy
    with torch.no_grad():
        dense.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert_masked_zero(model)

    dense = model.to_dense()
    dense.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llama" and "sparsity" not in saved
    assert saved["architectures"] == ["LlamaForCausalLM"]
    reloaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=0)


def test_plain_llama_loads_the_sparse_folder(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    plain, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(plain) is LlamaForCausalLM and not info["missing_keys"]
    assert set(info["unexpected_keys"]) == {f"{n}.weight_mask" for n in layer_names()}
    for name, mask in get_masks(model).items():
        assert torch.count_nonzero(plain.get_submodule(name).weight[~mask]) == 0, name
    torch.testing.assert_close(logits_of(plain), logits_of(model), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ helpers
def test_llama_chains():
    model = make_model()
    chains = llama_chains(model)
    assert [c.q for c in chains] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert chains[1].down == "model.layers.1.mlp.down_proj"
    assert (chains[0].num_heads, chains[0].num_kv_heads, chains[0].head_dim) == (4, 2, 8)
    assert llama_chains(model.config) == chains
    assert llama_chains(LlamaConfig(**TINY)) == chains
    assert llama_chains(model.model) == [  # a bare LlamaModel: names without the "model." prefix
        type(c).from_prefix(f"layers.{i}", num_heads=4, num_kv_heads=2, head_dim=8)
        for i, c in enumerate(chains)
    ]
    assert llama_chains(model, names=layer_names(layers=[1])) == chains[1:]
    # the engine accepts them
    shapes = {name: tuple(mask.shape) for name, mask in get_masks(model).items()}
    engine = TopologyEngine(model.config.sparse_training_config, shapes, chains=chains, max_steps=10)
    assert engine.groups() == [list(c.names) for c in chains]


def test_sparsity_summary():
    model = make_model()
    summary = sparsity_summary(model)
    assert set(summary["per_layer"]) == set(layer_names())
    q = summary["per_layer"]["model.layers.0.self_attn.q_proj"]
    assert q == {"density": 307 / 1024, "nnz": 307, "numel": 1024, "shape": (32, 32)}
    total_nnz = 2 * sum(round(0.3 * o * i) for o, i in SHAPES.values())
    total = 2 * sum(o * i for o, i in SHAPES.values())
    assert summary["nnz"] == total_nnz and summary["numel"] == total
    assert summary["density"] == total_nnz / total
    gate = summary["per_projection"]["gate_proj"]
    assert gate == {"nnz": 2 * 614, "numel": 2 * 2048, "layers": 2, "density": 614 / 2048}
    assert set(summary["per_projection"]) == set(SPARSE_PROJECTIONS)
    json.dumps(summary)  # model-card ready


def test_config_dropping_masks_the_checkpoint_holds_is_refused(tmp_path):
    # config.json edited to sparse_projections=["q_proj"] while the file holds all seven masks per block:
    # loading would silently make six projections per block dense.
    make_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["sparse_projections"] = ["q_proj"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"holds masks for 12 layers that its config does not make sparse"):
        SparseLlamaForCausalLM.from_pretrained(tmp_path / "m")


def test_sparsity_summary_without_masks_measures_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    summary = sparsity_summary(LlamaForCausalLM(LlamaConfig(**arch)))
    assert summary["density"] is None and summary["numel"] == 0 and summary["per_layer"] == {}


def test_auto_loading_a_truncated_sparse_checkpoint_names_the_file(tmp_path):
    from transformers import AutoModelForCausalLM

    model = SparseLlamaForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated.*Save the model again"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
