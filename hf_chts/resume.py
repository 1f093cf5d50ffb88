"""Resuming a sparse run: where its state is found, what is saved with each checkpoint, what comes back.

A ``Trainer`` that resumes at step ``t`` has its weights, optimizer and scheduler back; the sparse run also
needs its masks and the engine's scalar state (early-stop flags, the last update step, ...). They are written
to ``<checkpoint>/hf_chts_state/`` (:func:`hf_chts.checkpointing.save_sparse_state`: safetensors + JSON,
never pickle) and found again from the Trainer's public surface only (:func:`checkpoint_candidates`):
``args.resume_from_checkpoint`` when it is a path, else ``<args.output_dir>/checkpoint-<state.global_step>``.
:func:`find_resume_state` reads the first usable candidate and :func:`check_resume_state` refuses a state
which would not continue the run (docs/reliability.md); :mod:`hf_chts.checkpointing` only writes and reads
the files.

Example:

```python
>>> from types import SimpleNamespace
>>> checkpoint_candidates(SimpleNamespace(output_dir="out", resume_from_checkpoint=True), step=40)
['out/checkpoint-40']
```
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpointing import (
    FORMAT_VERSION,
    MASKS_FILE,
    STATE_DIR,
    STATE_FILE,
    TRAINER_STATE_FILE,
    load_sparse_state,
    lock_output_dir,
    masks_in_model_weights,
    model_weight_files,
    save_sparse_state,
    sparse_state_complete,
    trainer_callback_state,
    unlock_output_dir,
)
from .config import SparseTrainingConfig
from .masking import layer_view_shape

logger = logging.getLogger(__name__)

__all__ = [
    "check_resume_state",
    "checkpoint_candidates",
    "checkpoint_folder",
    "claim_output_dir",
    "find_resume_state",
    "find_state",
    "last_update_before",
    "release_output_dir",
    "restore_progress",
    "resume_point",
    "scalar_state",
    "write_state",
]


def checkpoint_folder(output_dir: str, step: int) -> str:
    """The folder the Trainer writes the checkpoint of ``step`` to: ``<output_dir>/checkpoint-<step>``."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def checkpoint_candidates(args: Any, step: int, resume_from: str | None = None) -> list[str]:
    """Folders that may hold the state of a run resumed at ``step``, in order of preference.

    ``resume_from`` (given by the user), ``args.resume_from_checkpoint`` when it is a path, then
    ``<args.output_dir>/checkpoint-<step>`` (what ``resume_from_checkpoint=True`` resolves to).
    """
    candidates = [resume_from] if resume_from else []
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(args.resume_from_checkpoint)
    candidates.append(checkpoint_folder(args.output_dir, step))
    return list(dict.fromkeys(candidates))


def last_update_before(config: SparseTrainingConfig, last_update: int, step: int) -> int:
    """The step of the last topology update at or before ``step`` (0 for a static run or before the first).

    ``last_update`` is the engine's last update step (``TopologyEngine.last_update``, i.e. ``t_end``).
    """
    if not config.is_dynamic:
        return 0
    interval = config.update_interval
    return min(step, last_update) // interval * interval


def scalar_state(
    config: SparseTrainingConfig,
    engine: Any,
    modules: Mapping[str, nn.Module],
    step: int | None,
    last_update_step: int,
    update_seconds_total: float,
) -> dict[str, Any]:
    """The JSON state saved beside the masks (``state.json``) and in ``trainer_state.json``.

    ``step`` is the step of the checkpoint it is saved with (None outside a save).
    """
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "config": config.to_dict(),
        "engine": engine.state_dict() if engine is not None else {},
        "layers": {name: list(layer_view_shape(m)) for name, m in modules.items()},
        "last_update_step": last_update_step,
        "update_seconds_total": update_seconds_total,
    }


def claim_output_dir(args: Any) -> None:
    """On the process that saves (``args.should_save``), take ``args.output_dir``'s writer lock
    (:func:`lock_output_dir`).

    Raises:
        ValueError: another training run is writing the same folder.
    """
    output_dir = getattr(args, "output_dir", None)
    # `TrainingArguments.should_save` names the one saving process; arguments without it (a hand-written
    # loop) take no lock, since every rank of such a loop may call this
    if output_dir and getattr(args, "should_save", False):
        lock_output_dir(output_dir)


def release_output_dir(args: Any) -> None:
    """Release the lock :func:`claim_output_dir` took (nothing on processes that hold none)."""
    if getattr(args, "output_dir", None):
        unlock_output_dir(args.output_dir)


def write_state(
    args: Any, trainer_state: Any, masks: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> bool:
    """Write ``hf_chts_state/`` into the checkpoint of ``trainer_state.global_step`` if it exists and this
    process saves (``args.should_save``; the main process when ``args`` does not say).

    Returns:
        `bool`: whether it was written (False on processes that do not save, or outside a save).
    """
    if not getattr(args, "should_save", trainer_state.is_world_process_zero):
        return False
    checkpoint = checkpoint_folder(args.output_dir, trainer_state.global_step)
    if not os.path.isdir(checkpoint):
        return False  # not saving a checkpoint right now
    save_sparse_state(checkpoint, masks, state)
    return True


def find_state(
    args: Any,
    step: int,
    modules: Mapping[str, nn.Module],
    engine: Any,
    *,
    carried: bool,
    resume_from: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint's masks (validated against the run's schedule) and scalar state, to resume at ``step``.

    Args:
        args: the Trainer's ``TrainingArguments``.
        step (`int`): ``state.global_step`` the Trainer resumes at.
        modules: the sparse modules by name.
        engine (`TopologyEngine`): the run's engine (its schedule gives the expected link counts).
        carried (`bool`): whether the model already carries masks (then a missing state is only a warning).
        resume_from (`str`, *optional*): a folder to try first.

    Returns:
        ``(masks, scalar state)``, or None when no state is found and the model's masks are kept.

    Raises:
        ValueError: no state and no masks anywhere, or a state that does not continue this run.
    """
    tried = checkpoint_candidates(args, step, resume_from)
    at = last_update_before(engine.config, engine.last_update, step)
    found = find_resume_state(
        tried,
        trainer_step=step,
        shapes={name: tuple(m.weight.shape) for name, m in modules.items()},
        expected_nnz={name: engine.target_nnz(name, at) for name in modules},
        early_stop=engine.config.early_stop_threshold is not None,
    )
    if found is None:
        if carried:
            logger.warning(
                "hf_chts: resuming at step %d without %s/ in %s; keeping the masks the model carries.",
                step,
                STATE_DIR,
                tried,
            )
            return None
        raise ValueError(
            f"Resuming at step {step}, but no {STATE_DIR}/ and no masks in the model weights were found "
            f"in {tried}; the masks cannot be restored and the run would not continue the same topology. "
            "Pass `resume_from=<checkpoint folder>` to CHTssCallback, or resume from "
            "hf_chts.last_complete_checkpoint(output_dir)."
        )
    masks, scalar, source = found
    logger.info("hf_chts: restoring masks and topology state of step %d from %s.", step, source)
    return masks, scalar


def resume_point(
    args: Any,
    step: int,
    modules: Mapping[str, nn.Module],
    engine: Any,
    *,
    carried: bool,
    resume_from: str | None = None,
) -> tuple[dict[str, torch.Tensor] | None, int, float]:
    """Where a run that starts at ``step`` (``state.global_step``) stands.

    Returns:
        ``(masks, last_update_step, update_seconds_total)``: at step 0 ``(None, 0, 0.0)``; when resuming, the
        checkpoint's masks (or None: keep the model's, see :func:`find_state`) and the restored progress, with
        the engine's state loaded (:func:`restore_progress`).
    """
    if step <= 0:
        return None, 0, 0.0
    found = find_state(args, step, modules, engine, carried=carried, resume_from=resume_from)
    last_update_step, seconds = restore_progress(engine, found[1] if found else None, step)
    return (found[0] if found else None), last_update_step, seconds


def restore_progress(engine: Any, scalar: Mapping[str, Any] | None, step: int) -> tuple[int, float]:
    """Load the engine's saved state; ``(last_update_step, update_seconds_total)`` of the resumed run.

    Without a saved state (``scalar`` None) the engine keeps its fresh state and the last update is the one
    the schedule puts at or before ``step``. A saved config that differs from the run's is logged.
    """
    config = engine.config
    if scalar is None:
        return last_update_before(config, engine.last_update, step), 0.0
    saved = _resolved(scalar.get("config"))
    now = config.to_dict(resolved=True)
    if saved and saved != now:
        changed = sorted(k for k, v in saved.items() if now.get(k) != v)
        logger.warning("hf_chts: resuming with a changed sparse-training config (fields %s).", changed)
    engine.load_state_dict(scalar.get("engine", {}))
    last = int(scalar.get("last_update_step", last_update_before(config, engine.last_update, step)))
    return last, float(scalar.get("update_seconds_total", 0.0))


# ------------------------------------------------------------------------------------------ resume checks
def check_resume_state(
    masks: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    source: str,
    trainer_step: int,
    expected_nnz: Mapping[str, int],
    model_masks: Mapping[str, torch.Tensor] | None = None,
    model_source: str = "",
    early_stop: bool = True,
    state_source: str | None = None,
) -> None:
    """Refuse a sparse state that would not continue the run it claims to continue.

    Args:
        masks: the masks to resume with (``{layer name: bool mask}``).
        state: the scalar state saved with them (``step`` is checked when present).
        source (`str`): the file they come from, for the messages.
        trainer_step (`int`): ``state.global_step`` of the resuming Trainer.
        expected_nnz: the number of links each layer holds at ``trainer_step`` under the run's schedule.
        model_masks: the masks stored in the same checkpoint's model weights, when it has any.
        model_source (`str`): the file of ``model_masks``.
        early_stop (`bool`, defaults to `True`): whether the run's config lets layers freeze
            (``early_stop_threshold`` set); without it ``engine.frozen`` must be empty.
        state_source (`str`, *optional*): the file ``state`` comes from, when not ``source``.

    Raises:
        ValueError: naming the file, the numbers and the fix.
    """
    step = state.get("step")
    if step is not None and int(step) != int(trainer_step):
        raise ValueError(
            f"The sparse state {source} was saved at step {step}, but the Trainer resumes at step "
            f"{trainer_step}: the masks would not continue this run. Resume the Trainer from the checkpoint "
            f"that holds this state (checkpoint-{step}), or give CHTssCallback the state of "
            f"checkpoint-{trainer_step} (or none: it reads the folder the Trainer resumes from)."
        )
    _check_scalars(state, state_source or source, trainer_step, set(expected_nnz), early_stop)
    for name, target in expected_nnz.items():
        nnz = int(masks[name].sum())
        if nnz != target:
            raise ValueError(
                f"The sparse state {source} gives layer {name!r} {nnz} links where the schedule expects "
                f"{target} at step {trainer_step} (mask size {masks[name].numel()}): it was written by "
                "another run or config, or edited. Resume with the sparse-training config the checkpoint "
                "was trained with, from an unmodified checkpoint."
            )
    if model_masks:
        for name, mask in masks.items():
            other = model_masks.get(name)
            if other is None:
                continue
            if tuple(other.shape) != tuple(mask.shape) or not torch.equal(
                other.to(torch.bool).cpu(), mask.to(torch.bool).cpu()
            ):
                raise ValueError(
                    f"The masks of layer {name!r} in {source} differ from those in {model_source} (the model "
                    "weights of the same checkpoint): one of the two files was replaced. Restore the "
                    "checkpoint, or delete hf_chts_state/ to resume from the masks in the model weights."
                )


def _check_scalars(
    state: Mapping[str, Any], source: str, trainer_step: int, layers: set[str], early_stop: bool
) -> None:
    """Refuse scalar state that no run writes: a frozen layer the config cannot freeze, steps or seconds out
    of range (a consistent hand edit passes the link counts, so the scalars are checked on their own)."""
    fix = (
        "It was edited or written by another run: resume from an unmodified checkpoint "
        "(hf_chts.last_complete_checkpoint), with the sparse-training config it was trained with."
    )
    frozen = list((state.get("engine") or {}).get("frozen", []))
    unknown = sorted(set(frozen) - layers) if layers else []
    if unknown:
        raise ValueError(f"{source}: `engine.frozen` names layers this model has not: {unknown[:4]}. {fix}")
    if frozen and not early_stop:
        raise ValueError(
            f"{source}: `engine.frozen` lists {len(frozen)} layers (e.g. {frozen[0]!r}), but the "
            f"run's config has early_stop_threshold=None, so no layer can have been frozen. {fix}"
        )
    last = state.get("last_update_step")
    if last is not None and not 0 <= int(last) <= int(trainer_step):
        raise ValueError(f"{source}: `last_update_step` is {last}, outside [0, {trainer_step}]. {fix}")
    seconds = state.get("update_seconds_total")
    if seconds is not None and not (math.isfinite(float(seconds)) and float(seconds) >= 0):
        raise ValueError(f"{source}: `update_seconds_total` is {seconds}, not a finite number >= 0. {fix}")


def find_resume_state(
    candidates: list[str],
    *,
    trainer_step: int,
    shapes: Mapping[str, tuple[int, ...]],
    expected_nnz: Mapping[str, int],
    early_stop: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str] | None:
    """The validated masks and scalar state to resume from, read from the first usable candidate folder.

    A candidate with ``hf_chts_state/`` is read from there (and its masks compared with those in the same
    checkpoint's model weights, when the weights carry masks). A candidate without it, whose model weights
    carry the masks, is resumed from those masks and the scalar state the Trainer stored in
    ``trainer_state.json``. Candidates with neither are skipped.

    Args:
        candidates: checkpoint folders, in order of preference.
        trainer_step (`int`): the step the Trainer resumes at.
        shapes: ``{layer name: weight shape}`` of the model's sparse layers.
        expected_nnz: ``{layer name: links}`` the schedule gives each layer at ``trainer_step``.
        early_stop (`bool`, defaults to `True`): whether the run's config lets layers freeze.

    Returns:
        ``(masks, state, source file)``, or ``None`` when no candidate holds masks.

    Raises:
        ValueError: see :func:`load_sparse_state` and :func:`check_resume_state`.
    """
    for path in candidates:
        if not os.path.isdir(path):
            continue
        folder = os.path.join(path, STATE_DIR)
        has_state = os.path.isfile(os.path.join(folder, MASKS_FILE)) or os.path.isfile(
            os.path.join(folder, STATE_FILE)
        )
        problem = sparse_state_complete(path)
        weight_files = model_weight_files(path)
        model_masks = masks_in_model_weights(path)
        model_source = weight_files[0] if weight_files else ""
        if problem is None or (has_state and not model_masks):
            masks, state = load_sparse_state(path)  # raises with the file and the fix when broken
            source = os.path.join(folder, MASKS_FILE)
            state_source = os.path.join(folder, STATE_FILE)
        elif model_masks:
            if has_state:
                logger.warning(
                    "hf_chts: the sparse state in %s is incomplete (%s); resuming from the masks in %s.",
                    folder,
                    problem,
                    model_source,
                )
            masks, source = dict(model_masks), model_source
            state = dict(trainer_callback_state(path) or {})
            state_source = os.path.join(path, TRAINER_STATE_FILE)
            model_masks = {}
        else:
            continue
        expected = set(shapes)
        if set(masks) != expected:
            missing, extra = sorted(expected - set(masks)), sorted(set(masks) - expected)
            raise ValueError(
                f"Masks in {source} do not match the sparse layers: missing {missing[:4]}, unexpected "
                f"{extra[:4]}. Resume with the same model and target_modules/exclude_modules as the "
                "checkpoint."
            )
        for name, shape in shapes.items():
            mask = masks[name]
            if tuple(mask.shape) != tuple(shape) or mask.dtype != torch.bool:
                raise ValueError(
                    f"Checkpoint mask of layer {name!r} in {path!r} has shape {tuple(mask.shape)} and dtype "
                    f"{mask.dtype}; expected {tuple(shape)} and torch.bool. The checkpoint was "
                    "written for another model; resume with the model it was trained with."
                )
        check_resume_state(
            masks,
            state,
            source=source,
            trainer_step=trainer_step,
            expected_nnz=expected_nnz,
            model_masks=model_masks,
            model_source=model_source,
            early_stop=early_stop,
            state_source=state_source,
        )
        return masks, state, source
    return None


def _resolved(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Every field of a saved config dict as its value (older checkpoints saved them resolved already)."""
    if not config:
        return None
    try:
        return SparseTrainingConfig.from_dict(dict(config)).to_dict(resolved=True)
    except ValueError:
        return dict(config)
