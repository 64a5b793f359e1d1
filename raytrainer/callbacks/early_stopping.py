"""EarlyStopping: stop when a monitored metric stops improving.

The decision is a pure function of (state, new value) — ``EarlyStopping.decide`` — that the hook
applies; every rank takes rank 0's decision so workers stop together.
"""
from __future__ import annotations

import logging
import math

from raytrainer.callbacks.base import Callback

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    monitors_metrics = True  # after the module at a training epoch's end (Lightning)

    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, verbose: bool = False,
                 mode: str = "min", strict: bool = True, check_finite: bool = True,
                 stopping_threshold: float | None = None, divergence_threshold: float | None = None,
                 check_on_train_epoch_end: bool | None = None):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"EarlyStopping(monitor={monitor!r}) is invalid: expected a metric name")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping(mode={mode!r}) is invalid: expected 'min' or 'max'")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience!r}) is invalid: expected an int >= 0")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}) is invalid: expected a number")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta = abs(float(min_delta))
        self.verbose, self.strict, self.check_finite = verbose, strict, check_finite
        self.stopping_threshold, self.divergence_threshold = stopping_threshold, divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopped_epoch = 0
        self.stopping_reason: str | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def state_dict(self) -> dict:
        return {"wait_count": self.wait_count, "best_score": self.best_score,
                "stopped_epoch": self.stopped_epoch, "patience": self.patience}

    def load_state_dict(self, state: dict) -> None:
        self.wait_count = state["wait_count"]
        self.best_score = state["best_score"]
        self.stopped_epoch = state["stopped_epoch"]

    def _improved(self, current: float) -> bool:
        if self.mode == "min":
            return current < self.best_score - self.min_delta
        return current > self.best_score + self.min_delta

    def decide(self, current: float) -> tuple[bool, str | None]:
        """Update wait/best with ``current``; return (stop?, reason)."""
        better = (lambda a, b: a < b) if self.mode == "min" else (lambda a, b: a > b)
        if self.check_finite and not math.isfinite(current):
            return True, f"{self.monitor} = {current} is not finite"
        if self.stopping_threshold is not None and (better(current, self.stopping_threshold)
                                                    or current == self.stopping_threshold):
            return True, f"{self.monitor} = {current:.6g} reached stopping_threshold {self.stopping_threshold}"
        if self.divergence_threshold is not None and better(self.divergence_threshold, current):
            return True, f"{self.monitor} = {current:.6g} diverged past {self.divergence_threshold}"
        if self._improved(current):
            self.best_score, self.wait_count = current, 0
            return False, None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"{self.monitor} did not improve for {self.wait_count} checks "
                          f"(best {self.best_score:.6g})")
        return False, None

    def _check_on_epoch_end(self, trainer) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return sum(trainer.num_val_batches) == 0  # no validation: check at the epoch's end

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not self._check_on_epoch_end(trainer):
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._check_on_epoch_end(trainer):
            self._check(trainer)

    def _check(self, trainer) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if self.strict:
                raise KeyError(f"EarlyStopping(monitor={self.monitor!r}) found no such metric; logged "
                               f"metrics: {sorted(metrics)}. Log it with self.log({self.monitor!r}, ...), "
                               "fix the name, or pass strict=False")
            return
        stop, reason = self.decide(float(metrics[self.monitor]))
        stop, reason = trainer.strategy.broadcast((stop, reason))
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = reason
            if self.verbose and trainer.is_global_zero:
                log.info("early stop at epoch %d: %s", trainer.current_epoch, reason)
