"""Callback base class and the event timeline.

Every event calls, in Lightning's order: each callback's hook (in the order given to the Trainer,
callbacks from ``configure_callbacks`` last), then the Module's hook, then the loggers (where the
event logs anything). One exception, Lightning's too: at a training epoch's end the callbacks
that decide on logged metrics (ModelCheckpoint, EarlyStopping: ``monitors_metrics``) run after
the Module's hook, so they see what it logged there. Loggers and the progress bar exist only on
global rank 0. tests/callbacks/test_callbacks.py checks the whole order against pytorch-lightning.

``fit`` runs these events, top to bottom::

    setup(stage="fit")                          datamodule.setup, callbacks, module.setup
    configure_model
    configure_optimizers; restore checkpoint    module.on_load_checkpoint before the weights load,
                                                callbacks' after (when resuming)
    on_fit_start
    on_sanity_check_start, [validation], on_sanity_check_end
                                                num_sanity_val_steps batches per loader, logged
                                                nowhere; not when resuming
    on_train_start
    for epoch in epochs:
        on_train_epoch_start
        for batch in the epoch's batches (resumed batches skipped by index, never replayed):
            on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer
            on_train_batch_start(batch, batch_idx)        returning -1 ends the epoch
            at the accumulation window's last batch (every k batches, and the epoch's last):
              module.optimizer_step(epoch, batch_idx, optimizer, closure) -> optimizer.step(closure):
            the closure (called directly inside a window):
                training_step
                on_before_zero_grad(optimizer); optimizer_zero_grad   window's first batch
                on_before_backward(loss) -> module.backward(loss) -> on_after_backward
            after the closure, at the window's last batch:
                on_before_optimizer_step(optimizer)        gradients are unscaled here
                configure_gradient_clipping; the update; lr_scheduler_step (step interval;
                at the epoch's last batch the epoch interval too; not ReduceLROnPlateau)
            on_train_batch_end(outputs, batch, batch_idx)
            loggers.log_metrics                            every log_every_n_steps steps
            [validation]                                   at val_check_interval; the epoch's
                                                           validation runs here, after its last batch
            ReduceLROnPlateau schedulers (step interval)   they may monitor the validation's metrics
            on_checkpoint_boundary                         ModelCheckpoint saves here
        on_train_epoch_end                                 epoch aggregates reduced; callbacks, module,
                                                           then ModelCheckpoint/EarlyStopping; also when
                                                           should_stop or max_steps ends the epoch early
        loggers.log_metrics(epoch aggregates)
        ReduceLROnPlateau schedulers (epoch interval)      after a complete epoch only
        on_checkpoint_boundary                             not after an epoch max_steps cut short: a
                                                           resume continues that epoch
    on_train_end
    on_fit_end
    teardown(stage="fit")

    validation = on_validation_start, on_validation_epoch_start,
                 {on_validation_batch_start, validation_step, on_validation_batch_end}*,
                 on_validation_epoch_end, loggers.log_metrics, on_validation_end

``on_checkpoint_boundary`` is raytrainer's one addition to Lightning's hooks: it runs where a run
resumed from a checkpoint continues exactly as the uninterrupted run would (after the step's
validation, after the epoch's end), so every checkpoint is taken there.

What a callback uses of the trainer is its public surface, as in Lightning (the built-in
callbacks use nothing else): the counters and metrics (``global_step``, ``current_epoch``,
``callback_metrics``, ``progress_bar_metrics``, ``num_training_batches``, ``num_val_batches``,
``state.fn``, ``should_stop``, ``loggers``, ``optimizers``, ...), ``trainer.strategy``
(``broadcast``, ``barrier``, ``reduce``, ``root_device``, ``world_size``) and, raytrainer's
own, ``trainer.checkpoint_boundary`` ("step" | "epoch" during on_checkpoint_boundary),
``trainer.boundary_checkpoint_path`` and ``trainer.save_checkpoint(after_commit=..., wait=False)``.
"""
from __future__ import annotations

from typing import Any


class Callback:
    """Subclass and override the hooks you need; every hook is a no-op here."""

    # Decides on logged metrics (ModelCheckpoint, EarlyStopping): at a training epoch's end it
    # runs after the module's on_train_epoch_end, so it sees what the module logged there.
    monitors_metrics = False

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint (class name plus distinguishing args)."""
        return type(self).__qualname__

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def setup(self, trainer, pl_module, stage: str) -> None: ...
    def teardown(self, trainer, pl_module, stage: str) -> None: ...
    def on_fit_start(self, trainer, pl_module) -> None: ...
    def on_sanity_check_start(self, trainer, pl_module) -> None: ...
    def on_sanity_check_end(self, trainer, pl_module) -> None: ...
    def on_fit_end(self, trainer, pl_module) -> None: ...
    def on_train_start(self, trainer, pl_module) -> None: ...
    def on_train_end(self, trainer, pl_module) -> None: ...
    def on_train_epoch_start(self, trainer, pl_module) -> None: ...
    def on_train_epoch_end(self, trainer, pl_module) -> None: ...
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self, trainer, pl_module) -> None: ...
    def on_validation_end(self, trainer, pl_module) -> None: ...
    def on_validation_epoch_start(self, trainer, pl_module) -> None: ...
    def on_validation_epoch_end(self, trainer, pl_module) -> None: ...
    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_start(self, trainer, pl_module) -> None: ...
    def on_test_end(self, trainer, pl_module) -> None: ...
    def on_test_epoch_start(self, trainer, pl_module) -> None: ...
    def on_test_epoch_end(self, trainer, pl_module) -> None: ...
    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_start(self, trainer, pl_module) -> None: ...
    def on_predict_end(self, trainer, pl_module) -> None: ...
    def on_predict_epoch_start(self, trainer, pl_module) -> None: ...
    def on_predict_epoch_end(self, trainer, pl_module) -> None: ...
    def on_predict_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_before_backward(self, trainer, pl_module, loss) -> None: ...
    def on_after_backward(self, trainer, pl_module) -> None: ...
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None: ...
    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None: ...
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None: ...
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None: ...
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None: ...
    def on_checkpoint_boundary(self, trainer, pl_module) -> None: ...
