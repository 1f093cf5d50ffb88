"""Sparse MLP 784-1000-1000-1000-10 on MNIST with dynamic sparse training (arXiv 2501.19107, MLP experiments).

The three hidden linear layers (784->1000, 1000->1000, 1000->1000) are sparse, exactly as in the authors'
MLP code; the 1000->10 output layer stays dense. Chain removal (node percolation, docs/method.md section 5)
runs along the hidden layers in forward order. Trained with Hugging Face ``Trainer`` + ``CHTssCallback``.
The initial weights of the sparse layers are the sparse Kaiming normal ``swi`` of the authors' MLP code (std
``sqrt(2 / (density * n_out))``, ``--sparse_init swi``; ``scaled`` divides PyTorch's init by sqrt(density)).

Launch (from the repository root; MNIST is read offline from the four IDX files in ``--data_dir``, by
default ``$HF_CHTS_DATA_DIR/mnist`` when that variable is set):

    # the paper's setting (100 epochs, 1% density, CHTs, topology update every epoch):
    python recipes/mlp_image_classification.py recipes/configs/mlp_mnist.yaml
    # a short run (1 epoch, an update every 100 steps), CHTs vs the dense baseline:
    python recipes/mlp_image_classification.py --method chts --density 0.01 --num_train_epochs 1 \
        --update_interval 100 --output_dir runs/mlp_chts
    python recipes/mlp_image_classification.py --method dense --num_train_epochs 1 --output_dir runs/mlp_dense
    # any preset (static, set, rigl, mest, granet, cht, chts, chtss) and any SparseTrainingConfig field:
    python recipes/mlp_image_classification.py --method set --density 0.05 --output_dir runs/mlp_set
    # a smoke test without data (deterministic synthetic 10-class images):
    python recipes/mlp_image_classification.py --synthetic --max_steps 50 --update_interval 10 \
        --output_dir /tmp/mlp_smoke

A YAML file (first argument, or ``--config FILE``) sets defaults; flags given after it win. Every
``TrainingArguments`` and ``SparseTrainingConfig`` field is a flag (the sparse seed is ``--seed``).

Outputs in ``--output_dir``: ``model.safetensors`` (weights and ``*.weight_mask`` buffers) and
``results.json`` (config, wall time, test accuracy, densities and the fraction of active hidden neurons: a
hidden neuron is active when it has at least one input and one output link).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_chts.config import SparseTrainingConfig
from hf_chts.datasets_paper import ImageClassificationDataset, load_mnist, synthetic_image_classification
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

DATA_DIR_ENV = "HF_CHTS_DATA_DIR"
"""Environment variable naming a folder of datasets; ``--data_dir`` defaults to its ``mnist`` subfolder."""


def default_data_dir() -> Path | None:
    """``$HF_CHTS_DATA_DIR/mnist``, or None when the variable is not set."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) / "mnist" if root else None


@dataclass
class MLPArguments:
    """Data and model of the MLP recipe."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder with the four MNIST IDX files (.gz or not); default $HF_CHTS_DATA_DIR/mnist."
        },
    )
    synthetic: bool = field(
        default=False,
        metadata={"help": "Use a deterministic synthetic 10-class 28x28 dataset (smoke tests)."},
    )
    synthetic_train_size: int = field(default=6000, metadata={"help": "Training images of --synthetic."})
    synthetic_test_size: int = field(default=1000, metadata={"help": "Test images of --synthetic."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training images."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N test images."})
    hidden_sizes: list[int] = field(
        default_factory=lambda: [1000, 1000, 1000], metadata={"help": "Widths of the (sparse) hidden layers."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout after each hidden activation."})
    sparse_init: str = field(
        default="swi",
        metadata={
            "help": "Initial weights of the sparse layers: 'swi' (normal, std sqrt(2 / (density * n_out))), "
            "'scaled' (PyTorch's init divided by sqrt(density)) or 'default' (PyTorch's init)."
        },
    )


# Paper's MLP setting (research code): 3 sparse hidden layers at 1% density, zeta 0.3, soft removal with the
# temperature growing 1 -> 3, an evolution step every epoch (60000 / 32 = 1875 optimizer steps).
SparseArguments = sparse_arguments_class(
    method="chts", density=0.01, zeta=0.3, temperature_end=3.0, update_interval=1875
)

# SGD with momentum 0.9, lr 0.025 decayed linearly, weight decay 5e-4, batch 32, 100 epochs.
TRAINING_DEFAULTS = dict(
    output_dir="runs/mlp_mnist",
    per_device_train_batch_size=32,
    per_device_eval_batch_size=1000,
    num_train_epochs=100,
    learning_rate=0.025,
    optim="sgd",
    optim_args="momentum=0.9",
    weight_decay=5e-4,
    lr_scheduler_type="linear",
    logging_steps=100,
    save_strategy="no",
    report_to="none",
    seed=0,
)


class MLPClassifier(nn.Module):
    """ReLU MLP; ``hidden`` (an ``nn.ModuleList``: the default target selection) holds the sparse layers."""

    def __init__(self, in_features: int, hidden_sizes: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        sizes = [in_features, *hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.classifier = nn.Linear(sizes[-1], num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        x = pixel_values
        for layer in self.hidden:
            x = self.dropout(torch.relu(layer(x)))
        logits = self.classifier(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mlp_chains(layer_names: list[str], sparse_names: typing.Iterable[str]) -> list[LayerChain]:
    """One `LayerChain` per run of consecutive sparse layers (in forward order) of at least two layers."""
    sparse, chains, run = set(sparse_names), [], []
    for name in [*layer_names, None]:
        if name in sparse:
            run.append(name)
            continue
        if len(run) >= 2:
            chains.append(LayerChain(tuple(run)))
        run = []
    return chains


def active_hidden_neurons(model: MLPClassifier) -> dict[str, float]:
    """Per hidden layer (and overall), the fraction of neurons with at least one input and one output link."""
    layers = [*model.hidden, model.classifier]

    def mask(layer):  # (n_out, n_in) bool; a dense layer has a link wherever its weight is non-zero
        return layer.weight_mask.bool() if hasattr(layer, "weight_mask") else layer.weight.detach() != 0

    result, active, total = {}, 0, 0
    for i in range(len(model.hidden)):
        has_in = mask(layers[i]).any(dim=1)
        has_out = mask(layers[i + 1]).any(dim=0)
        count = int((has_in & has_out).sum())
        result[f"hidden.{i}"] = count / has_in.numel()
        active, total = active + count, total + has_in.numel()
    result["all"] = active / total
    return result


def load_data(args: MLPArguments, seed: int) -> tuple[ImageClassificationDataset, ImageClassificationDataset]:
    if args.synthetic:
        train = synthetic_image_classification(args.synthetic_train_size, seed=seed, split="train")
        test = synthetic_image_classification(args.synthetic_test_size, seed=seed, split="test")
    else:
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        if args.data_dir is None and (data_dir is None or not data_dir.is_dir()):
            where = (
                f"the default folder {data_dir} does not exist" if data_dir else f"${DATA_DIR_ENV} is unset"
            )
            raise FileNotFoundError(
                f"MNIST is not shipped with hf_chts and {where}. Pass --data_dir with the four IDX files "
                "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                f"t10k-labels-idx1-ubyte, .gz or not), set {DATA_DIR_ENV} to a folder holding mnist/, or "
                "pass --synthetic to smoke-test."
            )
        train, test = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    train = tuple(a[: args.max_train_samples] for a in train)
    test = tuple(a[: args.max_eval_samples] for a in test)
    return ImageClassificationDataset(*train), ImageClassificationDataset(*test)


def compute_accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def parse_args(argv: list[str] | None = None):
    """``(MLPArguments, SparseArguments, TrainingArguments)`` from a YAML file (optional) and flags."""
    return parse_recipe_args(
        (MLPArguments, SparseArguments, TrainingArguments), argv, defaults=TRAINING_DEFAULTS
    )


def main(args: MLPArguments, sparse_args, training_args: TrainingArguments) -> dict:
    start = time.perf_counter()
    set_seed(training_args.seed)
    train_dataset, test_dataset = load_data(args, training_args.seed)
    model = MLPClassifier(train_dataset.images.shape[1], list(args.hidden_sizes), 10, args.dropout)

    callbacks, config = [FinishedRunGuard()], None  # a finished run resumed stays finished
    if sparse_args.method != "dense":
        from hf_chts.callback import CHTssCallback
        from hf_chts.sparsify import sparsify_

        config = SparseTrainingConfig(**dataclasses.asdict(sparse_args), seed=training_args.seed)
        # Draw the step-0 masks now (the same ones the callback would draw: seeded by config.seed and the
        # layer names) so the initial weights can be scaled to them; the callback keeps masks it finds.
        # CSTI (init="csti") reads the correlation of the input pixels over the training images.
        csti_inputs = train_dataset.images if config.init == "csti" else None
        sparse_modules = sparsify_(model, config, csti_inputs=csti_inputs)
        init_sparse_weights_(sparse_modules, args.sparse_init)
        order = [f"hidden.{i}" for i in range(len(model.hidden))] + ["classifier"]
        # The callback takes over the masked layers and asks for their chains (chain removal).
        chains = lambda _model, sparse: mlp_chains(order, sparse)  # noqa: E731
        callbacks = [CHTssCallback(config, chains=chains, csti_inputs=csti_inputs)]  # a FinishedRunGuard too

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=test_dataset,
        compute_metrics=compute_accuracy,
        callbacks=callbacks,
    )
    train_result = trainer.train(
        resume_from_checkpoint=resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir
        )
    )
    metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")

    masks = {name: m.clone() for name, m in get_masks(model).items()}
    layers = {
        name: {"shape": list(m.shape), "nnz": int(m.sum()), "density": int(m.sum()) / m.numel()}
        for name, m in masks.items()
    }
    n_params = dense_parameter_count(model)  # the dense layout, whatever the compute
    n_masked_off = sum(int((~m).sum()) for m in masks.values())
    results = {
        "recipe": "mlp_image_classification",
        "method": sparse_args.method,
        "data": "synthetic" if args.synthetic else str(args.data_dir or default_data_dir()),
        "num_train_samples": len(train_dataset),
        "num_test_samples": len(test_dataset),
        "model": {"in_features": train_dataset.images.shape[1], "hidden_sizes": list(args.hidden_sizes)},
        "sparse_config": config.to_dict(resolved=True) if config is not None else None,
        "training_args": json.loads(training_args.to_json_string()),
        "metrics": {
            "test_accuracy": metrics["test_accuracy"],
            "test_loss": metrics["test_loss"],
            "train_loss": train_result.training_loss,
            "global_step": train_result.global_step,
        },
        "sparsity": {
            "layers": layers,
            "active_hidden_neurons": active_hidden_neurons(model),
            "num_parameters": n_params,
            "num_active_parameters": n_params - n_masked_off,
        },
        "train_runtime_seconds": train_result.metrics.get("train_runtime"),
        "wall_time_seconds": time.perf_counter() - start,
    }
    logger.info("test accuracy %.4f", metrics["test_accuracy"])
    if training_args.should_save:
        trainer.save_model(training_args.output_dir)
        out = Path(training_args.output_dir) / "results.json"
        out.write_text(json.dumps(results, indent=2, default=str))
        print(f"results: {out}")
        print(json.dumps({**results["metrics"], "active": results["sparsity"]["active_hidden_neurons"]}))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(*parse_args())
