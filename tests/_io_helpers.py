"""Tiny local models and tokenizers shared by the evaluation / compact / hub / plotting / CLI tests.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a few sentences and
the models are randomly initialised sparse LLaMAs (``SparseLlamaForCausalLM``, or a plain ``LlamaForCausalLM``
with hand-registered ``weight_mask`` buffers: the masking contract of DESIGN.md).
"""

from __future__ import annotations

import torch

SPARSE_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TEXT = [
    "The sky on a clear day is blue. Water freezes when it is cold.",
    "Fish live in water and birds fly in the air. A dog barks, a cat meows.",
    "Question: Which is heavier? Answer: a rock. The sun rises in the east.",
]


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def random_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    n = shape[0] * shape[1]
    keep = torch.randperm(n, generator=generator)[: round(density * n)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    return mask.view(shape)


def tiny_llama_arch(vocab_size: int = 100) -> dict:
    """``LlamaConfig`` kwargs of the 2-layer, 32-wide LLaMA the unit tests share (4 heads, 2 kv heads)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def make_sparse_llama(
    *,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 320,
    density: float = 0.3,
    seed: int = 0,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    plain: bool = False,
):
    """A random sparse LLaMA at ``density`` (masked weights zeroed).

    ``plain=False`` (default): a ``SparseLlamaForCausalLM`` (BRF masks from the chts preset).
    ``plain=True``: a plain ``LlamaForCausalLM`` to which ``weight_mask`` buffers (uniformly random masks) are
    registered by hand, the bare contract of DESIGN.md that every checkpoint tool must accept.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    if not plain:
        from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM

        config = SparseLlamaConfig(**arch, sparsity={"method": "chts", "density": density, "seed": seed})
        return SparseLlamaForCausalLM(config).to(dtype).eval()
    model = LlamaForCausalLM(LlamaConfig(**arch)).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in SPARSE_SUFFIXES:
            mask = random_mask(module.weight.shape, density, generator)
            module.register_buffer("weight_mask", mask, persistent=True)
            with torch.no_grad():
                module.weight.mul_(mask)
    return model


def trainer_state(steps: int = 5, layers=("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj")):
    """A ``trainer_state.json`` dict as the sparse-training callback logs it."""
    history = []
    for step in range(0, steps * 10 + 1, 10):
        density = 0.5 - 0.2 * step / (steps * 10)
        entry = {"step": step, "loss": 5.0 - step / 100, "sparsity/density": density}
        entry["sparsity/active_neurons"] = 1.0 - 0.05 * step / (steps * 10)
        for i, layer in enumerate(layers):
            entry[f"sparsity/{layer}/density"] = density + 0.01 * i
            entry[f"sparsity/{layer}/active_out"] = 1.0 - 0.02 * i
        history.append(entry)
    history.append({"step": steps * 10, "eval_loss": 4.2})
    return {"global_step": steps * 10, "max_steps": steps * 10, "log_history": history}
