"""Training on a CUDA device with the real Trainer: bf16, fused AdamW, topology updates, torch.compile.

The invariants are those of the CPU runs in ``test_callback.py`` (its ``Probe`` checks them after every
optimizer step): masked weights and their optimizer state exactly 0, link counts on the schedule, masks
changing exactly at the update steps. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_callback import check_run, config_for, train

from hf_chts.masking import get_masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["chtss", "rigl", "set"])
def test_bf16_training_on_cuda_keeps_the_invariants(tmp_path, method):
    trainer, sparse, probe = train(tmp_path, config_for(method), use_cpu=False, bf16=True)
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert "fused" in trainer.args.optim.value  # the default AdamW on CUDA
    check_run(sparse, probe)


@pytest.mark.parametrize("method", ["chts", "rigl"])
def test_torch_compile_on_cuda(tmp_path, method):
    trainer, sparse, probe = train(tmp_path, config_for(method), use_cpu=False, bf16=True, torch_compile=True)
    assert hasattr(trainer.model_wrapped, "_orig_mod")  # really compiled
    check_run(sparse, probe)


def test_a_run_starts_from_the_same_masks_on_cpu_and_cuda(tmp_path):
    config = config_for("static")  # the initial masks alone (updates are checked above)
    cpu, _, _ = train(tmp_path / "cpu", config, probe=False, max_steps=1)
    cuda, _, _ = train(tmp_path / "cuda", config, probe=False, max_steps=1, use_cpu=False)
    on_cpu, on_cuda = get_masks(cpu.model), get_masks(cuda.model)
    assert on_cpu.keys() == on_cuda.keys()
    assert all(on_cuda[name].device.type == "cuda" for name in on_cuda)
    assert all(torch.equal(on_cpu[name], on_cuda[name].cpu()) for name in on_cpu)
