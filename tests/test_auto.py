"""Tests of hf_chts.auto: any saved sparse model (any architecture, full or compact) comes back sparse,
quietly; its config.json records the settings, its card fits the model type, and save_pretrained refuses
weights that leak outside the masks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import hf_chts
from hf_chts import (
    AutoSparseModelForCausalLM,
    AutoSparseModelForSequenceClassification,
    CHTssCallback,
    SparseTrainingConfig,
    sparsify_,
)
from hf_chts.cli import main as cli_main
from hf_chts.masking import get_masks, is_masked

VOCAB, SEQ = 64, 16
pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_config(**kwargs) -> GPT2Config:
    arch = dict(n_layer=2, n_embd=32, n_head=2, n_positions=SEQ, vocab_size=VOCAB)
    return GPT2Config(**arch, bos_token_id=0, eos_token_id=0, **kwargs)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def ids() -> torch.Tensor:
    return torch.arange(SEQ).remainder(VOCAB).unsqueeze(0)


def assert_same_masks(a, b):
    masks_a, masks_b = get_masks(a), get_masks(b)
    assert masks_a and set(masks_a) == set(masks_b)
    assert all(torch.equal(masks_a[n], masks_b[n].to(masks_a[n].device)) for n in masks_a)


def test_gpt2_trained_saved_reloaded_exported_inspected_and_carded(tmp_path, capfd):
    """The whole first hour with a GPT-2: callback, save_pretrained, the loader, compact, inspect, card."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    config = SparseTrainingConfig(method="chtss", density=0.3, update_interval=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=[CHTssCallback(config)])
    trainer.train()
    full = tmp_path / "full"
    trainer.save_model(str(full))
    model.eval()

    recorded = json.loads((full / "config.json").read_text())["sparsity"]
    assert recorded["method"] == "chtss" and recorded["density"] == 0.3

    capfd.readouterr()
    loaded = AutoSparseModelForCausalLM.from_pretrained(full)
    assert "UNEXPECTED" not in "".join(capfd.readouterr())
    assert type(loaded) is GPT2LMHeadModel and loaded.config.sparsity["method"] == "chtss"
    assert_same_masks(model, loaded)
    assert all(is_masked(m) for m in loaded.modules() if hasattr(m, "weight_mask"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)

    compact = tmp_path / "compact"
    assert cli_main(["export", str(full), str(compact), "--format", "compact"]) == 0
    capfd.readouterr()
    from_compact = AutoSparseModelForCausalLM.from_pretrained(compact)
    assert "UNEXPECTED" not in "".join(capfd.readouterr())
    assert_same_masks(model, from_compact)
    with torch.no_grad():
        torch.testing.assert_close(from_compact(ids()).logits, model(ids()).logits)

    density = hf_chts.sparsity_summary(model)["density"]
    for folder in (full, compact):
        capfd.readouterr()
        assert cli_main(["inspect", str(folder)]) == 0
        out = capfd.readouterr().out
        assert "8 sparse layers" in out, out
        assert cli_main(["card", str(folder)]) == 0
        card = (folder / "README.md").read_text()
        assert "settings not recorded" not in card and "not recorded in `config.json`" not in card
        assert f"{density:.1%}" in card
        how = card.split("## How to use")[1].split("## Citation")[0]
        assert "AutoSparseModelForCausalLM.from_pretrained" in how
        assert "Llama" not in how and "GPT2LMHeadModel" in how
    assert "compact format" in (compact / "README.md").read_text()


def test_a_plain_auto_load_reports_the_masks_but_the_sparse_loader_keeps_them(tmp_path, capfd):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    sparsify_(model, SparseTrainingConfig(method="set", density=0.2))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sparsity"]["method"] == "set"
    capfd.readouterr()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert get_masks(plain) == {}  # the reason for the loader
    loaded = AutoSparseModelForCausalLM.from_pretrained(tmp_path)
    assert_same_masks(model, loaded)


def test_other_heads_load_too(tmp_path):
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(gpt2_config(num_labels=3, pad_token_id=0))
    sparsify_(model, SparseTrainingConfig(method="set", density=0.4))
    model.save_pretrained(tmp_path)
    loaded = AutoSparseModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is GPT2ForSequenceClassification
    assert_same_masks(model, loaded)


def test_loader_names_what_is_missing(tmp_path):
    with pytest.raises(OSError, match="from_pretrained"):
        AutoSparseModelForCausalLM()  # a factory, as transformers' Auto classes
    model = GPT2ForSequenceClassification(gpt2_config(num_labels=2, pad_token_id=0))
    sparsify_(model, SparseTrainingConfig(method="set", density=0.4))
    model.save_pretrained(tmp_path)
    from hf_chts import AutoSparseModelForSeq2SeqLM

    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        AutoSparseModelForSeq2SeqLM.from_pretrained(tmp_path)


def test_save_pretrained_refuses_weights_outside_the_masks(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    sparsify_(model, SparseTrainingConfig(method="set", density=0.2))
    layer = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        layer.weight.add_(1.0)  # what PEFT's own merge_and_unload does to every masked position
    with pytest.raises(ValueError, match=r"non-zero values at masked positions.*hf_chts\.merge_and_unload"):
        model.save_pretrained(tmp_path / "bad")
    hf_chts.set_masks_(model, hf_chts.get_masks(model))  # the fix the message names
    model.save_pretrained(tmp_path / "good")
    assert_same_masks(model, AutoSparseModelForCausalLM.from_pretrained(tmp_path / "good"))


def test_peft_own_merge_is_caught_at_save(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    sparsify_(model, SparseTrainingConfig(method="set", density=0.2))
    lora = LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    merged = get_peft_model(model, lora).merge_and_unload()  # PEFT's own: writes outside the masks
    with pytest.raises(ValueError, match="hf_chts.merge_and_unload"):
        merged.save_pretrained(tmp_path)
