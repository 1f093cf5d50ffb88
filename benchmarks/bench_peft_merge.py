"""How much the sparsity-preserving merge changes a LoRA-fine-tuned sparse model (CPU, offline).

A small SparseLlamaForCausalLM is trained on the embedded corpus, then LoRA-fine-tuned with its base frozen;
``hf_chts.merge_and_unload`` folds the adapter in and sets the masked weights back to 0.0. The script reports
the validation loss of the base, of the unmerged adapter model and of the masked merge, the relative change of
the logits (``||merged - adapter|| / ||adapter - base||``: 0 = the merge kept the whole adapter effect, 1 = it
moved the outputs as much as the adapter itself did) and the top-1 agreement, for several densities.

    PYTHONPATH=$PWD python benchmarks/bench_peft_merge.py --out benchmarks/results/peft_merge.md
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import hf_chts
from hf_chts import SparseLlamaConfig, SparseLlamaForCausalLM


def train(model, blocks, steps: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for module in model.modules():  # keep masked weights at 0.0 (the callback's job in a Trainer)
            if hasattr(module, "weight_mask") and module.weight.requires_grad:
                hf_chts.apply_masks_([module])


@torch.no_grad()
def evaluate(model, blocks):
    model.eval()
    out = model(input_ids=blocks, labels=blocks)
    return float(out.loss), out.logits.float()


def run(density: float, data, args) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    vocab = len(data.tokenizer)
    config = SparseLlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
        sparsity={"method": "static", "density": density, "init": "brf", "seed": 0},
    )
    model = SparseLlamaForCausalLM(config)
    train_blocks = data.train_dataset[:]["input_ids"]
    half = train_blocks.shape[0] // 2
    eval_blocks = data.eval_dataset[: args.eval_blocks]["input_ids"]
    train(model, train_blocks[:half], args.base_steps, 3e-3, seed=0)
    base_loss, base_logits = evaluate(model, eval_blocks)
    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"],
        ),
    )
    train(peft_model, train_blocks[half:], args.lora_steps, args.lora_lr, seed=1)
    adapter_loss, adapter_logits = evaluate(peft_model, eval_blocks)
    merged = hf_chts.merge_and_unload(peft_model)
    merged_loss, merged_logits = evaluate(merged, eval_blocks)
    return {
        "density": density,
        "base_loss": base_loss,
        "adapter_loss": adapter_loss,
        "merged_loss": merged_loss,
        "relative_change": float(
            (merged_logits - adapter_logits).norm() / (adapter_logits - base_logits).norm()
        ),
        "top1_agreement": float((merged_logits.argmax(-1) == adapter_logits.argmax(-1)).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--base_steps", type=int, default=300)
    parser.add_argument("--lora_steps", type=int, default=200)
    parser.add_argument("--lora_lr", type=float, default=5e-4)
    parser.add_argument("--eval_blocks", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from hf_chts.data import load_lm_data

    torch.set_num_threads(1)
    data = load_lm_data(max_seq_length=args.seq, tokenizer_vocab_size=2048)
    start = time.perf_counter()
    rows = [run(d, data, args) for d in args.densities]
    lines = [
        "# Masked merge of a LoRA adapter into a sparse model",
        "",
        "`python benchmarks/bench_peft_merge.py` (CPU). SparseLlama 2x128 (BRF masks, static), trained "
        f"{args.base_steps} steps on half of the embedded corpus, then LoRA r=8 on all seven projections for "
        f"{args.lora_steps} steps (lr {args.lora_lr}) on the other half; validation: {args.eval_blocks} "
        f"blocks of {args.seq} "
        "tokens. "
        "Relative change = ||merged - adapter|| / ||adapter - base|| of the logits.",
        "",
        "| density | base loss | adapter loss (unmerged) | masked merge loss | relative change "
        "| top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['density']:.2f} | {r['base_loss']:.4f} | {r['adapter_loss']:.4f} | {r['merged_loss']:.4f} "
            f"| {r['relative_change']:.3f} | {r['top1_agreement']:.3f} |"
        )
    lines += ["", f"Total {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
