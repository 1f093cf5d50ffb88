"""`CHTssCallback`: dynamic sparse training inside a plain ``transformers.Trainer``.

The callback maps Trainer events to the modules that do the work and holds nothing else: the run's config
(:func:`hf_chts.config.config_for_run`), sparse layers and initial masks (:mod:`hf_chts.sparsify`), the
resumed state (:mod:`hf_chts.resume`), learning-rate re-warmup (:mod:`hf_chts.rewarmup`), the sharded
topology update and its log figures (:mod:`hf_chts.update`), re-masking for optimizers not known to keep
masked weights at 0.0 (:func:`hf_chts.masking.remask_every_step`), a finished run resumed as finished
(:mod:`hf_chts.finished_run`).

Step semantics: optimizer steps are counted from 1. "The update at step t" runs after the t-th call of
``optimizer.step()`` (``t = state.global_step + 1`` inside ``on_optimizer_step``), for every t with
``engine.should_update(t)``; checkpoint ``checkpoint-t`` already has the topology of the update at step t.
Masked gradients are exactly 0 from backward, so they stay out of the clipping norm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn
from transformers import DefaultFlowCallback
from transformers.trainer_callback import ExportableState

from . import resume
from .chains import as_chain_specs, chains_to_json, resolve_chains
from .checkpointing import STATE_DIR, load_sparse_state, save_sparse_state
from .config import SparseTrainingConfig, config_for_run
from .distributed import Collectives
from .engine import TopologyEngine
from .finished_run import FinishedRunGuard
from .masking import (
    apply_masks_,
    keep_masks_out_of_ddp_,
    layer_mask,
    layer_view_shape,
    remask_every_step,
    set_compute_,
    set_grad_capture_,
    unwrap_model,
    zero_optimizer_state_,
)
from .peft_utils import callback_modules, is_peft_model
from .rewarmup import LearningRateScale, rewarmup_factor
from .sparsify import compute_blocker, run_modules, set_carried_compute_, start_masks_
from .update import topology_update

logger = logging.getLogger(__name__)

LOG_PREFIX = "sparsity/"

__all__ = ["CHTssCallback", "STATE_DIR", "load_sparse_state", "save_sparse_state"]


# ------------------------------------------------------------------------------ callback
class CHTssCallback(FinishedRunGuard, ExportableState):
    """Dynamic sparse training (CHTs, CHTss, SET, RigL, MEST, GraNet, CHT, static) in a ``Trainer``.

    Args:
        config (`SparseTrainingConfig` or `dict`, *optional*): the method and its settings; a dict goes to
            ``SparseTrainingConfig.from_dict``. Default: ``SparseTrainingConfig(**config_kwargs)``.
        log_per_layer (`bool`, *optional*, defaults to `False`): also log each layer's density, turnover and
            active-neuron fractions at update steps (~900 keys per line for a 7B model; global: always).
        chains (`Sequence` or `Callable`, *optional*): chain specs for chain removal
            (``LayerChain`` / ``LlamaBlockChain``), or a function ``(model, layer_names) -> chains``. Default:
            the chains the model declares (:mod:`hf_chts.chains`; LLaMA blocks are registered), else none
            (a warning says so).
        resume_from (`str`, *optional*): checkpoint folder to restore the sparse state from. By default it is
            found from the Trainer's public surface: ``args.resume_from_checkpoint`` when it is a path, else
            ``<args.output_dir>/checkpoint-<state.global_step>``.
        csti_inputs (*optional*): calibration inputs (samples x n_features, e.g. flattened training
            images) for ``init="csti"``; default: the file named by ``config.csti_inputs``.
        **config_kwargs: fields of ``SparseTrainingConfig`` (``method="chtss", density=0.3, ...``); with
            ``config`` they override its fields.

    Logged keys (prefix ``sparsity/``): ``density`` (global, every log), and after an update
    ``links_removed``, ``links_regrown``, ``chain_removed``, ``turnover``, ``active_neurons``,
    ``drop_fraction``, ``temperature``, ``update_seconds`` (wall time of the last update, sync included),
    ``engine_seconds``, ``update_seconds_total``, ``update_step``, and per layer ``<name>/density``,
    ``<name>/active_out``, ``<name>/active_in``, ``<name>/turnover``.

    Checkpoints: ``state()``, which the Trainer calls while it saves, writes ``<checkpoint>/hf_chts_state/``
    (``masks.safetensors`` + ``state.json``, main process only); ``on_train_begin`` restores it on resume.

    Distributed: every rank keeps identical masks; the update is sharded over ranks (:mod:`hf_chts.update`,
    :mod:`hf_chts.distributed`). Under FSDP2 the full weights are gathered for the update.

    Loggers: ``Trainer`` runs its ``report_to`` integrations before the callbacks given as ``callbacks=``;
    add it with :meth:`attach` (``CHTssCallback(...).attach(trainer)``) so they see its keys.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from hf_chts import CHTssCallback, SparseTrainingConfig
    >>> callback = CHTssCallback(SparseTrainingConfig(method="chtss", density=0.3, update_interval=100))
    >>> trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=ds)
    >>> callback.attach(trainer).config.method
    'chtss'
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        config: SparseTrainingConfig | Mapping[str, Any] | None = None,
        *,
        log_per_layer: bool = False,
        chains: Sequence[Any] | Callable[[nn.Module, list[str]], Sequence[Any]] | None = None,
        resume_from: str | None = None,
        csti_inputs: Any = None,
        **config_kwargs: Any,
    ) -> None:
        super().__init__()  # FinishedRunGuard: a resumed finished run stays finished
        # One sparsity config per run: without one, the model's `config.sparsity` is adopted at train begin.
        self._config_given = config is not None or bool(config_kwargs)
        self.config = SparseTrainingConfig.coerce(config, **config_kwargs)
        self.log_per_layer = bool(log_per_layer)
        self.chains = as_chain_specs(chains)  # rebuilt from `state()` by transformers on resume
        self.resume_from = resume_from
        self.csti_inputs = csti_inputs  # calibration inputs of init="csti" (samples x n_features)
        self.engine: TopologyEngine | None = None
        self.modules: dict[str, nn.Module] = {}
        self.update_seconds_total = 0.0
        self.last_update_step = 0
        self.last_stats = None
        self.owned_layers: list[str] = []  # layers this rank computed at the last update
        self._pending_logs: dict[str, float] = {}
        self._density = 1.0
        self._grads: dict[str, Any] | None = None
        self._lr_scale = LearningRateScale()
        self._remask_every_step: bool | None = None  # decided from the optimizer (config.remask)
        self._exported: dict[str, Any] | None = None  # set by transformers when it restores callback states
        self._trainer_refs: tuple[Any, Any] | None = None  # (args, state) of the running Trainer
        self._saved_step: int | None = None
        self._collectives: Collectives | None = None  # created in on_train_begin, on every rank
        self._attached = False

    # ------------------------------------------------------------------ ExportableState (JSON, never pickle)
    def state(self) -> dict[str, Any]:
        """JSON state stored by the Trainer in ``trainer_state.json`` (masks go to ``hf_chts_state/``)."""
        step = None
        if self._trainer_refs is not None and self.engine is not None:
            # The Trainer calls `state()` while it saves a checkpoint: after the model weights and the
            # optimizer, before trainer_state.json and before deleting older checkpoints. Writing the sparse
            # state here means no checkpoint ever has a trainer_state.json without it.
            args, trainer_state = self._trainer_refs
            step = trainer_state.global_step
            self._write_sparse_state(args, trainer_state)
        chains = chains_to_json(self.engine.chains if self.engine is not None else self.chains)
        init = {"config": self.config.to_dict(), "log_per_layer": self.log_per_layer, "chains": chains}
        return {"args": init, "attributes": {"_exported": self._scalar_state(step)}}

    def _scalar_state(self, step: int | None) -> dict[str, Any]:
        progress = (self.last_update_step, self.update_seconds_total)
        return resume.scalar_state(self.config, self.engine, self.modules, step, *progress)

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Before the Trainer wraps the model: carried masks out of DDP's broadcast, layers on ``compute``."""
        if model is not None:
            keep_masks_out_of_ddp_(model)
            config = config_for_run(unwrap_model(model), self.config, given=self._config_given)
            set_carried_compute_(unwrap_model(model), config, args, optimizer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Config, sparse layers, engine for ``state.max_steps`` steps, masks (the checkpoint's on resume)."""
        if model is None:
            raise ValueError("CHTssCallback needs the model; it is passed by transformers.Trainer.")
        resume.claim_output_dir(args)  # one writer per output_dir; raises while another holds it
        super().on_train_begin(args, state, control)
        self._trainer_refs = (args, state)
        self._collectives = Collectives(getattr(args, "ddp_timeout", None))  # every rank creates its group
        if getattr(args, "report_to", None) and not self._attached:
            logger.warning(
                "hf_chts: the report_to integrations %s run before callbacks passed as `callbacks=` and do "
                "not see the sparsity/ keys; add the callback with `CHTssCallback(...).attach(trainer)`.",
                args.report_to,
            )
        model = unwrap_model(model)
        self.config = config_for_run(model, self.config, given=self._config_given)
        self.config.check_against_steps(int(state.max_steps))
        self.modules, carried = run_modules(model, self.config)
        if is_peft_model(model):  # frozen base layers are never evolved (docs/peft.md)
            self.modules = callback_modules(model, self.modules, carried)
            if not self.modules:
                return
        self.engine = TopologyEngine(
            self.config,
            {name: layer_view_shape(m) for name, m in self.modules.items()},
            chains=resolve_chains(model, list(self.modules), self.chains, enabled=self.config.chain_removal),
            max_steps=int(state.max_steps),
            csti_inputs=self.csti_inputs,
        )
        masks, self.last_update_step, self.update_seconds_total = resume.resume_point(
            args, state.global_step, self.modules, self.engine, carried=carried, resume_from=self.resume_from
        )
        fresh = state.global_step == 0
        self._density = start_masks_(
            model, self.modules, self.engine, self._collectives, carried=carried, masks=masks, fresh=fresh
        )
        # layers masked just now switch with the optimizer's references (carried ones switched at init end)
        blocker = compute_blocker(args, drawn_after_wrap=self._collectives.world > 1 and not carried)
        set_compute_(self.modules, self.config.compute, optimizer=optimizer, blocker=blocker)
        self._remask_every_step = None
        if optimizer is not None:
            zero_optimizer_state_(optimizer, self.modules)
            self._remask_every_step = remask_every_step(self.config.remask, optimizer)
        self._pending_logs = {}

    def on_step_begin(self, args, state, control, **kwargs):
        """Before the step that precedes an update: capture the dense gradient if the method reads it."""
        if self.engine is None:
            return
        if self.config.needs_dense_gradient and self.engine.should_update(state.global_step + 1):
            self._grads = {}
            set_grad_capture_(self.modules, self._grads)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Re-warm the learning rate for this step, after an update (``rewarmup_steps``)."""
        super().on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        if self.engine is not None and self.finished_at is None:
            factor = rewarmup_factor(state.global_step + 1, self.last_update_step, self.config.rewarmup_steps)
            self._lr_scale.scale_(optimizer, factor)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Restore the learning rate; re-mask if the optimizer needs it; evolve the topology at updates."""
        super().on_optimizer_step(args, state, control, optimizer=optimizer)
        if self.engine is None:
            return
        self._lr_scale.restore_(optimizer)
        step = state.global_step + 1
        if self._remask_every_step is None:
            self._remask_every_step = remask_every_step(self.config.remask, optimizer)
        if self._remask_every_step:
            apply_masks_(self.modules)
        if self.engine.should_update(step):
            self._update(step, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the sparsity figures to ``logs`` and to the entry ``Trainer.log`` just put in the history."""
        if self.engine is None or logs is None:
            return
        extra = {f"{LOG_PREFIX}density": self._density, **self._pending_logs}
        self._pending_logs = {}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        """Write ``hf_chts_state/`` unless ``state()`` did during the save (Trainers that do not call it)."""
        if self.engine is not None and state.is_world_process_zero and self._saved_step != state.global_step:
            self._write_sparse_state(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        """Stop any gradient capture; release the output folder."""
        resume.release_output_dir(args)
        super().on_train_end(args, state, control)
        if self.modules:
            set_grad_capture_(self.modules, None)
        self._grads = None

    # ------------------------------------------------------------------ what the events delegate
    def _write_sparse_state(self, args, state) -> None:
        masks = {name: layer_mask(m) for name, m in self.modules.items()}
        if resume.write_state(args, state, masks, self._scalar_state(state.global_step)):
            self._saved_step = state.global_step

    def _update(self, step: int, optimizer) -> None:
        captured, self._grads = self._grads, None
        if self.config.needs_dense_gradient:
            set_grad_capture_(self.modules, None)
        result = topology_update(
            self.engine,
            self.modules,
            step,
            collectives=self._collectives,
            optimizer=optimizer,
            captured=captured,
        )
        self.update_seconds_total += result.seconds
        self.last_update_step, self.last_stats, self._density = step, result.stats, result.density
        self.owned_layers = result.owned_layers
        self._pending_logs = result.log_dict(LOG_PREFIX, self.log_per_layer, self.update_seconds_total)

    def attach(self, trainer) -> CHTssCallback:
        """Add this callback to ``trainer`` right after ``DefaultFlowCallback`` (the finished-run guard
        cancels its save requests) and ahead of the ``report_to`` loggers (so they see its keys).

        ``trainer.callback_handler.callbacks`` is the list the Trainer dispatches events from, in order.
        """
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        flow = [i for i, cb in enumerate(handler.callbacks) if isinstance(cb, DefaultFlowCallback)]
        handler.callbacks.insert(flow[-1] + 1 if flow else 0, self)
        self._attached = True
        return self
