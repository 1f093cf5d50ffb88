"""`CHTssCallback`: dynamic sparse training inside a plain ``transformers.Trainer``.

The callback is thin glue between Trainer events and :class:`hf_chts.engine.TopologyEngine`:

- ``on_train_begin``: sparsify the model (unless it already carries ``weight_mask`` buffers), build the engine
  for ``state.max_steps`` optimizer steps (so gradient accumulation and the number of processes never need
  hand arithmetic), restore the sparse state when the Trainer resumes from a checkpoint.
- ``on_step_begin``: on the optimizer step that precedes an update, and only then, start capturing the dense
  gradient of the effective weights when the method reads it (RigL / GraNet regrowth, MEST removal).
- ``on_pre_optimizer_step``: optional learning-rate re-warmup after an update (``rewarmup_steps``).
- ``on_optimizer_step`` (transformers runs it right after ``optimizer.step()``, before the scheduler step,
  ``zero_grad`` and ``state.global_step += 1``): on update steps evolve the topology, zero new and removed
  weights and their optimizer state. Between updates nothing is needed: the gradient is masked in backward
  and the optimizer state is 0 at masked positions, so the usual optimizers leave masked weights at exactly
  0.0 (``hf_chts.masking.ZERO_PRESERVING_OPTIMIZERS``); for any other optimizer (or ``remask="every_step"``)
  the masked weights are zeroed again after every step (two foreach ops).
- ``on_log``: add the sparsity figures to the Trainer's logs; ``on_save``: write ``hf_chts_state/``.

Step semantics: optimizer steps are counted from 1. "The update at step t" runs after the t-th call of
``optimizer.step()`` (``t = state.global_step + 1`` inside ``on_optimizer_step``), for every t with
``engine.should_update(t)`` (``t % update_interval == 0`` and ``t <= t_end``); the model saved at checkpoint
``checkpoint-t`` already has the topology of the update at step t.

Gradient clipping runs before ``on_pre_optimizer_step``, so a callback cannot keep masked gradients out of
the clipping norm; the masked modules do (the gradient at a masked position is exactly 0 from backward).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState

from .chains import chains_for, chains_from_json, chains_to_json
from .checkpointing import (
    FORMAT_VERSION,
    STATE_DIR,
    find_resume_state,
    load_sparse_state,
    save_sparse_state,
)
from .config import SparseTrainingConfig
from .distributed import Collectives
from .distributed import is_dtensor as _is_dtensor
from .masking import (
    MASK_NAME,
    apply_masks_,
    find_sparse_modules,
    from_layer_view,
    install_grad_masks_,
    is_masked,
    keeps_masked_weights_zero,
    layer_view,
    layer_view_shape,
    make_masked_,
    set_grad_capture_,
    unwrap_model,
    zero_optimizer_state_,
)
from .peft_utils import callback_modules, is_peft_model
from .sparsify import sparsify_
from .stats import global_density

logger = logging.getLogger(__name__)

LOG_PREFIX = "sparsity/"

__all__ = ["CHTssCallback", "STATE_DIR", "load_sparse_state", "save_sparse_state"]


# ------------------------------------------------------------------------------ callback
class CHTssCallback(TrainerCallback, ExportableState):
    """Dynamic sparse training (CHTs, CHTss, SET, RigL, MEST, GraNet, CHT, static) in a ``Trainer``.

    Args:
        config (`SparseTrainingConfig` or `dict`, *optional*): the method and its settings; a dict goes to
            ``SparseTrainingConfig.from_dict``. Default: ``SparseTrainingConfig(**config_kwargs)``.
        log_per_layer (`bool`, *optional*, defaults to `True`): also log each layer's density, turnover and
            active-neuron fractions at update steps (global figures are always logged).
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

    Checkpoints: ``on_save`` writes ``<checkpoint>/hf_chts_state/`` (``masks.safetensors`` + ``state.json``,
    main process only); ``on_train_begin`` restores it when training resumes.

    Distributed: every rank keeps identical masks. The engine's layer groups are sharded over ranks
    (group ``i`` on rank ``i % world_size``); each rank updates its groups and broadcasts the new masks.
    Under FSDP2 the full weights are gathered for the update and the masks re-applied shard by shard.

    Example:

    ```python
    >>> from transformers import Trainer, TrainingArguments
    >>> from hf_chts import CHTssCallback, SparseTrainingConfig
    >>> callback = CHTssCallback(SparseTrainingConfig(method="chtss", density=0.3, update_interval=100))
    >>> trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=ds, callbacks=[callback])
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        config: SparseTrainingConfig | Mapping[str, Any] | None = None,
        *,
        log_per_layer: bool = True,
        chains: Sequence[Any] | Callable[[nn.Module, list[str]], Sequence[Any]] | None = None,
        resume_from: str | None = None,
        csti_inputs: Any = None,
        **config_kwargs: Any,
    ) -> None:
        # One sparsity config per run: without one, the model's `config.sparsity` is adopted at train begin.
        self._config_given = config is not None or bool(config_kwargs)
        if config is None:
            config = SparseTrainingConfig(**config_kwargs)
        elif isinstance(config, Mapping):
            config = SparseTrainingConfig.from_dict({**dict(config), **config_kwargs})
        elif isinstance(config, SparseTrainingConfig):
            if config_kwargs:
                config = SparseTrainingConfig.from_dict({**config.to_dict(), **config_kwargs})
        else:
            raise ValueError(
                "`config` must be a SparseTrainingConfig or a dict of its fields, got "
                f"{type(config).__name__}."
            )
        self.config = config
        self.log_per_layer = bool(log_per_layer)
        if (
            isinstance(chains, Sequence)
            and not isinstance(chains, str)
            and chains
            and isinstance(chains[0], Mapping)
        ):
            chains = chains_from_json(chains)  # rebuilt from `state()` by transformers on resume
        self.chains = chains
        self.resume_from = resume_from
        self.csti_inputs = csti_inputs  # calibration inputs of init="csti" (samples x n_features)
        self.engine = None
        self.modules: dict[str, nn.Module] = {}
        self.update_seconds_total = 0.0
        self.last_update_step = 0
        self.last_stats = None
        self.owned_layers: list[str] = []  # layers this rank computed at the last update
        self._pending_logs: dict[str, float] = {}
        self._density = 1.0
        self._grads: dict[str, torch.Tensor] | None = None
        self._saved_lrs: list[float] | None = None
        self._remask_every_step: bool | None = None  # decided from the optimizer (config.remask)
        self._exported: dict[str, Any] | None = None  # set by transformers when it restores callback states
        self._trainer_refs: tuple[Any, Any] | None = None  # (args, state) of the running Trainer
        self._saved_step: int | None = None
        self._collectives: Collectives | None = None  # created in on_train_begin, on every rank

    # ------------------------------------------------------------------ ExportableState (JSON, never pickle)
    def state(self) -> dict[str, Any]:
        """JSON state stored by the Trainer in ``trainer_state.json`` (masks go to ``hf_chts_state/``)."""
        chains = self.engine.chains if self.engine is not None else self.chains
        step = None
        if self._trainer_refs is not None and self.engine is not None:
            # The Trainer calls `state()` while it saves a checkpoint: after the model weights and the
            # optimizer, before trainer_state.json and before deleting older checkpoints. Writing the sparse
            # state here means no checkpoint ever has a trainer_state.json without it.
            args, trainer_state = self._trainer_refs
            step = trainer_state.global_step
            self._write_sparse_state(args, trainer_state)
        return {
            "args": {
                "config": self.config.to_dict(),
                "log_per_layer": self.log_per_layer,
                # the resolved chain specs, so a callback rebuilt from this state keeps chain removal
                "chains": chains_to_json(chains),
            },
            "attributes": {"_exported": self._scalar_state(step)},
        }

    def _scalar_state(self, step: int | None) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "step": step,
            "config": self.config.to_dict(),
            "engine": self.engine.state_dict() if self.engine is not None else {},
            "layers": {name: list(layer_view_shape(m)) for name, m in self.modules.items()},
            "last_update_step": self.last_update_step,
            "update_seconds_total": self.update_seconds_total,
        }

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        self._move_before_loggers()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._move_before_loggers()
        if model is None:
            raise ValueError("CHTssCallback needs the model; it is passed by transformers.Trainer.")
        self._trainer_refs = (args, state)
        # every rank gets here; the collectives' own process group honours ddp_timeout
        self._collectives = Collectives(getattr(args, "ddp_timeout", None))
        model = unwrap_model(model)
        self._one_config_per_run(model)
        max_steps = int(state.max_steps)
        if max_steps <= 0:
            raise ValueError(
                f"state.max_steps={max_steps}: the Trainer does not know the number of optimizer steps; set "
                "`max_steps` in TrainingArguments (e.g. for an IterableDataset)."
            )
        self.config.check_against_steps(max_steps)
        resuming = state.global_step > 0
        carried = any(MASK_NAME in m._buffers for m in model.modules())
        if carried:
            self.modules = {n: m for n, m in model.named_modules() if MASK_NAME in m._buffers}
            for name, module in self.modules.items():
                if not is_masked(module):  # a buffer but a plain forward (e.g. loaded into nn.Linear)
                    make_masked_(module, name=name)
        else:
            self.modules = find_sparse_modules(model, self.config.target_modules, self.config.exclude_modules)
        if is_peft_model(model):  # frozen base layers are never evolved (docs/peft.md)
            self.modules = callback_modules(model, self.modules, carried)
            if not self.modules:
                return
        names = list(self.modules)
        shapes = {name: layer_view_shape(m) for name, m in self.modules.items()}
        from .engine import TopologyEngine

        self.engine = TopologyEngine(
            self.config,
            shapes,
            chains=self._resolve_chains(model, names),
            max_steps=max_steps,
            csti_inputs=self.csti_inputs,
        )
        device = _mask_device(next(iter(self.modules.values())))
        restored = self._load_resume_state(args, state, carried) if resuming else None
        if restored is not None:
            # Checkpoint masks go straight in: drawing initial masks first would zero weights the checkpoint
            # holds at positions that are links again by now.
            masks, scalar = restored
            if carried:
                for name, module in self.modules.items():
                    module._buffers[MASK_NAME].copy_(masks[name].to(module._buffers[MASK_NAME].device))
            else:
                sparsify_(model, self.config, masks=masks)
            self._load_scalar_state(scalar, state.global_step)
        elif not carried:
            init = self.engine.init_masks(device)
            sparsify_(
                model, self.config, masks={n: from_layer_view(m, init[n]) for n, m in self.modules.items()}
            )
        elif not resuming:
            self._check_carried_masks(device)
        if not resuming:
            self.last_update_step = 0
        elif restored is None:
            self.last_update_step = self._last_update_before(state.global_step)
        self._sync_masks_from_rank0()
        apply_masks_(self.modules)
        install_grad_masks_(self.modules)  # weights replaced since masking (e.g. loaded) get the hook back
        self._remask_every_step = None
        if optimizer is not None:
            zero_optimizer_state_(optimizer, self.modules)
            self._remask_every_step = self._resolve_remask(optimizer)
        self._density = self._global_density()
        self._pending_logs = {}
        logger.info(
            "hf_chts: %d sparse layers, method=%s, global density %.4f (target %.4f), update every %d steps "
            "until step %d of %d.",
            len(names),
            self.config.method,
            self._density,
            self.config.density,
            self.config.update_interval,
            self.engine.t_end,
            max_steps,
        )

    def on_step_begin(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        if self.config.needs_dense_gradient and self.engine.should_update(state.global_step + 1):
            self._grads = {}
            set_grad_capture_(self.modules, self._grads)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        k = self.config.rewarmup_steps
        if self.engine is None or k <= 0 or optimizer is None or self.last_update_step <= 0:
            return
        since = state.global_step + 1 - self.last_update_step
        if 1 <= since <= k:
            # Iterative warmup (docs/method.md section 8): freshly grown zero weights and reset optimizer
            # state meet a learning rate growing linearly from ~0; restored right after optimizer.step().
            factor = since / (k + 1)
            self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is None:
            return
        if self._saved_lrs is not None and optimizer is not None:
            for group, lr in zip(optimizer.param_groups, self._saved_lrs, strict=True):
                group["lr"] = lr
            self._saved_lrs = None
        step = state.global_step + 1
        if self._remask_every_step is None:
            self._remask_every_step = self._resolve_remask(optimizer)
        if self._remask_every_step:
            apply_masks_(self.modules)
        if self.engine.should_update(step):
            self._update(step, optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.engine is None or logs is None:
            return
        extra = {f"{LOG_PREFIX}density": self._density, **self._pending_logs}
        self._pending_logs = {}
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to the history just before this event.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        # Normally written already from `state()` during the save; this covers Trainers that do not call it.
        if self.engine is None or not state.is_world_process_zero:
            return
        if self._saved_step != state.global_step:
            self._write_sparse_state(args, state)

    def _write_sparse_state(self, args, state) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not getattr(args, "should_save", state.is_world_process_zero):
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(checkpoint):
            return  # not saving a checkpoint right now
        masks = {name: m._buffers[MASK_NAME] for name, m in self.modules.items()}
        save_sparse_state(checkpoint, masks, self._scalar_state(state.global_step))
        self._saved_step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        if self.modules:
            set_grad_capture_(self.modules, None)
        self._grads = None

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def _update(self, step: int, optimizer) -> None:
        start = time.perf_counter()
        rank, world = self._collectives.rank, self._collectives.world
        groups = self.engine.groups()
        owner = {name: i % world for i, group in enumerate(groups) for name in group}
        mine = [group for i, group in enumerate(groups) if i % world == rank]
        grads = self._take_grads(owner, rank, world)
        masks2d, weights2d = {}, {}
        for name, module in self.modules.items():
            weight = module.weight
            if _is_dtensor(weight):
                weight = weight.full_tensor()  # collective: every rank gathers every layer, in the same order
            if owner[name] != rank:
                continue
            # from_layer_view is a transpose for Conv1D, so it also maps the weight layout to (n_out, n_in)
            weights2d[name] = from_layer_view(module, weight.detach())
            masks2d[name] = layer_view(module)[1]  # the engine copies what it reads
        new_masks, grown, stats = self.engine.step(step, masks2d, weights2d, grads, groups=mine)
        self.owned_layers = [name for group in mine for name in group]
        new_w, grown_w = self._share_masks(new_masks, grown, owner, rank, world)
        # Nothing was written before the engine returned: a link removed and regrown in this update still
        # holds its weight, and only the positions in `grown` (absent before the update) are zeroed.
        for name, module in self.modules.items():
            module._buffers[MASK_NAME].copy_(new_w[name])
        apply_masks_(self.modules, extra_positions=grown_w)  # removed links and new links start at 0.0
        if optimizer is not None:
            zero_optimizer_state_(optimizer, self.modules, extra_positions=grown_w)
        stats = self._merge_across_ranks(stats, world)
        self.last_update_step = step
        self.last_stats = stats
        self._density = self._density_from(stats)
        seconds = time.perf_counter() - start
        self.update_seconds_total += seconds
        logs = stats.to_log_dict(prefix=LOG_PREFIX, per_layer=self.log_per_layer)
        logs[f"{LOG_PREFIX}engine_seconds"] = stats.seconds
        logs[f"{LOG_PREFIX}update_seconds"] = seconds
        logs[f"{LOG_PREFIX}update_seconds_total"] = self.update_seconds_total
        logs[f"{LOG_PREFIX}update_step"] = float(step)
        logs[f"{LOG_PREFIX}density"] = self._density
        self._pending_logs = logs

    def _share_masks(self, new_masks, grown, owner, rank, world):
        """Every rank's copy of the new masks and grown positions, in the modules' layouts.

        Under DDP each rank packs the masks of the layers it owns (bit 0: link, bit 1: grown) into one
        flat uint8 buffer, and one broadcast per rank shares them: ``world`` collectives per update, not
        one per layer.
        """
        if world == 1:
            new_w = {name: from_layer_view(m, new_masks[name]) for name, m in self.modules.items()}
            grown_w = {name: from_layer_view(m, grown[name]) for name, m in self.modules.items()}
            return new_w, grown_w
        new_w, grown_w = {}, {}
        for src in range(world):
            names = [name for name in self.modules if owner[name] == src]
            if not names:
                continue
            bufs = [self.modules[name]._buffers[MASK_NAME] for name in names]
            device = bufs[0].device
            if src == rank:
                packed = torch.cat(
                    [
                        from_layer_view(
                            self.modules[name],
                            new_masks[name].to(torch.uint8) + 2 * grown[name].to(torch.uint8),
                        )
                        .to(device)
                        .reshape(-1)
                        for name in names
                    ]
                )
            else:
                packed = torch.empty(sum(b.numel() for b in bufs), dtype=torch.uint8, device=device)
            what = f"mask broadcast of {names[0]} and the {len(names) - 1} other layers of rank {src}"
            self._collectives.broadcast(packed, src=src, what=what)
            offset = 0
            for name, buf in zip(names, bufs, strict=True):
                part = packed[offset : offset + buf.numel()].view(buf.shape)
                offset += buf.numel()
                new_w[name] = (part & 1).bool()
                grown_w[name] = (part >> 1).bool()
        return new_w, grown_w

    def _density_from(self, stats) -> float:
        """Global density after an update, from the engine's link counts (no read of the masks)."""
        layers = stats.layers
        if set(layers) != set(self.modules):
            return self._global_density()
        nnz = sum(layers[name].nnz for name in self.modules)
        numel = sum(m._buffers[MASK_NAME].numel() for m in self.modules.values())
        return nnz / numel if numel else 1.0

    def _take_grads(self, owner: dict[str, int], rank: int, world: int) -> dict[str, torch.Tensor] | None:
        """The dense gradients captured since ``on_step_begin``, summed over ranks onto each layer's owner."""
        if not self.config.needs_dense_gradient:
            return None
        captured = self._grads
        set_grad_capture_(self.modules, None)
        self._grads = None
        if not captured:
            logger.warning(
                "hf_chts: no dense gradient was captured before this update (was on_step_begin skipped?); "
                "using the masked gradient of the weights instead."
            )
            captured = {}
        out = {}
        for name, module in self.modules.items():
            grad = captured.get(name)
            if grad is None:
                pgrad = module.weight.grad
                if pgrad is not None and _is_dtensor(pgrad):
                    pgrad = pgrad.full_tensor()
                grad = (
                    pgrad.detach().float()
                    if pgrad is not None
                    else torch.zeros(module.weight.shape, device=_mask_device(module))
                )
            if world > 1:
                grad = grad.contiguous()
                self._collectives.reduce_sum(grad, dst=owner[name], what=f"gradient reduction of {name}")
                grad = grad / world
            if owner[name] == rank:
                out[name] = from_layer_view(module, grad)
        return out

    def _merge_across_ranks(self, stats, world: int):
        """Gather every rank's per-layer statistics (and the early-stop state) so all ranks agree."""
        if world == 1:
            return stats
        from .engine import LayerStats, StepStats

        payload = {"stats": stats.to_dict(), "frozen": sorted(self.engine.frozen)}
        gathered = self._collectives.all_gather_object(payload, what="gather of the update statistics")
        layers = {}
        for item in gathered:
            for name, layer in item["stats"]["layers"].items():
                layers[name] = LayerStats(**layer)
        frozen = set().union(*(set(item["frozen"]) for item in gathered))
        self.engine.load_state_dict({**self.engine.state_dict(), "frozen": sorted(frozen)})
        merged = StepStats(
            step=stats.step,
            drop_fraction=stats.drop_fraction,
            temperature=stats.temperature,
            seconds=max(item["stats"]["seconds"] for item in gathered),
        )
        merged.layers = {name: layers[name] for name in self.modules if name in layers}
        return merged

    # ------------------------------------------------------------------ setup helpers
    def _resolve_remask(self, optimizer) -> bool:
        """Whether masked weights must be zeroed after every optimizer step (``config.remask``)."""
        mode = self.config.remask
        if mode != "auto":
            return mode == "every_step"
        if optimizer is not None and keeps_masked_weights_zero(optimizer):
            return False
        inner = getattr(optimizer, "optimizer", optimizer)
        logger.info(
            "hf_chts: %s is not known to keep masked weights at 0.0; they are zeroed after every optimizer "
            "step (set remask='update_steps' to skip this if it does).",
            type(inner).__name__,
        )
        return True

    def _resolve_chains(self, model: nn.Module, names: list[str]) -> Sequence[Any]:
        if not self.config.chain_removal:
            return ()
        if self.chains is not None:
            return self.chains(model, names) if callable(self.chains) else list(self.chains)
        chains = chains_for(model, names)
        if chains is not None:
            return chains
        logger.warning(
            "hf_chts: chain_removal is on but %s declares no chains; pass `chains=[LayerChain([...]), ...]` "
            "to CHTssCallback, or `hf_chts.chains.register_chains(%s, factory)`. Training continues without.",
            type(model).__name__,
            type(model).__name__,
        )
        return ()

    def _one_config_per_run(self, model: nn.Module) -> None:
        """Adopt the model's ``config.sparsity`` when given no config; else write this one into the model.

        A model that records its sparse-training settings (``SparseLlamaForCausalLM``) and the callback then
        never disagree, and the saved checkpoint records the settings that trained it.
        """
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        model_config = getattr(base, "config", None)
        if model_config is None or not hasattr(model_config, "sparsity"):
            return
        if not self._config_given and model_config.sparsity:
            self.config = SparseTrainingConfig.from_dict(dict(model_config.sparsity))
            logger.info("hf_chts: training with the model's config.sparsity (method=%s).", self.config.method)
        else:
            model_config.sparsity = self.config.to_dict(resolved=True)

    def _check_carried_masks(self, device) -> None:
        """A fresh run (step 0) on a model that already has masks: redraw them unless they fit the schedule.

        A model that has not trained under this run yet carries masks drawn for another setting (its own
        ``config.sparsity``, or a dense all-True start); the run's schedule decides the step-0 topology.
        """
        mismatch = []
        for name, module in self.modules.items():
            nnz, target = int(module._buffers[MASK_NAME].sum()), self.engine.target_nnz(name, 0)
            if nnz != target:
                mismatch.append((name, nnz, target))
        if not mismatch:
            return
        init = self.engine.init_masks(device)
        for n, m in self.modules.items():
            m._buffers[MASK_NAME].copy_(from_layer_view(m, init[n]))
        name, nnz, target = mismatch[0]
        logger.warning(
            "hf_chts: the model's masks do not fit the step-0 schedule of %r (layer %r has %d links, "
            "expected %d); drew the initial topology of this run for %d layers.",
            self.config.method,
            name,
            nnz,
            target,
            len(self.modules),
        )

    def _load_resume_state(self, args, state, carried: bool):
        """Resuming at ``state.global_step``: the checkpoint's masks (validated) and scalar state, or None."""
        step = state.global_step
        tried = self._checkpoint_candidates(args, state)
        found = find_resume_state(
            tried,
            trainer_step=step,
            shapes={name: tuple(m.weight.shape) for name, m in self.modules.items()},
            expected_nnz={
                name: self.engine.target_nnz(name, self._last_update_before(step)) for name in self.modules
            },
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

    def _load_scalar_state(self, scalar: Mapping[str, Any], step: int) -> None:
        saved = _resolved(scalar.get("config"))
        now = self.config.to_dict(resolved=True)
        if saved and saved != now:
            changed = sorted(k for k, v in saved.items() if now.get(k) != v)
            logger.warning("hf_chts: resuming with a changed sparse-training config (fields %s).", changed)
        self.engine.load_state_dict(scalar.get("engine", {}))
        self.update_seconds_total = float(scalar.get("update_seconds_total", 0.0))
        self.last_update_step = int(scalar.get("last_update_step", self._last_update_before(step)))

    def _last_update_before(self, step: int) -> int:
        interval = self.config.update_interval
        last = min(step, self.engine.last_update) // interval * interval
        return last if self.config.is_dynamic else 0

    def _checkpoint_candidates(self, args, state) -> list[str]:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        candidates = []
        if self.resume_from:
            candidates.append(self.resume_from)
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return list(dict.fromkeys(candidates))

    def _sync_masks_from_rank0(self) -> None:
        """Masks are drawn from the same seed everywhere; broadcasting once makes identity certain."""
        if self._collectives.world == 1:
            return
        for module in self.modules.values():
            buf = module._buffers[MASK_NAME]
            packed = buf.to(torch.uint8)
            self._collectives.broadcast(packed, src=0, what="initial mask broadcast")
            buf.copy_(packed.bool())

    def _global_density(self) -> float:
        masks = [m._buffers[MASK_NAME] for m in self.modules.values()]
        return global_density((int(mask.sum()), mask.numel()) for mask in masks)

    def _move_before_loggers(self) -> None:
        """Run before the reporting integrations so they see the keys added in ``on_log``.

        ``Trainer`` puts ``report_to`` integrations before user callbacks and hands the same ``logs`` dict
        to each in turn. This moves the callback to the front of the ``CallbackHandler`` that is calling it
        (found on the call stack); the list keeps its length, so the event being dispatched still reaches
        every callback exactly once. If no handler is found, nothing changes (see :meth:`attach`).
        """
        frame = sys._getframe(1)
        for _ in range(4):
            if frame is None:
                return
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler):
                callbacks = handler.callbacks
                if self in callbacks and callbacks[0] is not self:
                    callbacks.remove(self)
                    callbacks.insert(0, self)
                return
            frame = frame.f_back

    def attach(self, trainer) -> CHTssCallback:
        """Add this callback to ``trainer`` ahead of every other callback (so loggers see its keys)."""
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        return self


def _resolved(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Every field of a saved config dict as its value (older checkpoints saved them resolved already)."""
    if not config:
        return None
    try:
        return SparseTrainingConfig.from_dict(dict(config)).to_dict(resolved=True)
    except ValueError:
        return dict(config)


def _mask_device(module: nn.Module) -> torch.device:
    buf = module._buffers.get(MASK_NAME)
    if buf is not None:
        return buf.device
    weight = module.weight
    return weight.to_local().device if _is_dtensor(weight) else weight.device
