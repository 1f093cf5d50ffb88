"""`FinishedRunGuard`: a run resumed from its final checkpoint stays finished.

``transformers.Trainer`` resumed at ``global_step == max_steps`` still runs one optimizer step when
``max_steps`` is not a whole number of epochs (the resumed epoch is entered before the stop check), so each
resume of a finished run adds a step (20 -> 21 -> 22), changes the weights under a constant learning rate
and writes a new checkpoint. The guard turns that step into a no-op: learning rate 0 for it, no log, save or
evaluation after it, and ``global_step`` / ``epoch`` put back, so ``trainer_state.json`` still says 20.
Weights are unchanged; the optimizer's in-memory moments see one more gradient, but nothing is saved.

It must run after transformers' ``DefaultFlowCallback`` (which asks for the final save): pass it in
``callbacks=[...]`` or add it with ``trainer.add_callback``. ``CHTssCallback`` is a guard too (its ``attach``
places it right after ``DefaultFlowCallback``); a second guard beside it does no harm.

Example:

```python
>>> from transformers import TrainerControl, TrainerState
>>> guard, control = FinishedRunGuard(), TrainerControl()
>>> state = TrainerState(global_step=20, max_steps=20, epoch=0.5)
>>> guard.on_train_begin(None, state, control)
>>> state.global_step, control.should_save = 21, True  # the step Trainer takes anyway
>>> guard.on_step_end(None, state, control)
>>> state.global_step, control.should_save, control.should_training_stop
(20, False, True)
```
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .rewarmup import LearningRateScale

__all__ = ["FinishedRunGuard"]

logger = logging.getLogger(__name__)


class FinishedRunGuard(TrainerCallback):
    """Makes the step ``Trainer`` takes after resuming a finished run change nothing that is kept."""

    def __init__(self) -> None:
        self.finished_at: tuple[int, float | None] | None = None  # (global_step, epoch) when resumed finished
        self._zero_lr = LearningRateScale()  # its own: CHTssCallback keeps a second one for re-warmup

    def on_train_begin(self, args, state, control, **kwargs):
        """Note whether this run starts at or past ``max_steps`` (a finished checkpoint)."""
        self.finished_at = None
        if 0 < state.max_steps <= state.global_step:
            self.finished_at = (state.global_step, state.epoch)
            logger.warning(
                "hf_chts: resuming at step %d, but the run already finished (max_steps=%d); a step Trainer "
                "still takes runs at learning rate 0 and is not counted, logged or saved. Raise max_steps "
                "to continue training.",
                state.global_step,
                state.max_steps,
            )

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.finished_at is None or optimizer is None:
            return
        if any(group["lr"] for group in optimizer.param_groups):  # all 0: another guard scaled and restores
            self._zero_lr.scale_(optimizer, 0.0)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._zero_lr.restore_(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        """Put the step count back and cancel the final log, evaluation and save of the extra step."""
        if self.finished_at is not None:
            state.global_step, state.epoch = self.finished_at
            self._cancel(control)
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.finished_at is not None:
            self._cancel(control)

    def on_train_end(self, args, state, control, **kwargs):
        self.finished_at = None

    @staticmethod
    def _cancel(control) -> None:
        control.should_log = control.should_evaluate = control.should_save = False
