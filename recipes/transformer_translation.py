"""Sparse encoder-decoder Transformer for Multi30k en->de translation (arXiv 2501.19107, MT experiments).

A Marian-style Transformer (``MarianConfig`` / ``MarianMTModel``, sinusoidal positions, shared embeddings tied
to the output layer) is built from scratch with the sizes given below and trained with
``Seq2SeqTrainer`` + ``CHTssCallback``. The sparse layers are the attention projections (q, k, v, out of the
encoder self-attention, decoder self-attention and cross-attention) and the feed-forward linears (fc1, fc2)
of every block: the default target selection (linear layers inside the ``nn.ModuleList`` of blocks).
Embeddings, layer norms and the (tied) output projection stay dense. Chain removal runs along fc1 -> fc2
(the feed-forward hidden neurons) and v_proj -> out_proj (the value dimensions) of every block. The initial
weights of each sparse layer are divided by sqrt(its density) (``--sparse_init scaled``).

A joint byte-level BPE is trained locally with ``tokenizers`` on the training text and cached under
``$HF_CHTS_CACHE`` (default ``~/.cache/hf_chts``). BLEU is sacreBLEU (13a tokenization, detokenized output)
on the test set (Multi30k ``test_2016_flickr``), decoded greedily or with a small beam.

Launch (from the repository root; Multi30k is read offline, by default from ``../shared/data/multi30k``
next to the repository, else pass ``--data_dir`` with ``{train,val,test_2016_flickr}.{en,de}[.gz]``):

    # the paper's setting (5% density, CHTss; a GPU job):
    python recipes/transformer_translation.py recipes/configs/transformer_multi30k.yaml
    # a short CPU run with a small model:
    python recipes/transformer_translation.py --method chtss --density 0.05 --d_model 256 --layers 3 \
        --attention_heads 4 --ffn_dim 1024 --max_steps 2000 --warmup_steps 200 --update_interval 100 \
        --output_dir runs/mt_chtss
    python recipes/transformer_translation.py --method dense --d_model 256 --layers 3 --attention_heads 4 \
        --ffn_dim 1024 --max_steps 2000 --warmup_steps 200 --output_dir runs/mt_dense
    # a smoke test:
    python recipes/transformer_translation.py --max_train_samples 500 --max_test_samples 50 --d_model 64 \
        --layers 1 --attention_heads 2 --ffn_dim 128 --max_steps 20 --update_interval 5 \
        --output_dir /tmp/mt_smoke

A YAML file (first argument, or ``--config FILE``) sets defaults; flags given after it win. Every
``Seq2SeqTrainingArguments`` and ``SparseTrainingConfig`` field is a flag (the sparse seed is ``--seed``).

Outputs in ``--output_dir``: the model (``save_pretrained``, with ``*.weight_mask`` buffers), the tokenizer,
``results.json`` (config, wall time, test BLEU, validation loss, densities, active feed-forward neurons) and
``test_translations.txt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    DataCollatorForSeq2Seq,
    MarianConfig,
    MarianMTModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

from hf_chts.config import SparseTrainingConfig
from hf_chts.data import get_tokenizer
from hf_chts.datasets_paper import read_parallel_corpus
from hf_chts.finished_run import FinishedRunGuard
from hf_chts.masking import dense_parameter_count, get_masks
from hf_chts.recipe_utils import (
    init_sparse_weights_,
    parse_recipe_args,
    resolve_resume_checkpoint,
    sparse_arguments_class,
)
from hf_chts.topology.percolation import LayerChain

logger = logging.getLogger(__name__)

REPO_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""Where a checkout of this project finds the shared data (``../shared/data`` next to the repository)."""


@dataclass
class TranslationArguments:
    """Data, tokenizer, model and decoding of the translation recipe."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with {train,val,test_2016_flickr}.{en,de}[.gz]; default ../shared/data/multi30k"
        },
    )
    source_lang: str = field(default="en", metadata={"help": "Source language suffix of the files."})
    target_lang: str = field(default="de", metadata={"help": "Target language suffix of the files."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training pairs."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N validation pairs."}
    )
    max_test_samples: int | None = field(default=None, metadata={"help": "Keep the first N test pairs."})
    max_source_length: int = field(default=128, metadata={"help": "Source tokens kept (eos included)."})
    max_target_length: int = field(default=128, metadata={"help": "Target tokens kept (eos included)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing tokenizer (local folder); default: train a joint BPE."}
    )
    tokenizer_vocab_size: int = field(default=8000, metadata={"help": "Vocabulary of the joint BPE."})
    tokenizer_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of trained tokenizers; default $HF_CHTS_CACHE or ~/.cache/hf_chts."},
    )
    d_model: int = field(default=512, metadata={"help": "Model width."})
    layers: int = field(default=6, metadata={"help": "Encoder layers and decoder layers (each)."})
    attention_heads: int = field(default=8, metadata={"help": "Attention heads."})
    ffn_dim: int = field(default=2048, metadata={"help": "Feed-forward hidden size."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout."})
    attention_dropout: float = field(default=0.1, metadata={"help": "Attention dropout."})
    activation_function: str = field(default="relu", metadata={"help": "Feed-forward activation."})
    chain_attention: bool = field(
        default=True,
        metadata={"help": "With chain removal, also chain v_proj -> out_proj of each attention."},
    )
    sparse_init: str = field(
        default="scaled",
        metadata={
            "help": "Initial weights of the sparse layers: 'swi' (normal, std sqrt(2 / (density * n_out))), "
            "'scaled' (PyTorch's init divided by sqrt(density)) or 'default' (PyTorch's init)."
        },
    )
    num_beams: int = field(default=1, metadata={"help": "Beam size of the BLEU decoding (1 = greedy)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Sentences per generate() call."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest translation generated."})


# Paper's MT setting: 5% density, CHTss (sigmoid decay from 0.5), topology update every 100 steps with cosine
# zeta 0.1 and 20 steps of learning-rate re-warmup. The decay ends with the last update (t_end = 0.75).
SparseArguments = sparse_arguments_class(
    method="chtss", density=0.05, update_interval=100, decay_end_fraction=0.75, rewarmup_steps=20
)

# Adam (beta2 0.998), inverse-square-root schedule with warmup, label smoothing 0.1, no weight decay.
TRAINING_DEFAULTS = dict(
    output_dir="runs/transformer_multi30k",
    per_device_train_batch_size=128,
    per_device_eval_batch_size=128,
    max_steps=10000,
    learning_rate=1e-3,
    lr_scheduler_type="inverse_sqrt",
    warmup_steps=2000,
    adam_beta2=0.998,
    weight_decay=0.0,
    label_smoothing_factor=0.1,
    max_grad_norm=0.0,
    logging_steps=100,
    save_strategy="no",
    report_to="none",
    seed=0,
)


class PairDataset(torch.utils.data.Dataset):
    """Tokenized sentence pairs: ``{"input_ids", "attention_mask", "labels"}`` lists, each ending in eos."""

    def __init__(self, tokenizer, sources: list[str], targets: list[str], max_source: int, max_target: int):
        eos = tokenizer.eos_token_id
        src = tokenizer(sources, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(targets, add_special_tokens=False)["input_ids"]
        self.examples = []
        for s, t in zip(src, tgt, strict=True):
            s, t = s[: max_source - 1] + [eos], t[: max_target - 1] + [eos]
            self.examples.append({"input_ids": s, "attention_mask": [1] * len(s), "labels": t})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def build_tokenizer(args: TranslationArguments, sources: list[str], targets: list[str]):
    """The tokenizer given, or a joint byte-level BPE trained on the training text (cached by its content)."""
    if args.tokenizer_name_or_path:
        return get_tokenizer(args.tokenizer_name_or_path)
    digest = hashlib.sha256()
    for line in (*sources, *targets):
        digest.update(line.encode("utf-8") + b"\n")
    return get_tokenizer(
        documents=sources + targets,
        vocab_size=args.tokenizer_vocab_size,
        fingerprint=f"parallel-{args.source_lang}-{args.target_lang}-{digest.hexdigest()}",
        cache_dir=args.tokenizer_cache_dir,
    )


def build_model(args: TranslationArguments, tokenizer) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=args.attention_heads,
        decoder_attention_heads=args.attention_heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        dropout=args.dropout,
        attention_dropout=args.attention_dropout,
        activation_function=args.activation_function,
        max_position_embeddings=max(args.max_source_length, args.max_target_length, args.max_new_tokens) + 2,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return MarianMTModel(config)


def marian_chains(names: typing.Iterable[str], chain_attention: bool = True) -> list[LayerChain]:
    """Chains of every block whose two layers are both sparse: fc1 -> fc2, and v_proj -> out_proj.

    A feed-forward hidden neuron is fed by a row of fc1 and read by a column of fc2; value dimension ``d`` is
    a row of v_proj and is read (after the attention average, head by head) by column ``d`` of out_proj.
    """
    present, chains = set(names), []
    blocks = dict.fromkeys(n.rsplit(".", 1)[0] for n in present if n.endswith(".fc1"))
    for block in blocks:
        if f"{block}.fc2" in present:
            chains.append(LayerChain((f"{block}.fc1", f"{block}.fc2")))
    if chain_attention:
        attentions = dict.fromkeys(n.rsplit(".", 1)[0] for n in present if n.endswith(".v_proj"))
        for attn in attentions:
            if f"{attn}.out_proj" in present:
                chains.append(LayerChain((f"{attn}.v_proj", f"{attn}.out_proj")))
    return chains


def active_ffn_neurons(model: MarianMTModel) -> float:
    """Fraction of feed-forward hidden neurons (all blocks) with an fc1 input link and an fc2 output link."""
    active = total = 0
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        fc1 = layer.fc1.weight_mask if hasattr(layer.fc1, "weight_mask") else layer.fc1.weight != 0
        fc2 = layer.fc2.weight_mask if hasattr(layer.fc2, "weight_mask") else layer.fc2.weight != 0
        both = fc1.any(dim=1) & fc2.any(dim=0)
        active, total = active + int(both.sum()), total + both.numel()
    return active / total if total else 1.0


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], args: TranslationArguments) -> list[str]:
    """Greedy (``num_beams=1``) or beam-search translations, batched by source length."""
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    encoded = tokenizer(sources, add_special_tokens=False)["input_ids"]
    encoded = [ids[: args.max_source_length - 1] + [eos] for ids in encoded]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(sources)
    for start in range(0, len(order), args.generation_batch_size):
        batch = order[start : start + args.generation_batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        generated = model.generate(
            input_ids=padded["input_ids"].to(device),
            attention_mask=padded["attention_mask"].to(device),
            num_beams=args.num_beams,
            do_sample=False,
            max_new_tokens=args.max_new_tokens,
        )
        for i, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True), strict=True):
            outputs[i] = text.strip()
    return outputs


def parse_args(argv: list[str] | None = None):
    """``(TranslationArguments, SparseArguments, Seq2SeqTrainingArguments)`` from a YAML file and flags."""
    return parse_recipe_args(
        (TranslationArguments, SparseArguments, Seq2SeqTrainingArguments), argv, defaults=TRAINING_DEFAULTS
    )


def main(args: TranslationArguments, sparse_args, training_args: Seq2SeqTrainingArguments) -> dict:
    import sacrebleu

    start = time.perf_counter()
    set_seed(training_args.seed)
    data_dir = Path(args.data_dir) if args.data_dir else REPO_DATA_DIR / "multi30k"
    if args.data_dir is None and not data_dir.is_dir():
        raise FileNotFoundError(
            f"Multi30k is not shipped with hf_chts and the default folder {data_dir} does not exist. Pass "
            "--data_dir with one sentence per line files {train,val,test_2016_flickr}.{en,de} (.gz or not)."
        )
    langs = (args.source_lang, args.target_lang)
    train_src, train_tgt = read_parallel_corpus(data_dir, "train", *langs, max_samples=args.max_train_samples)
    val_src, val_tgt = read_parallel_corpus(data_dir, "val", *langs, max_samples=args.max_eval_samples)
    test_src, test_tgt = read_parallel_corpus(data_dir, "test", *langs, max_samples=args.max_test_samples)

    tokenizer = build_tokenizer(args, train_src, train_tgt)
    lengths = (args.max_source_length, args.max_target_length)
    train_dataset = PairDataset(tokenizer, train_src, train_tgt, *lengths)
    val_dataset = PairDataset(tokenizer, val_src, val_tgt, *lengths)
    model = build_model(args, tokenizer)

    callbacks, config = [FinishedRunGuard()], None  # a finished run resumed stays finished
    if sparse_args.method != "dense":
        from hf_chts.callback import CHTssCallback
        from hf_chts.sparsify import sparsify_

        config = SparseTrainingConfig(**dataclasses.asdict(sparse_args), seed=training_args.seed)
        # Draw the step-0 masks now (the same ones the callback would draw: seeded by config.seed and the
        # layer names) so the initial weights can be scaled to them; the callback keeps masks it finds.
        sparse_modules = sparsify_(model, config)
        init_sparse_weights_(sparse_modules, args.sparse_init)
        chains = lambda _model, sparse: marian_chains(sparse, args.chain_attention)  # noqa: E731
        callbacks = [CHTssCallback(config, chains=chains)]  # a FinishedRunGuard too

    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    train_result = trainer.train(
        resume_from_checkpoint=resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir
        )
    )
    val_metrics = trainer.evaluate(val_dataset, metric_key_prefix="val")

    hypotheses = translate(trainer.model, tokenizer, test_src, args)
    metric = sacrebleu.BLEU()
    bleu = metric.corpus_score(hypotheses, [test_tgt])

    masks = get_masks(model)
    nnz = sum(int(m.sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    n_params = dense_parameter_count(model)  # the dense layout, whatever the compute
    results = {
        "recipe": "transformer_translation",
        "method": sparse_args.method,
        "data_dir": str(data_dir),
        "languages": f"{args.source_lang}-{args.target_lang}",
        "num_train_pairs": len(train_dataset),
        "num_val_pairs": len(val_dataset),
        "num_test_pairs": len(test_src),
        "vocab_size": len(tokenizer),
        "model": {
            "d_model": args.d_model,
            "layers": args.layers,
            "attention_heads": args.attention_heads,
            "ffn_dim": args.ffn_dim,
            "num_parameters": n_params,
        },
        "translation_args": dataclasses.asdict(args),
        "sparse_config": config.to_dict(resolved=True) if config is not None else None,
        "training_args": json.loads(training_args.to_json_string()),
        "metrics": {
            "test_bleu": bleu.score,
            "test_bleu_signature": str(metric.get_signature()),
            "val_loss": val_metrics["val_loss"],
            "train_loss": train_result.training_loss,
            "global_step": train_result.global_step,
            "num_beams": args.num_beams,
        },
        "sparsity": {
            "num_sparse_layers": len(masks),
            "density": nnz / numel if numel else 1.0,
            "layer_densities": {name: int(m.sum()) / m.numel() for name, m in masks.items()},
            "active_ffn_neurons": active_ffn_neurons(model),
            "num_active_parameters": n_params - (numel - nnz),
        },
        "examples": [
            {"source": s, "reference": r, "hypothesis": h}
            for s, r, h in zip(test_src[:3], test_tgt[:3], hypotheses[:3], strict=True)
        ],
        "train_runtime_seconds": train_result.metrics.get("train_runtime"),
        "wall_time_seconds": time.perf_counter() - start,
    }
    logger.info("test BLEU %.2f (%s)", bleu.score, bleu)
    if training_args.should_save:
        trainer.save_model(training_args.output_dir)
        out_dir = Path(training_args.output_dir)
        (out_dir / "test_translations.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"results: {out_dir / 'results.json'}\n{json.dumps(results['metrics'])}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(*parse_args())
