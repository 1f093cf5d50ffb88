"""Load a saved sparse_llama folder through the Auto classes in a fresh interpreter.

Run by tests/test_modeling.py.

Usage: ``python tests/scripts/check_auto_classes.py FOLDER [OUT.json]``

Prints (or writes) a JSON report: the classes AutoConfig / AutoModelForCausalLM resolved, a hash of every mask
and the logits of a fixed input, so the parent test compares them with the model it saved.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_chts.modeling import register


def main(folder: str) -> dict:
    register()
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    masks = {name: buf for name, buf in model.named_buffers() if name.endswith(".weight_mask")}
    input_ids = (torch.arange(12).reshape(2, 6) * 7) % config.vocab_size  # as tests/test_modeling.py
    with torch.no_grad():
        logits = model(input_ids).logits
    return {
        "config_class": type(config).__name__,
        "model_type": config.model_type,
        "model_class": type(model).__name__,
        "sparsity": config.sparsity,
        "mask_dtypes": sorted({str(m.dtype) for m in masks.values()}),
        "mask_sha256": {name: hashlib.sha256(m.numpy().tobytes()).hexdigest() for name, m in masks.items()},
        "logits": logits.flatten().tolist(),
    }


if __name__ == "__main__":
    report = json.dumps(main(sys.argv[1]))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="utf-8") as handle:
            handle.write(report)
    else:
        print(report)
