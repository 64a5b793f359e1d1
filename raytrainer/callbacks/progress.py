"""ProgressBar (tqdm): one bar per training epoch, on global rank 0 only.

Metrics shown on the bar are read from the device only on logging steps and at epoch ends, so the
bar adds no host sync to the other steps.
"""
from __future__ import annotations

import math
import sys

from raytrainer.callbacks.base import Callback


class ProgressBar(Callback):
    rank_zero_only = True  # the Run drops it on other ranks

    def __init__(self, leave: bool = True):
        self.leave = leave
        self._bar = None
        self._every = 1
        self._shown_step = -1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm
        run = trainer._run
        total = None if math.isinf(run.num_training_batches) else int(run.num_training_batches)
        self._bar = tqdm(total=total, initial=run.batches_done, desc=f"Epoch {run.current_epoch}",
                         leave=self.leave, file=sys.stderr, dynamic_ncols=True, mininterval=0.2)
        self._every = trainer.log_every_n_steps  # read here, not through properties every batch
        self._shown_step = run.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        # The loop's logging steps only: a step that just became a multiple of log_every_n_steps
        # (not every micro-batch of an accumulation window that leaves global_step there).
        step = trainer._run.global_step
        if step != self._shown_step and step % self._every == 0:
            self._shown_step = step
            self._bar.set_postfix(_fmt(trainer._run.metrics.progress_bar_metrics()), refresh=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.set_postfix(_fmt(trainer._run.metrics.progress_bar_metrics()), refresh=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(trainer)

    def _close(self, trainer) -> None:
        if self._bar is not None:
            self._bar.set_postfix(_fmt(trainer._run.metrics.progress_bar_metrics()), refresh=False)
            self._bar.close()
            self._bar = None

    def __getstate__(self):
        return {**self.__dict__, "_bar": None}


def _fmt(metrics: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items()}
