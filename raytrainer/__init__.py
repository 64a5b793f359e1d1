"""raytrainer: Lightning-style training loops that scale out on Ray Train and sweep on Ray Tune.

The public surface (DESIGN.md): Module (LightningModule), DataModule, Trainer, FitResult,
RayDataLoader, FSDPStrategy, Callback, callbacks, loggers, sweep and tune (search spaces),
load_checkpoint, seed_everything, and the exceptions raytrainer raises on purpose.

Where things live: trainer.py, module.py, data.py, config.py, errors.py at the top; loop/ (the
one training loop, never imports ray), checkpoint/, runtime/ (in this process, or on Ray Train
workers), tune/ (sweeps), cli/, callbacks/, loggers/.
"""
from raytrainer import callbacks, loggers
from raytrainer.callbacks import Callback
from raytrainer.checkpoint.store import load as load_checkpoint
from raytrainer.data import DataModule, RayDataLoader
from raytrainer.errors import (CheckpointError, CheckpointUploadError, ConfigError, NonFiniteLossError,
                               Preempted)
from raytrainer.loop.strategy import FSDPStrategy
from raytrainer.module import Module
from raytrainer.result import FitResult
from raytrainer.trainer import Trainer
from raytrainer import tune  # rt.tune.loguniform(...): Tune's helpers, imported from Ray when used
from raytrainer.tune.sweep import sweep
from raytrainer.utilities import seed_everything

LightningModule = Module          # so a Lightning module needs only its import changed
LightningDataModule = DataModule

__all__ = ["Module", "LightningModule", "DataModule", "LightningDataModule", "Trainer", "FitResult",
           "RayDataLoader", "FSDPStrategy", "Callback", "callbacks", "loggers", "seed_everything", "ConfigError",
           "load_checkpoint", "CheckpointError", "CheckpointUploadError", "NonFiniteLossError", "Preempted",
           "sweep", "tune"]
__version__ = "0.1.0"
