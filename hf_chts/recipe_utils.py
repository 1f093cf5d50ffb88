"""Pieces the recipes share: command-line arguments mirroring `SparseTrainingConfig`, sparse weight init."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ._validation import check_choice, check_density, check_positive_int, check_shape_2d
from .config import METHODS, SparseTrainingConfig
from .masking import is_sparse_compute, write_weight_
from .rewarmup import LearningRateScale

__all__ = [
    "SPARSE_INITS",
    "CyclicRewarmup",
    "apply_yaml_defaults",
    "init_sparse_weights_",
    "parse_recipe_args",
    "resolve_resume_checkpoint",
    "scale_sparse_init_",
    "sparse_arguments_class",
    "swi_std",
]

SPARSE_INITS = ("swi", "scaled", "default")
"""Weight initialisations of the sparse layers: see :func:`init_sparse_weights_`."""


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: ``latest`` means the newest *complete* checkpoint of ``output_dir``.

    ``latest`` (or ``True``) resolves with :func:`hf_chts.checkpointing.last_complete_checkpoint`, which
    skips a checkpoint whose save was interrupted (transformers' own ``True`` picks the highest step,
    complete or not); ``None`` when there is none yet, so the same command starts a run and resumes it after
    a crash. Any other value is a checkpoint folder, passed on unchanged.
    """
    from .checkpointing import last_complete_checkpoint

    if value is True or (isinstance(value, str) and value.lower() in ("latest", "true")):
        found = last_complete_checkpoint(output_dir)
        print(
            f"hf_chts: resuming from {found}" if found else f"hf_chts: no complete checkpoint in {output_dir}"
        )
        return found
    if value is False or value in (None, "", "false", "False"):
        return None
    return value


def apply_yaml_defaults(parser, path: str | os.PathLike) -> None:
    """Set the defaults of an ``HfArgumentParser`` from a YAML file whose keys must all be its flags.

    Flags given on the command line still win over the file.
    """
    import yaml

    values = yaml.safe_load(Path(path).read_text()) or {}
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} in {path}: every key must be a flag of this recipe (unknown keys are "
            "refused; run with --help to list the valid ones)."
        )
    parser.set_defaults(**values)


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, *, defaults: Mapping | None = None
) -> tuple:
    """Parse a recipe's dataclasses from an optional YAML file and flags (flags win over the file).

    The YAML file is either the first argument (``recipe.py config.yaml --flag ...``) or ``--config FILE``;
    ``defaults`` are the recipe's own defaults, below the file's.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(tuple(dataclass_types))
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_file = argv.pop(0)
    elif "--config" in argv:
        i = argv.index("--config")
        config_file = argv[i + 1]
        del argv[i : i + 2]
    if config_file:
        apply_yaml_defaults(parser, config_file)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def sparse_arguments_class(**defaults: typing.Any) -> type:
    """A dataclass mirroring `SparseTrainingConfig` for the command line, ``method`` also accepting "dense".

    ``seed`` is left out (``TrainingArguments.seed`` seeds everything); ``defaults`` replace field defaults.

    Example:
        >>> SparseArguments = sparse_arguments_class(method="chts", density=0.01)
        >>> SparseArguments().density
        0.01
    """
    hints = typing.get_type_hints(SparseTrainingConfig)
    fields = []
    for f in dataclasses.fields(SparseTrainingConfig):
        if f.name == "seed":
            continue
        meta = dict(f.metadata)
        hint = hints[f.name]
        if f.name == "method":
            meta["help"] = meta["help"] + " Or 'dense': no sparsity, no callback."
            hint = typing.Literal[(*METHODS, "dense")]
        fields.append((f.name, hint, field(default=defaults.get(f.name, f.default), metadata=meta)))
    return dataclasses.make_dataclass("SparseArguments", fields)


@torch.no_grad()
def scale_sparse_init_(modules: Mapping[str, nn.Module]) -> None:
    """Divide each sparse layer's initial weights by sqrt(its density).

    A neuron then starts with the output variance it would have in the dense network (the sparse weight
    initialisation of the authors' MLP code); without it the signal of a 1%-dense MLP shrinks about 10x per
    layer and training stalls at chance level.
    """
    for module in modules.values():
        density = module.weight_mask.float().mean().item()
        if 0 < density < 1:
            if is_sparse_compute(module):
                module.weight_values.mul_(density**-0.5)
            else:
                module.weight.mul_(density**-0.5)


def swi_std(shape: typing.Sequence[int], density: float) -> float:
    """Standard deviation of the sparse weight initialisation (swi) of a ``(n_out, n_in)`` weight.

    ``sqrt(2 / (density * N / n_in))`` with ``N = n_out * n_in``, i.e. ``sqrt(2 / (density * n_out))``: a
    Kaiming normal whose fan is the expected number of links per input neuron (the authors' MLP code).

    Example:
        >>> round(swi_std((1000, 784), 0.06), 4)
        0.1826
    """
    n_out, n_in = check_shape_2d(shape)
    density = check_density(density)
    return math.sqrt(2.0 / (density * (n_out * n_in) / n_in))


@torch.no_grad()
def init_sparse_weights_(
    modules: Mapping[str, nn.Module], mode: str = "swi", generator: torch.Generator | None = None
) -> None:
    """Initialise the weights of masked layers (``weight`` and ``weight_mask``) for sparse training.

    ``mode``: ``"swi"`` draws a normal with :func:`swi_std` of the layer's shape and mask density;
    ``"scaled"`` divides the current weights by sqrt(density) (:func:`scale_sparse_init_`); ``"default"``
    keeps PyTorch's initialisation. Masked positions are set to 0.0; biases are not touched. Weights are in
    the ``nn.Linear`` layout ``(n_out, n_in)``.
    """
    check_choice("sparse_init", mode, SPARSE_INITS)
    if mode == "default":
        return
    if mode == "scaled":
        scale_sparse_init_(modules)
        return
    for module in modules.values():
        mask = module.weight_mask.bool()
        density = mask.float().mean().item()
        if density == 0:
            continue
        std = swi_std(mask.shape, density)
        device = generator.device if generator is not None else module.weight.device
        noise = torch.randn(mask.shape, generator=generator, device=device, dtype=torch.float32)
        write_weight_(module, noise * std)


class CyclicRewarmup(TrainerCallback):
    """A ``TrainerCallback`` re-warming the learning rate at the start of every cycle, for any method.

    At optimizer step ``s`` (0-based), with ``r = s % every``: while ``r < steps`` the scheduler's learning
    rate is multiplied by ``r / steps`` for that step (0 at the first step of a cycle), over the whole run and
    for dense and sparse models alike. With ``every`` equal to the topology update interval this is the
    schedule of the authors' LLaMA code (cosine with restarts: 10 warm-up steps every 100). Use it instead of
    ``SparseTrainingConfig.rewarmup_steps`` (which re-warms only after topology updates, sparse runs only).

    Example:
        >>> callback = CyclicRewarmup(every=100, steps=10)
        >>> [callback.factor(s) for s in (100, 105, 110, 150)]
        [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, every: int, steps: int) -> None:
        check_positive_int(every, "every")
        check_positive_int(steps, "steps", allow_zero=True)
        if steps >= every:
            raise ValueError(
                f"CyclicRewarmup: `steps` ({steps}) must be smaller than the cycle `every` ({every}); e.g. "
                "steps = every // 10."
            )
        self.every, self.steps = every, steps
        self._scale = LearningRateScale()

    @classmethod
    def research(cls, every: int, steps: int = 10) -> CyclicRewarmup | None:
        """The authors' LLaMA re-warm-up for a cycle of ``every`` steps: ``steps`` warm-up steps (their 10 of
        every 100), but never more than 10% of the cycle, so that short runs with short cycles are not spent
        warming up; None (no re-warm-up) for ``steps=0`` or a cycle under 10 steps.

        The one place the schedule's length is decided: the LLaMA recipe's ``--cyclic_rewarmup_steps`` and the
        reproduction harness both build their callback here (docs/method.md section 8).

        Example:
            >>> CyclicRewarmup.research(100).steps, CyclicRewarmup.research(20).steps
            (10, 2)
            >>> CyclicRewarmup.research(8) is None
            True
        """
        check_positive_int(every, "every")
        check_positive_int(steps, "steps", allow_zero=True)
        steps = min(steps, every // 10)
        return cls(every=every, steps=steps) if steps else None

    def factor(self, step: int) -> float:
        """The multiplier of the learning rate at 0-based optimizer step ``step``."""
        r = step % self.every
        return r / self.steps if r < self.steps else 1.0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._scale.scale_(optimizer, self.factor(state.global_step))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._scale.restore_(optimizer)
