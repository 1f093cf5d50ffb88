"""Tests of hf_chts.masking: selection on tiny local models, masked forward, mask I/O, optimizer state."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _io_helpers import tiny_llama_arch
from safetensors.torch import load_file
from torch import nn

from hf_chts.config import SparseTrainingConfig
from hf_chts.masking import (
    MaskedLinear,
    apply_masks_,
    find_sparse_modules,
    from_layer_view,
    get_masks,
    install_grad_masks_,
    is_masked,
    layer_view,
    make_masked_,
    set_grad_capture_,
    set_masks_,
    zero_optimizer_state_,
)
from hf_chts.sparsify import sparsify_

# ------------------------------------------------------------------------------------------ tiny models


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**tiny_llama_arch(100)))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(cfg)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return T5ForConditionalGeneration(cfg)


def tiny_marian():
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    return MarianMTModel(cfg)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(cfg)


def checkerboard(shape) -> torch.Tensor:
    rows = torch.arange(shape[0])[:, None]
    cols = torch.arange(shape[1])[None, :]
    return (rows + cols) % 2 == 0


# ------------------------------------------------------------------------------------------ selection
LLAMA_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("builder", "count", "example", "never"),
    [
        (tiny_llama, 14, "model.layers.1.mlp.down_proj", "lm_head"),
        (tiny_gpt2, 8, "transformer.h.0.attn.c_attn", "lm_head"),
        (tiny_bert, 12, "bert.encoder.layer.0.attention.self.query", "cls.predictions.decoder"),
        (tiny_t5, 32, "decoder.block.1.layer.1.EncDecAttention.o", "lm_head"),
        (tiny_marian, 32, "model.decoder.layers.0.encoder_attn.k_proj", "lm_head"),
        (tiny_vit, 12, "vit.layers.1.mlp.fc2", "classifier"),
    ],
)
def test_default_selection_on_tiny_architectures(builder, count, example, never):
    model = builder()
    selected = find_sparse_modules(model)
    assert len(selected) == count
    assert example in selected
    assert never not in selected
    assert not any("embed" in name or "norm" in name for name in selected)


def test_default_selection_llama_exact_names():
    selected = find_sparse_modules(tiny_llama())
    expected = [
        f"model.layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{p}"
        for i in range(2)
        for j, p in enumerate(LLAMA_BLOCK)
    ]
    assert list(selected) == expected


def test_target_and_exclude_patterns():
    model = tiny_llama()
    selected = find_sparse_modules(
        model, target_modules=[r"mlp\.(gate|up)_proj$"], exclude_modules=[r"layers\.1\."]
    )
    assert list(selected) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


def test_tied_and_output_embeddings_never_selected():
    gpt2 = tiny_gpt2()
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    selected = find_sparse_modules(gpt2, target_modules=[r"lm_head", r"h\.0\.mlp\.c_fc"])
    assert list(selected) == ["transformer.h.0.mlp.c_fc"]
    bert = tiny_bert()
    selected = find_sparse_modules(bert, target_modules=[r"decoder$", r"transform\.dense"])
    assert list(selected) == ["cls.predictions.transform.dense"]


def test_no_match_raises_with_patterns_and_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"nothing_like_this.*q_proj"):
        find_sparse_modules(model, target_modules=["nothing_like_this"])
    with pytest.raises(ValueError, match="inside an nn.ModuleList"):
        find_sparse_modules(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match="list of regular expressions"):
        find_sparse_modules(model, target_modules="q_proj")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_sparse_modules(model, target_modules=["(unclosed"])


def test_subclass_with_own_forward_is_refused():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="exclude_modules"):
        make_masked_(Custom(3, 3), name="blocks.0.custom")


def test_subclass_with_inherited_forward_is_masked():
    class Tagged(nn.Linear):
        pass

    layer = Tagged(3, 2)
    make_masked_(layer, checkerboard((2, 3)), name="tagged")
    assert isinstance(layer, Tagged) and is_masked(layer)
    clone = copy.deepcopy(layer)
    assert type(clone) is type(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert torch.equal(restored.weight_mask, layer.weight_mask)


# ------------------------------------------------------------------------------------------ masked forward
def test_masked_linear_forward_and_exact_zero_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    mask = checkerboard((5, 6))
    make_masked_(layer, mask, name="fc")
    assert isinstance(layer, MaskedLinear)
    assert torch.all(layer.weight[~mask] == 0.0)
    with torch.no_grad():
        layer.weight.add_(1.0)  # written directly: masked entries become non-zero ...
    apply_masks_(layer)  # ... and the documented rule puts them back to 0.0
    assert torch.all(layer.weight[~mask] == 0.0) and torch.all(layer.weight[mask] != 0.0)
    x = torch.randn(7, 6)
    expected = x @ (layer.weight * mask).T + layer.bias
    out = layer(x)
    assert torch.allclose(out, expected)
    (out.pow(2).sum() * 1e6).backward()
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    assert torch.all(layer.weight.grad[~mask] == 0.0)
    assert torch.any(layer.weight.grad[mask] != 0.0)


def test_masked_conv1d_matches_linear_and_layer_view_transposes():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs, weight (6, 5)
    mask = checkerboard((6, 5))
    make_masked_(conv, mask, name="c_fc")
    assert type(conv).__name__ == "MaskedConv1D" and isinstance(conv, Conv1D)
    x = torch.randn(2, 3, 6)
    assert torch.allclose(conv(x), x @ (conv.weight * mask) + conv.bias)
    weight_2d, mask_2d = layer_view(conv)
    assert weight_2d.shape == (5, 6) and torch.equal(mask_2d, mask.T)
    assert torch.equal(from_layer_view(conv, mask_2d), mask)
    linear = make_masked_(nn.Linear(6, 5), name="fc")
    assert layer_view(linear)[1] is linear.weight_mask


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = tiny_llama()
    modules = find_sparse_modules(model)
    masks = {name: checkerboard(m.weight.shape) for name, m in modules.items()}
    sparsify_(model, SparseTrainingConfig(method="static", density=0.5), masks=masks)
    ids = torch.randint(0, 100, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, module in modules.items():
        assert torch.all(module.weight.grad[~masks[name]] == 0.0), name


def test_grad_capture_collects_dense_gradient_and_accumulates():
    torch.manual_seed(0)
    layer = make_masked_(nn.Linear(4, 3, bias=False), checkerboard((3, 4)), name="fc")
    x = torch.randn(5, 4)
    store: dict[str, torch.Tensor] = {}
    set_grad_capture_({"fc": layer}, store)
    layer(x).sum().backward()
    # d(sum(x @ W_eff.T)) / d W_eff = column sums of x, dense (also at masked positions)
    dense = x.sum(0).expand(3, 4)
    assert torch.allclose(store["fc"], dense)
    layer(x).sum().backward()
    assert torch.allclose(store["fc"], 2 * dense)
    set_grad_capture_({"fc": layer}, None)
    store.clear()
    layer(x).sum().backward()
    assert store == {}
    with torch.no_grad():
        layer(x)  # no graph: no hook, no error


# ------------------------------------------------------------------------------------------ mask I/O
def test_set_masks_validates_and_get_masks_returns_live_buffers():
    model = tiny_llama()
    modules = find_sparse_modules(model)
    masks = {name: checkerboard(m.weight.shape) for name, m in modules.items()}
    sparsify_(model, SparseTrainingConfig(method="static", density=0.5), masks=masks)
    name = "model.layers.0.self_attn.k_proj"  # (16, 32): 2 kv heads x 8
    good = torch.zeros(16, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"k_proj.*\(32, 16\).*expected \(16, 32\)"):
        set_masks_(model, {name: good.T.contiguous()})
    with pytest.raises(ValueError, match=r"k_proj.*torch.float32.*torch.bool"):
        set_masks_(model, {name: good.float()})
    with pytest.raises(ValueError, match="No module named 'nope'"):
        set_masks_(model, {"nope": good})
    with pytest.raises(ValueError, match="weight_mask|shape"):
        set_masks_(model, {name: good, "model.layers.0.mlp.up_proj": good})  # second one has the wrong shape
    assert torch.equal(get_masks(model)[name], masks[name])  # nothing changed by the failed calls
    good[0, :4] = True
    set_masks_(model, {name: good})
    live = get_masks(model)[name]
    assert live is modules[name].weight_mask and torch.equal(live, good)
    assert int((modules[name].weight != 0).sum()) <= 4


def test_apply_masks_with_extra_positions():
    layer = make_masked_(nn.Linear(4, 2, bias=False), torch.ones(2, 4, dtype=torch.bool), name="fc")
    with torch.no_grad():
        layer.weight.fill_(-1.5)
        layer.weight_mask[0, 0] = False
    extra = torch.zeros(2, 4, dtype=torch.bool)
    extra[1, 3] = True
    apply_masks_({"fc": layer}, extra_positions={"fc": extra})
    zeroed = torch.stack([layer.weight[0, 0], layer.weight[1, 3]])
    assert torch.all(zeroed == 0.0) and not torch.any(torch.signbit(zeroed))  # +0.0, not -0.0
    assert int((layer.weight == -1.5).sum()) == 6


def test_sparsify_default_draws_engine_masks_and_is_idempotent():
    from hf_chts._validation import link_count

    model = tiny_llama()
    cfg = SparseTrainingConfig(method="chts", density=0.25)
    modules = sparsify_(model, cfg)
    assert len(modules) == 14 and all(is_masked(m) for m in modules.values())
    for module in modules.values():
        w2d, m2d = layer_view(module)
        assert int(module.weight_mask.sum()) == link_count(tuple(m2d.shape), 0.25)
        assert torch.all(module.weight[~module.weight_mask] == 0.0)
    before = {k: v.clone() for k, v in get_masks(model).items()}
    sparsify_(model, SparseTrainingConfig(method="chts", density=0.5, seed=3))  # already masked: kept
    assert all(torch.equal(before[k], v) for k, v in get_masks(model).items())
    other = tiny_llama()
    sparsify_(other, cfg)
    assert all(torch.equal(before[k], v) for k, v in get_masks(other).items())  # same seed, same masks


def test_sparsify_gpt2_with_generator():
    model = tiny_gpt2()
    modules = sparsify_(
        model, SparseTrainingConfig(method="set", density=0.5), generator=torch.Generator().manual_seed(1)
    )
    conv = modules["transformer.h.0.attn.c_attn"]
    assert conv.weight_mask.shape == conv.weight.shape == (32, 96)
    assert int(conv.weight_mask.sum()) == 32 * 96 // 2
    ids = torch.randint(0, 100, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.all(conv.weight.grad[~conv.weight_mask] == 0.0)


def test_masks_survive_deepcopy_pickle_and_save_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    modules = find_sparse_modules(model)
    sparsify_(
        model,
        SparseTrainingConfig(method="static", density=0.5),
        masks={n: checkerboard(m.weight.shape) for n, m in modules.items()},
    )
    clone = copy.deepcopy(model)
    assert all(is_masked(m) for m in find_sparse_modules(clone).values())
    assert all(
        torch.equal(a, b) for a, b in zip(get_masks(model).values(), get_masks(clone).values(), strict=True)
    )
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert len(get_masks(torch.load(buffer, weights_only=False))) == 14
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight_mask"
    assert tensors[key].dtype == torch.bool and torch.equal(
        tensors[key], modules["model.layers.0.mlp.up_proj"].weight_mask
    )
    plain = LlamaForCausalLM.from_pretrained(tmp_path)  # ignores the mask keys, loads the zeroed weights
    weight = plain.model.layers[0].mlp.up_proj.weight
    assert torch.all(weight[~tensors[key]] == 0.0)
    assert torch.equal(weight, modules["model.layers.0.mlp.up_proj"].weight)


def test_model_to_dtype_keeps_bool_masks():
    model = tiny_llama()
    sparsify_(
        model,
        SparseTrainingConfig(method="static", density=0.5),
        masks={n: checkerboard(m.weight.shape) for n, m in find_sparse_modules(model).items()},
    )
    model.to(torch.bfloat16)
    assert all(m.dtype == torch.bool for m in get_masks(model).values())


# ------------------------------------------------------------------------------------------ optimizer state
def _one_step(layer, optimizer):
    layer(torch.randn(8, layer.in_features)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adafactor", "adafactor_beta1"])
def test_zero_optimizer_state(kind):
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    layer = make_masked_(nn.Linear(6, 4), torch.ones(4, 6, dtype=torch.bool), name="fc")
    optimizer = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.1),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adafactor": lambda p: Adafactor(p, lr=0.1, relative_step=False, scale_parameter=False),
        "adafactor_beta1": lambda p: Adafactor(
            p, lr=0.1, relative_step=False, scale_parameter=False, beta1=0.9
        ),
    }[kind](layer.parameters())
    _one_step(layer, optimizer)
    new_mask = checkerboard((4, 6))
    grown = torch.zeros(4, 6, dtype=torch.bool)
    grown[0, 0] = True  # a kept position reset as if it had just been grown
    set_masks_(nn.ModuleDict({"fc": layer}), {"fc": new_mask})
    touched = zero_optimizer_state_(optimizer, {"fc": layer}, extra_positions={"fc": grown})
    state = optimizer.state[layer.weight]
    weight_shaped = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == (4, 6)}
    assert touched == len(weight_shaped)
    assert touched >= (0 if kind == "adafactor" else 1)
    for key, value in weight_shaped.items():
        assert torch.all(value[~new_mask] == 0), key
        assert value[0, 0] == 0, key
        assert torch.any(value[new_mask] != 0), key
    if kind.startswith("adafactor"):
        assert state["exp_avg_sq_row"].shape == (4,) and torch.all(state["exp_avg_sq_row"] > 0)  # left alone
    # masked weights stay exactly zero through further steps
    _one_step(layer, optimizer)
    assert torch.all(layer.weight[~new_mask] == 0.0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_grad_capture_under_gradient_checkpointing(reentrant):
    """Recomputing the forward in backward must not double-count the captured dense gradient."""

    def captured(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama()
        modules = find_sparse_modules(model)
        sparsify_(
            model,
            SparseTrainingConfig(method="rigl", density=0.5),
            masks={n: checkerboard(m.weight.shape) for n, m in modules.items()},
        )
        if checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        model.train()
        store: dict[str, torch.Tensor] = {}
        set_grad_capture_(modules, store)
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        return store

    plain, checkpointed = captured(False), captured(True)
    assert set(plain) == set(checkpointed) and len(plain) == 14
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


# ------------------------------------------------------------------------------------------ steady steps
def _masked_grads_are_zero(layer) -> bool:
    return bool(torch.all(layer.weight.grad[~layer.weight_mask] == 0.0))


def test_forward_uses_the_weight_and_backward_masks_it_in_place():
    from hf_chts.masking.layers import _forward_weight

    torch.manual_seed(0)
    layer = make_masked_(nn.Linear(6, 5), checkerboard((5, 6)), name="fc")
    assert _forward_weight(layer) is layer.weight  # no masked copy, no extra op in forward
    for _ in range(2):  # accumulation: the accumulated gradient stays masked
        (layer(torch.randn(3, 6)).pow(2).sum() * 1e6).backward()
        assert _masked_grads_are_zero(layer) and torch.any(layer.weight.grad != 0.0)


@pytest.mark.parametrize(
    "how", ["deepcopy", "pickle", "to_float64", "swap_tensors", "new_parameter", "assign"]
)
def test_gradient_stays_masked_when_the_weight_object_changes(how):
    from hf_chts.masking.layers import _forward_weight

    torch.manual_seed(0)
    layer = make_masked_(nn.Linear(6, 5), checkerboard((5, 6)), name="fc")
    if how == "deepcopy":
        layer = copy.deepcopy(layer)
    elif how == "pickle":
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        layer = torch.load(buffer, weights_only=False)
    elif how == "to_float64":
        layer = layer.to(torch.float64)
    elif how == "swap_tensors":  # moves the C++ tensor (and its hooks) away from the Python object
        torch.utils.swap_tensors(layer.weight, nn.Parameter(layer.weight.detach().clone()))
    elif how == "new_parameter":
        layer.weight = nn.Parameter(layer.weight.detach().clone())
    elif how == "assign":
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    fast = _forward_weight(layer) is layer.weight
    # the masked classes re-attach the hook themselves; otherwise the forward falls back to the identity
    # function, and install_grad_masks_ restores the fast path
    assert fast == (how not in ("swap_tensors", "new_parameter"))
    x = torch.randn(3, 6, dtype=layer.weight.dtype)
    (layer(x).pow(2).sum() * 1e6).backward()
    assert _masked_grads_are_zero(layer)
    assert install_grad_masks_(layer) == 1 and _forward_weight(layer) is layer.weight
    layer.weight.grad = None
    (layer(x).pow(2).sum() * 1e6).backward()
    assert _masked_grads_are_zero(layer)


def test_load_state_dict_zeroes_masked_weights():
    layer = make_masked_(nn.Linear(4, 3, bias=False), checkerboard((3, 4)), name="fc")
    state = {"weight": torch.full((3, 4), -2.0), "weight_mask": ~checkerboard((3, 4))}
    layer.load_state_dict(state)
    assert torch.equal(layer.weight_mask, ~checkerboard((3, 4)))  # the loaded mask wins
    assert torch.all(layer.weight[checkerboard((3, 4))] == 0.0)
    assert not torch.any(torch.signbit(layer.weight[checkerboard((3, 4))]))
    assert torch.all(layer.weight[~checkerboard((3, 4))] == -2.0)


def _optimizer(name: str, params):
    from transformers.optimization import Adafactor

    make = {
        "Adadelta": lambda: torch.optim.Adadelta(params, lr=1.0, weight_decay=0.1),
        "Adagrad": lambda: torch.optim.Adagrad(params, lr=0.1, weight_decay=0.1),
        "Adam": lambda: torch.optim.Adam(params, lr=0.1, weight_decay=0.1, amsgrad=True),
        "Adamax": lambda: torch.optim.Adamax(params, lr=0.1, weight_decay=0.1),
        "AdamW": lambda: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1),
        "AdamW_fused": lambda: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=True),
        "NAdam": lambda: torch.optim.NAdam(params, lr=0.1, weight_decay=0.1, decoupled_weight_decay=True),
        "RAdam": lambda: torch.optim.RAdam(params, lr=0.1, weight_decay=0.1),
        "RMSprop": lambda: torch.optim.RMSprop(params, lr=0.1, momentum=0.9, centered=True, weight_decay=0.1),
        "SGD": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
        "Adafactor": lambda: Adafactor(
            params, lr=0.1, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1
        ),
    }
    return make[name]()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name",
    [
        "Adadelta",
        "Adagrad",
        "Adam",
        "Adamax",
        "AdamW",
        "AdamW_fused",
        "NAdam",
        "RAdam",
        "RMSprop",
        "SGD",
        "Adafactor",
    ],
)
def test_zero_preserving_optimizers_keep_masked_weights_exactly_zero(name, dtype):
    """No re-mask after the step: masked gradient + zero state => exactly 0.0 (also after a mask change)."""
    from hf_chts.masking import ZERO_PRESERVING_OPTIMIZERS, keeps_masked_weights_zero

    torch.manual_seed(0)
    layer = make_masked_(nn.Linear(8, 6).to(dtype), checkerboard((6, 8)), name="fc")
    optimizer = _optimizer(name, layer.parameters())
    assert keeps_masked_weights_zero(optimizer)
    assert len(ZERO_PRESERVING_OPTIMIZERS) == 10
    for step in range(6):
        if step == 3:  # a topology update: new mask, grown links start at 0 with zero state
            new = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5
            grown = new & ~layer.weight_mask
            set_masks_(nn.ModuleDict({"fc": layer}), {"fc": new})
            apply_masks_({"fc": layer}, extra_positions={"fc": grown})
            zero_optimizer_state_(optimizer, {"fc": layer}, extra_positions={"fc": grown})
        loss = layer(torch.randn(4, 8, dtype=dtype)).float().pow(2).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        masked = layer.weight[~layer.weight_mask]
        assert torch.all(masked == 0.0), f"{name}: step {step}"
        assert torch.any(layer.weight[layer.weight_mask] != 0.0)


def test_unknown_optimizer_is_not_trusted():
    from hf_chts.masking import keeps_masked_weights_zero

    class MyAdamW(torch.optim.AdamW):  # a subclass may change step(): not trusted
        pass

    params = [nn.Parameter(torch.zeros(2))]
    assert not keeps_masked_weights_zero(MyAdamW(params))
    assert keeps_masked_weights_zero(torch.optim.AdamW(params))
    assert not keeps_masked_weights_zero(torch.optim.LBFGS(params))


def test_ddp_does_not_broadcast_the_masks(tmp_path):
    # DDP broadcasts every buffer before each forward; masks stay out (every rank already holds the same).
    import torch.distributed as dist

    from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        sparsify_(model, SparseTrainingConfig(method="set", density=0.5))
        llama = SparseLlamaForCausalLM(SparseLlamaConfig(**tiny_llama_arch(64), sparsity={"density": 0.5}))
        for m in (model, llama):
            masks = {id(b) for n, b in m.named_buffers() if n.endswith("weight_mask")}
            assert masks
            ddp = torch.nn.parallel.DistributedDataParallel(m)
            assert not masks & {id(b) for b in ddp.modules_buffers}
            assert any(n.endswith("rotary_emb.inv_freq") for n, _ in m.named_buffers())  # other buffers stay
    finally:
        dist.destroy_process_group()
