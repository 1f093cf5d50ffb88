"""Tests of hf_chts.peft_utils: LoRA / ShiRA on a tiny SparseLlamaForCausalLM, the callback on a PeftModel,
the masked merge, offline on CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from _io_helpers import tiny_llama_arch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_chts
from hf_chts import SparseLlamaConfig, SparseLlamaForCausalLM
from hf_chts.callback import CHTssCallback
from hf_chts.masking import MASK_NAME, get_masks, has_mask
from hf_chts.peft_utils import SHIRA_MIN_PEFT, shira_mask_fn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

VOCAB, SEQ = 128, 16
TINY = tiny_llama_arch(VOCAB)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
HAS_SHIRA = hasattr(peft, "ShiraConfig")

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_model(seed: int = 0) -> SparseLlamaForCausalLM:
    torch.manual_seed(seed)
    return SparseLlamaForCausalLM(
        SparseLlamaConfig(**TINY, sparsity={"method": "chts", "density": 0.3, "seed": 0})
    )


def short_names(masks) -> dict[str, torch.Tensor]:
    """Mask names without PEFT's wrapper prefixes, as in the bare model."""
    out = {}
    for name, mask in masks.items():
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        out[name] = mask.clone()
    return out


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_args(tmp_path, steps: int = 6) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


class ZeroProbe(TrainerCallback):
    """After every optimizer step: every masked weight of the model is exactly 0.0."""

    def __init__(self):
        self.steps = 0
        self.violations: list[str] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps += 1
        for name, module in model.named_modules():
            mask = module._buffers.get(MASK_NAME)
            if mask is not None and torch.any(module.weight[~mask] != 0.0):
                self.violations.append(f"step {state.global_step + 1}: {name}")


def ids(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def test_lora_trains_with_base_masks_intact(tmp_path):
    model = sparse_model()
    model.save_pretrained(tmp_path / "base")
    masks0 = short_names(get_masks(model))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(ATTENTION + MLP)))
    lora_b0 = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone()
    probe = ZeroProbe()
    Trainer(
        model=peft_model, args=make_args(tmp_path), train_dataset=RandomTokens(), callbacks=[probe]
    ).train()
    assert probe.steps == 6 and probe.violations == []
    after = short_names(get_masks(peft_model))
    assert set(after) == set(masks0) and all(torch.equal(after[n], masks0[n]) for n in masks0)
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert not torch.equal(lora_b, lora_b0)  # the adapter did train

    # The adapter saves alone; the sparse base checkpoint carries the masks.
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    reloaded = PeftModel.from_pretrained(
        SparseLlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    reloaded_masks = short_names(get_masks(reloaded))
    assert all(torch.equal(reloaded_masks[n], masks0[n]) for n in masks0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, peft_model(ids()).logits)


def test_callback_on_peft_model_skips_frozen_and_evolves_trainable(tmp_path, caplog):
    model = sparse_model()
    masks0 = short_names(get_masks(model))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(ATTENTION)))
    for name, param in peft_model.named_parameters():  # train the MLP projections fully
        if any(f"mlp.{p}.weight" in name for p in MLP):
            param.requires_grad_(True)
    callback = CHTssCallback(method="set", density=0.3, update_interval=2, zeta=0.3, chain_removal=False)
    probe = ZeroProbe()
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        Trainer(
            model=peft_model,
            args=make_args(tmp_path),
            train_dataset=RandomTokens(),
            callbacks=[callback, probe],
        ).train()
    assert "8 frozen sparse layers keep their masks and are not evolved" in caplog.text
    evolved = {n.replace("base_model.model.", "") for n in callback.modules}
    assert evolved == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in MLP}
    assert probe.violations == []
    after = short_names(get_masks(peft_model))
    for name, mask in masks0.items():
        if name.split(".")[-1] in ATTENTION:
            assert torch.equal(after[name], mask), name  # frozen: never evolved
        else:
            assert int(after[name].sum()) == int(mask.sum()), name  # exact link count kept
    assert any(not torch.equal(after[n], masks0[n]) for n in masks0 if n.split(".")[-1] in MLP)


def test_trainable_lora_target_is_a_conflict(tmp_path):
    peft_model = get_peft_model(sparse_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    callback = CHTssCallback(method="set", density=0.3, update_interval=2, chain_removal=False)
    trainer = Trainer(
        model=peft_model, args=make_args(tmp_path), train_dataset=RandomTokens(), callbacks=[callback]
    )
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.base_layer.*base of a PEFT adapter.*freeze"):
        trainer.train()


def test_callback_does_nothing_on_a_dense_base(tmp_path, caplog):
    torch.manual_seed(0)
    peft_model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**TINY)), LoraConfig(r=4, target_modules=["q_proj"])
    )
    callback = CHTssCallback(method="set", density=0.3, update_interval=2, chain_removal=False)
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        Trainer(
            model=peft_model,
            args=make_args(tmp_path, steps=4),
            train_dataset=RandomTokens(),
            callbacks=[callback],
        ).train()
    assert callback.engine is None and "carries no masks" in caplog.text
    assert get_masks(peft_model) == {}


def test_merge_save_reload_keeps_the_masks(tmp_path):
    model = sparse_model()
    masks0 = short_names(get_masks(model))
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=list(ATTENTION + MLP), init_lora_weights=False)
    ).eval()
    with torch.no_grad():
        adapter_logits = peft_model(ids()).logits
    merged = hf_chts.merge_and_unload(peft_model)
    assert type(merged) is SparseLlamaForCausalLM
    masks = get_masks(merged)
    assert set(masks) == set(masks0) and all(torch.equal(masks[n], masks0[n]) for n in masks0)
    for name, module in merged.named_modules():
        if has_mask(module):
            assert not torch.any(module.weight[~module.weight_mask] != 0.0), name
            assert "lora" not in type(module).__module__
    with torch.no_grad():
        merged_logits = merged(ids()).logits
    # A dense LoRA update loses its part outside the masks: the outputs move, but stay close.
    assert not torch.allclose(merged_logits, adapter_logits)
    merged.save_pretrained(tmp_path / "merged")
    loaded = SparseLlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(torch.equal(get_masks(loaded)[n], masks0[n]) for n in masks0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, merged_logits)


def test_merge_equals_unmerged_when_the_update_is_inside_the_masks():
    """A LoRA update confined to the links is kept whole: merged and adapter outputs agree."""
    model = sparse_model()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).eval()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    # Rank-1 update b a^T with support inside one row's links: b = e_row, a = the row's mask.
    with torch.no_grad():
        for other in peft_model.base_model.model.model.layers[1:]:
            other.self_attn.q_proj.lora_B["default"].weight.zero_()
        row = 0
        layer.lora_A["default"].weight.zero_()
        layer.lora_B["default"].weight.zero_()
        layer.lora_A["default"].weight[0] = layer.base_layer.weight_mask[row].float() * 0.5
        layer.lora_B["default"].weight[row, 0] = 1.0
        adapter_logits = peft_model(ids()).logits
    merged = hf_chts.merge_and_unload(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, adapter_logits, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_dense_base_and_changes_nothing():
    torch.manual_seed(0)
    peft_model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**TINY)),
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
    ).eval()
    with torch.no_grad():
        before = peft_model(ids()).logits
    with pytest.raises(
        ValueError, match=r"not sparse.*nothing was changed.*peft_model\.merge_and_unload\(\)"
    ):
        hf_chts.merge_and_unload(peft_model)
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids()).logits, before)
    with pytest.raises(ValueError, match="expects a peft.PeftModel"):
        hf_chts.merge_and_unload(sparse_model())


@pytest.mark.parametrize("init", ["brf", "er", "bsw"])
def test_shira_mask_fn_draws_exactly_shiras_budget(init):
    from hf_chts.topology.init import init_mask

    fn = shira_mask_fn(init, seed=3)
    layer = torch.nn.Linear(40, 24, bias=False)
    mask = fn(layer, 2)
    assert mask.shape == (24, 40) and mask.dtype == layer.weight.dtype
    assert int(mask.sum()) == 2 * (24 + 40) and set(mask.unique().tolist()) <= {0.0, 1.0}
    expected = init_mask((24, 40), 128 / (24 * 40), init, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask.bool(), expected)
    with pytest.raises(ValueError, match="lower `r` to at most 15"):
        fn(layer, 16)
    with pytest.raises(ValueError, match="`init` must be one of"):
        shira_mask_fn("lattice")


def test_shira_mask_fn_names_the_peft_version(monkeypatch):
    monkeypatch.delattr(peft, "ShiraConfig", raising=False)
    with pytest.raises(ImportError, match=rf"peft {SHIRA_MIN_PEFT}.*pip install 'peft>={SHIRA_MIN_PEFT}'"):
        shira_mask_fn("brf")


@pytest.mark.skipif(
    not HAS_SHIRA, reason=f"PEFT {peft.__version__} has no ShiRA (needs peft>={SHIRA_MIN_PEFT})"
)
def test_shira_adapter_with_brf_mask_trains(tmp_path):
    from peft import ShiraConfig

    model = sparse_model()
    masks0 = short_names(get_masks(model))
    config = ShiraConfig(r=2, target_modules=["q_proj", "v_proj"])
    config.mask_fn = shira_mask_fn("brf", seed=0, r=0.3)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.shira_indices["default"].shape == (2, 2 * (32 + 32))
    weights0 = layer.shira_weight["default"].detach().clone()
    probe = ZeroProbe()
    Trainer(
        model=peft_model, args=make_args(tmp_path), train_dataset=RandomTokens(), callbacks=[probe]
    ).train()
    assert probe.violations == []
    assert not torch.equal(layer.shira_weight["default"], weights0)
    after = short_names(get_masks(peft_model))
    assert all(torch.equal(after[n], masks0[n]) for n in masks0)
    merged = hf_chts.merge_and_unload(peft_model)
    for module in merged.modules():
        if has_mask(module):
            assert not torch.any(module.weight[~module.weight_mask] != 0.0)


@pytest.mark.parametrize("bad", ["row", "float", "uint8"])
def test_merge_with_one_bad_mask_is_refused_before_any_layer_is_merged(bad):
    model = sparse_model()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=list(ATTENTION + MLP), init_lora_weights=False)
    ).eval()
    bases = {
        n.replace(".base_layer", ""): m for n, m in peft_model.get_base_model().named_modules() if has_mask(m)
    }
    before = {n: m.weight.detach().clone() for n, m in bases.items()}
    name = "model.layers.1.mlp.up_proj"
    mask = bases[name].weight_mask
    bad_mask = {
        "row": mask[:1].clone(),
        "float": mask.float(),
        "uint8": mask.to(torch.uint8),
    }[bad]
    setattr(bases[name], MASK_NAME, bad_mask)  # a buffer assignment: replaces the registered mask
    with pytest.raises(ValueError, match=rf"{name}.*weight_mask.*Nothing was merged"):
        hf_chts.merge_and_unload(peft_model)
    assert isinstance(peft_model, PeftModel)
    for n, m in bases.items():  # no layer merged: every base weight is as it was
        assert torch.equal(m.weight, before[n]), n


def test_merge_sets_a_nan_at_a_masked_position_to_zero():
    peft_model = get_peft_model(
        sparse_model(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).eval()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    row, col = (~layer.weight_mask).nonzero()[0].tolist()
    with torch.no_grad():
        layer.weight[row, col] = float("nan")
    merged = hf_chts.merge_and_unload(peft_model)
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert weight[row, col].item() == 0.0
    assert not torch.isnan(weight).any()
