"""SpikeDetection: stop training when the loss spikes, naming the batches to skip (Lightning's).

A loss is a spike when it is worse than the last one and differs from the running mean of the
last ``window`` losses by at least ``atol`` and by at least ``rtol`` x that mean (with
``finite_only``, a NaN or infinite loss is a spike too). From batch ``warmup`` of an epoch on.
Any rank's spike stops every rank: the batch before and the spiking one are written to
``exclude_batches_path`` (default ``{default_root_dir}/skip_batches.json``) and
``TrainingSpikeException`` is raised. Its statistics are in the checkpoint (exact resume); the
running mean is plain Python here, where Lightning's needs torchmetrics.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from typing import Any

import torch

from raytrainer import storage
from raytrainer.callbacks.base import Callback


class TrainingSpikeException(RuntimeError):
    """Raised by SpikeDetection (Lightning's ``lightning.fabric.utilities.spike`` name)."""

    def __init__(self, batch_idx: int, *args: Any):
        super().__init__(f"Training spike detected in batch {batch_idx}", *args)


class SpikeDetection(Callback):
    def __init__(self, mode: str = "min", window: int = 10, warmup: int = 1, atol: float | None = None,
                 rtol: float | None = 2.0, exclude_batches_path: str | None = None, finite_only: bool = True):
        if mode not in ("min", "max"):
            raise ValueError(f"SpikeDetection(mode={mode!r}) is invalid: expected 'min' or 'max'")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SpikeDetection(window={window!r}) is invalid: expected an int >= 1")
        self.mode, self.window, self.warmup, self.atol, self.rtol = mode, window, warmup, atol, rtol
        self.exclude_batches_path = exclude_batches_path
        self.finite_only = finite_only
        self.last_val = 0.0
        self.recent: deque[float] = deque(maxlen=window)
        self.bad_batches: list[int] = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(outputs, torch.Tensor):
            loss = outputs
        elif isinstance(outputs, dict) and "loss" in outputs:
            loss = outputs["loss"]
        else:
            return  # a step the module skipped (training_step returned None): nothing to judge
        value = float(loss.detach().float().mean())  # one host sync per step, as Lightning's
        spike = batch_idx >= self.warmup and self._is_spike(value)
        if bool(trainer.strategy.reduce(torch.tensor(float(spike), device=loss.device), reduce_op="max")):
            self._stop(trainer, batch_idx)
        elif self.finite_only or bool(trainer.strategy.reduce(
                torch.tensor(float(math.isfinite(value)), device=loss.device), reduce_op="min")):
            self.recent.append(value)  # (a non-finite loss on any rank updates no rank's statistics)
            self.last_val = value

    def _is_spike(self, value: float) -> bool:
        if self.finite_only and not math.isfinite(value):
            return True
        if (value - self.last_val <= 0) if self.mode == "min" else (value - self.last_val >= 0):
            return False  # not worse than the last one
        if not self.recent:
            return False  # no reference yet (Lightning's empty mean is NaN: no spike)
        mean = sum(self.recent) / len(self.recent)
        return ((self.atol is None or abs(value - mean) >= abs(self.atol))
                and (self.rtol is None or abs(value - mean) >= abs(self.rtol * mean)))

    def _stop(self, trainer, batch_idx: int) -> None:
        # the batch before too: it may have left the weights in the state that spiked
        self.bad_batches.extend([batch_idx - 1, batch_idx])
        path = self.exclude_batches_path or storage.join(storage.normalize(trainer.default_root_dir),
                                                         "skip_batches.json")
        if not str(path).endswith(".json"):
            path = storage.join(str(path), "skip_batches.json")
        if trainer.is_global_zero:
            fs, fs_path = storage.filesystem(str(path))
            if "/" in fs_path:
                fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(fs_path, json.dumps(self.bad_batches, indent=4).encode())
        raise TrainingSpikeException(batch_idx=batch_idx)

    def state_dict(self) -> dict:
        return {"last_val": self.last_val, "recent": list(self.recent), "bad_batches": list(self.bad_batches)}

    def load_state_dict(self, state: dict) -> None:
        self.last_val = state["last_val"]
        self.recent = deque(state["recent"], maxlen=self.window)
        self.bad_batches = list(state["bad_batches"])
