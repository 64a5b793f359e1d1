"""``GradientAccumulationScheduler``: the accumulation factor by epoch (Lightning's)."""
from __future__ import annotations

import warnings

from raytrainer.callbacks.base import Callback
from raytrainer.module import Module, is_overridden


class GradientAccumulationScheduler(Callback):
    """``scheduling={epoch: k}``: from that (zero-based) epoch on, gradients of ``k`` batches are
    accumulated per optimizer step; epochs before the first key accumulate 1. Set at every
    epoch's start, so a resumed run picks the factor of the epoch it resumes in."""

    def __init__(self, scheduling: dict[int, int]):
        if not scheduling:
            raise TypeError("GradientAccumulationScheduler(scheduling={}): give {epoch: factor}, e.g. {4: 2}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in scheduling):
            raise ValueError(f"GradientAccumulationScheduler: epochs are ints >= 0, got {list(scheduling)}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in scheduling.values()):
            raise ValueError(f"GradientAccumulationScheduler: factors are ints >= 1, got {list(scheduling.values())}")
        self.scheduling = {0: 1, **scheduling}

    def get_accumulate_grad_batches(self, epoch: int) -> int:
        return self.scheduling[max(e for e in self.scheduling if e <= epoch)]

    def on_train_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("GradientAccumulationScheduler needs automatic optimization: a module that steps its "
                               "own optimizers accumulates as it likes")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("You have set `accumulate_grad_batches` and are using the `GradientAccumulationScheduler` "
                             "callback. Either remove `accumulate_grad_batches` from the Trainer or remove the callback.")
        if any(k > 1 for k in self.scheduling.values()) and any(
                is_overridden(hook, pl_module, Module) for hook in ("optimizer_step", "optimizer_zero_grad")):
            warnings.warn("When using `Trainer(accumulate_grad_batches != 1)` and overriding "
                          "`LightningModule.optimizer_{step,zero_grad}`, the hooks will not be called on every batch "
                          "(rather, they are called on every optimization step).")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        trainer.accumulate_grad_batches = self.get_accumulate_grad_batches(trainer.current_epoch)
