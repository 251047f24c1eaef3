"""Progress bar for step-bounded runs: `Step 12/125` instead of Lightning's `Epoch 0/-2` when `max_epochs=-1`.

Every stage here is bounded by `trainer.max_steps` (epochs are unbounded, `max_epochs: -1`), so the training bar
counts optimizer steps (`trainer.global_step`) against `max_steps`. Epoch-bounded runs keep Lightning's bar.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def _step_bounded(trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose training task reads `Step s/max_steps` in step-bounded runs."""

    @property
    def total_train_batches(self) -> int | float:
        if _step_bounded(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not _step_bounded(self.trainer):
            return super()._get_train_description(current_epoch)
        text = f"Step {self.trainer.global_step}/{self.trainer.max_steps}"
        return f"{text:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _step_bounded(trainer) and self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=description)


class StepTQDMProgressBar(TQDMProgressBar):
    """TQDM variant (when `rich` is not installed) with the same step count."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if _step_bounded(trainer):
            self.train_progress_bar.total = trainer.max_steps
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description(f"Step {trainer.global_step}/{trainer.max_steps}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _step_bounded(trainer) and self.train_progress_bar is not None:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description(f"Step {trainer.global_step}/{trainer.max_steps}", refresh=False)
            self.train_progress_bar.refresh()


def use_step_progress_bar(trainer) -> None:
    """Swap the trainer's progress bar, when it is exactly Lightning's class, for the step-counting subclass (its
    settings, e.g. `refresh_rate` or `theme`, are kept)."""
    swaps = {RichProgressBar: StepProgressBar, TQDMProgressBar: StepTQDMProgressBar}
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) in swaps:
            new = swaps[type(cb)].__new__(swaps[type(cb)])
            new.__dict__.update(cb.__dict__)
            trainer.callbacks[i] = new
