"""Timer: stop training once a time budget is spent (Lightning's ``Timer``; ``Trainer(max_time=...)``
adds one). The fit ends the way ``should_stop`` ends it: the epoch's end runs, its checkpoint is
committed. The elapsed training time is part of every checkpoint, so a resumed run spends only
what is left of the budget.
"""
from __future__ import annotations

import logging
import re
import time
from datetime import timedelta
from typing import Any

from raytrainer.callbacks.base import Callback

log = logging.getLogger(__name__)

_STAGES = ("train", "validate", "test", "predict")


def parse_duration(duration: Any) -> timedelta | None:
    """``"DD:HH:MM:SS"``, a ``timedelta``, a dict of ``timedelta`` arguments, or None."""
    if duration is None or isinstance(duration, timedelta):
        return duration
    if isinstance(duration, dict):
        return timedelta(**duration)
    if isinstance(duration, str) and re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", duration):
        days, hours, minutes, seconds = map(int, duration.split(":"))
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    raise ValueError(f"duration={duration!r} is invalid: expected 'DD:HH:MM:SS', a datetime.timedelta or a "
                     "dict such as {'hours': 2}")


class Timer(Callback):
    """``duration``: the training-time budget; ``interval``: check after every ``"step"`` or at
    every ``"epoch"``'s end. ``time_elapsed(stage)``, ``time_remaining(stage)``,
    ``start_time(stage)``, ``end_time(stage)`` as Lightning's (stages: "train", "validate",
    "test", "predict"). With several workers rank 0's clock decides, so all stop together."""

    def __init__(self, duration: Any = None, interval: str = "step", verbose: bool = True):
        if interval not in ("step", "epoch"):
            raise ValueError(f"Timer(interval={interval!r}) is invalid: expected 'step' or 'epoch'")
        self._duration = parse_duration(duration)
        self._interval, self._verbose = interval, verbose
        self._start: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._end: dict[str, float | None] = dict.fromkeys(_STAGES)
        self._offset = 0.0  # training time spent before a resume

    def start_time(self, stage: str = "train") -> float | None:
        return self._start[stage]

    def end_time(self, stage: str = "train") -> float | None:
        return self._end[stage]

    def time_elapsed(self, stage: str = "train") -> float:
        start, end = self._start[stage], self._end[stage]
        offset = self._offset if stage == "train" else 0.0
        if start is None:
            return offset
        return offset + ((end if end is not None else time.monotonic()) - start)

    def time_remaining(self, stage: str = "train") -> float | None:
        return None if self._duration is None else self._duration.total_seconds() - self.time_elapsed(stage)

    def _started(self, stage: str) -> None:
        self._start[stage], self._end[stage] = time.monotonic(), None

    def _ended(self, stage: str) -> None:
        self._end[stage] = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._started("train")

    def on_train_end(self, trainer, pl_module) -> None:
        self._ended("train")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._started("validate")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._ended("validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._started("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._ended("test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._started("predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._ended("predict")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._interval == "step":
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._interval == "epoch":
            self._check(trainer)

    def _check(self, trainer) -> None:
        if self._duration is None:
            return
        spent = self.time_elapsed("train") >= self._duration.total_seconds()
        spent = trainer.strategy.broadcast(spent) if trainer.world_size > 1 else spent  # rank 0 decides
        if spent and not trainer.should_stop:
            trainer.should_stop = True
            if self._verbose:
                log.info("time limit reached (%s): training stops after %.1f s", self._duration,
                         self.time_elapsed("train"))

    def state_dict(self) -> dict:
        return {"time_elapsed": {stage: self.time_elapsed(stage) for stage in _STAGES}}

    def load_state_dict(self, state: dict) -> None:
        self._offset = float(state.get("time_elapsed", {}).get("train", 0.0))
