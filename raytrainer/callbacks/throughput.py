"""ThroughputMonitor: log training speed (and GPU memory) every ``log_every_n_steps`` steps."""
from __future__ import annotations

import time

import torch

from raytrainer.callbacks.base import Callback
from raytrainer.utilities import infer_batch_size


class ThroughputMonitor(Callback):
    """Logs, every ``log_every_n_steps`` optimizer steps, over the steps since the last log:

    - ``throughput/samples_per_sec``: samples of all workers (each batch's size, inferred as the loop does,
      times the world size: every worker runs the same number of batches) per second;
    - ``throughput/steps_per_sec``: optimizer steps per second;
    - on CUDA, ``throughput/gpu_mem_allocated_gb`` and ``throughput/gpu_mem_max_allocated_gb``
      (rank 0's device, GiB).

    Time spent in validation is left out (as Lightning's ThroughputMonitor does); checkpoint
    snapshots and data loading are part of the speed. Per batch it adds an integer and a compare:
    no host-device sync. The clock is read at the same point of every logging step (just before
    the loop's own sync there), so over a window the host cannot run ahead of the device by more
    than it already did at the window's start. Only rank 0 logs, so only rank 0 has it.
    """

    rank_zero_only = True

    def __init__(self):
        self._t0: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._world_size = trainer.world_size
        self._every = trainer.log_every_n_steps
        device = trainer.strategy.root_device
        self._device = device if device.type == "cuda" else None
        self._restart(trainer.global_step)

    def _restart(self, step: int) -> None:
        self._samples = 0
        self._last_step = step
        self._paused = 0.0
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += infer_batch_size(batch)
        step = trainer.global_step
        if step != self._last_step and step % self._every == 0:
            self._emit(trainer, step)

    def _emit(self, trainer, step: int) -> None:
        seconds = time.perf_counter() - self._t0 - self._paused
        values = {"throughput/samples_per_sec": self._samples * self._world_size / seconds,
                  "throughput/steps_per_sec": (step - self._last_step) / seconds}
        if self._device is not None:  # allocator counters: host-side, no sync
            values["throughput/gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(self._device) / 2**30
            values["throughput/gpu_mem_max_allocated_gb"] = torch.cuda.max_memory_allocated(self._device) / 2**30
        for lg in trainer.loggers:
            lg.log_metrics(values, step)
        self._restart(step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._t0 is not None:
            self._validation_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._t0 is not None:
            self._paused += time.perf_counter() - self._validation_t0

    def on_train_end(self, trainer, pl_module) -> None:
        self._t0 = None
