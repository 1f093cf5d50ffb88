"""The per-step cost of sparsity on the LLaMA-130M shapes, counted with a TorchDispatchMode (CPU, every CI).

A steady optimizer step (no topology update) of the real ``transformers.Trainer`` (fused AdamW, its default;
gradient clipping; fp32) is counted for the dense model and for the same model under
``CHTssCallback(method="chtss")``. Counts do not depend on the batch, so the batch is 1 x 8 tokens. What is
counted is defined in ``hf_chts/_step_cost.py``; docs/DESIGN.md ("Masks") says where the sparse step's extra
work goes (one in-place gradient multiply per layer, nothing else).
"""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_chts._step_cost import StepCostProbe
from hf_chts.callback import CHTssCallback
from hf_chts.config import SparseTrainingConfig
from hf_chts.masking import find_sparse_modules

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_OPS_RATIO = 1.05  # dispatched aten ops per steady step, sparse / dense
MAX_PASSES_RATIO = 1.5  # passes over the sparse layers' weights per steady step, sparse / dense
COUNTED = (2, 3)  # steady steps: the optimizer state exists from step 1, the first update is at step 100


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int = 8, n: int = 16):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def llama(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000) -> LlamaForCausalLM:
    """LLaMA-130M shapes by default (built locally from the config, nothing downloaded)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def count_steps(tmp_path, model, sparse: CHTssCallback | None):
    weights = [m.weight for m in find_sparse_modules(model).values()]
    probe = StepCostProbe(weights, count_steps=COUNTED, stop_after=max(COUNTED))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1000,  # the schedule's length; the probe stops the run after the counted steps
        per_device_train_batch_size=1,
        max_grad_norm=1.0,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = ([sparse] if sparse is not None else []) + [probe]
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(model.config.vocab_size), callbacks=callbacks
    )
    trainer.train()
    assert "fused" in str(trainer.args.optim).lower()
    costs = [probe.costs[step] for step in COUNTED]
    assert costs[0].ops == costs[1].ops and costs[0].passes == costs[1].passes  # steady: same every step
    del trainer
    model.zero_grad(set_to_none=True)
    gc.collect()
    return costs[-1]


def sparse_run(tmp_path, model, **config):
    callback = CHTssCallback(
        SparseTrainingConfig(method="chtss", density=0.3, update_interval=100, **config), log_per_layer=False
    )
    cost = count_steps(tmp_path, model, callback)
    assert not any(callback.engine.should_update(step) for step in COUNTED)
    assert 0.45 < callback._density < 0.55  # really sparse (chtss starts at 0.5)
    return cost, len(callback.modules)


def test_llama_130m_steady_step_costs_about_what_dense_costs(tmp_path):
    model = llama()
    dense = count_steps(tmp_path / "dense", model, None)
    sparse, layers = sparse_run(tmp_path / "sparse", model)  # the same model, now sparsified
    assert layers == 84
    ops_ratio, passes_ratio = sparse.ops / dense.ops, sparse.passes / dense.passes
    report = (
        f"ops {dense.ops} -> {sparse.ops} ({ops_ratio:.3f}x), passes {dense.passes} -> {sparse.passes} "
        f"({passes_ratio:.3f}x); dense passes {dict(dense.passes_by_op)}, sparse {dict(sparse.passes_by_op)}"
    )
    assert ops_ratio <= MAX_OPS_RATIO, report
    assert passes_ratio <= MAX_PASSES_RATIO, report
    # where the difference goes: one in-place gradient multiply per sparse layer, nothing per step besides
    assert sparse.ops - dense.ops <= layers + 2, report
    assert dense.passes >= 3 * layers, report  # gradient, clipping, optimizer: every weight at least 3 times


def test_remask_every_step_costs_two_ops(tmp_path):
    """Re-masking after every step (unknown optimizers, or asked for) is two foreach ops for all layers."""

    def tiny():
        return llama(hidden=32, intermediate=64, layers=2, heads=4, vocab=100)

    auto, layers = sparse_run(tmp_path / "auto", tiny())
    every, _ = sparse_run(tmp_path / "every", tiny(), remask="every_step")
    assert every.ops - auto.ops == 2
    assert every.passes - auto.passes == 2 * layers
    assert every.passes_by_op["_foreach_mul_"] - auto.passes_by_op["_foreach_mul_"] == layers
