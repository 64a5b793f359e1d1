"""LearningRateMonitor: log each optimizer's learning rate (and momentum) to the loggers."""
from __future__ import annotations

from raytrainer.callbacks.base import Callback


class LearningRateMonitor(Callback):
    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False):
        if logging_interval not in (None, "step", "epoch"):
            raise ValueError(f"LearningRateMonitor(logging_interval={logging_interval!r}) is invalid: "
                             "expected None, 'step' or 'epoch'")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self._last_logged_step = -1

    def _values(self, trainer) -> dict[str, float]:
        out: dict[str, float] = {}
        opts = trainer.optimizers
        names = [type(o).__name__ for o in opts]
        for i, opt in enumerate(opts):
            base = f"lr-{names[i]}" + (f"-{i}" if names.count(names[i]) > 1 else "")
            groups = opt.param_groups
            for g, group in enumerate(groups):
                key = base if len(groups) == 1 else f"{base}/pg{g + 1}"
                out[key] = float(group["lr"])
                if self.log_momentum:
                    m = group.get("momentum", group.get("betas", (None,))[0])
                    if m is not None:
                        out[f"{key}-momentum"] = float(m)
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.logging_interval == "epoch" or step == self._last_logged_step:
            return
        if step % trainer.log_every_n_steps == 0 and step > 0:
            self._last_logged_step = step
            self._emit(trainer, step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.logging_interval == "epoch":
            self._emit(trainer, trainer.global_step)

    def _emit(self, trainer, step: int) -> None:
        values = self._values(trainer)
        for lg in trainer.loggers:
            lg.log_metrics(values, step)
