"""DeviceStatsMonitor: the device's statistics to the loggers, with Lightning's names and steps.

CPU: ``cpu_percent``, ``cpu_vm_percent``, ``cpu_swap_percent`` (psutil, which Ray brings). CUDA:
``torch.cuda.memory_stats`` of the worker's device (allocated/reserved/active bytes, current and
peak, allocator events). Logged at the start and end of every training batch of a logging step and
of every ``log_every_n_steps``-th batch of a validation or test run (Lightning's
``should_update_logs``), under
``DeviceStatsMonitor.{hook}/{stat}``, at the loggers' step. On Ray workers the loggers are rank
zero's: its device is the one reported.
"""
from __future__ import annotations

from typing import Any

import torch

from raytrainer.callbacks.base import Callback
from raytrainer.errors import ConfigError


def cpu_stats() -> dict[str, float]:
    import psutil

    return {"cpu_vm_percent": psutil.virtual_memory().percent, "cpu_percent": psutil.cpu_percent(),
            "cpu_swap_percent": psutil.swap_memory().percent}


def device_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return dict(torch.cuda.memory_stats(device))
    return cpu_stats()


class DeviceStatsMonitor(Callback):
    """``cpu_stats``: None (CPU statistics when the device is the CPU), True (also on a GPU
    device), False (none for a CPU device)."""

    def __init__(self, cpu_stats: bool | None = None):
        self._cpu_stats = cpu_stats
        self._eval_batches = 0  # batches started in the evaluation run in progress (all its loaders)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise ConfigError("Cannot use `DeviceStatsMonitor` callback with `Trainer(logger=False)`: it logs "
                              "through the loggers")

    def _log(self, trainer, hook: str, eval_batch: bool = False) -> None:
        # Lightning's should_update_logs: in training, the logging steps; in an evaluation run,
        # every log_every_n_steps-th of its batches
        due = (self._eval_batches % trainer.log_every_n_steps == 0 or trainer.should_stop) if eval_batch \
            else trainer.logs_this_step
        if not due:
            return
        device = trainer.strategy.root_device
        if self._cpu_stats is False and device.type == "cpu":
            return
        stats = device_stats(device)
        if self._cpu_stats and device.type != "cpu":
            stats.update(cpu_stats())
        prefix = f"{type(self).__qualname__}.{hook}/"
        for lg in trainer.loggers:
            lg.log_metrics({prefix + k: float(v) for k, v in stats.items()}, trainer.logger_step)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._log(trainer, "on_train_batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log(trainer, "on_train_batch_end")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_batches = 0

    on_test_start = on_validation_start

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batches += 1
        self._log(trainer, "on_validation_batch_start", eval_batch=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._log(trainer, "on_validation_batch_end", eval_batch=True)

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batches += 1
        self._log(trainer, "on_test_batch_start", eval_batch=True)

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._log(trainer, "on_test_batch_end", eval_batch=True)
