"""raytrainer: Lightning-style training loops that scale out on Ray Train and sweep on Ray Tune.

The public surface (see DESIGN.md): Module, DataModule, Trainer, FitResult, RayDataLoader,
Callback, callbacks, loggers, seed_everything.
"""
from raytrainer import callbacks, loggers
from raytrainer.callbacks import Callback
from raytrainer.checkpoint import CheckpointError
from raytrainer.checkpoint import load as load_checkpoint
from raytrainer.checkpoint_writer import CheckpointUploadError
from raytrainer.config import ConfigError
from raytrainer.data import DataModule, RayDataLoader
from raytrainer.module import Module
from raytrainer.result import FitResult
from raytrainer.preemption import Preempted
from raytrainer.run import NonFiniteLossError
from raytrainer.strategy import FSDPStrategy
from raytrainer.trainer import Trainer
from raytrainer.utilities import seed_everything

LightningModule = Module          # so a Lightning module needs only its import changed
LightningDataModule = DataModule

__all__ = ["Module", "LightningModule", "DataModule", "LightningDataModule", "Trainer", "FitResult",
           "RayDataLoader", "FSDPStrategy", "Callback", "callbacks", "loggers", "seed_everything", "ConfigError",
           "load_checkpoint", "CheckpointError", "CheckpointUploadError", "NonFiniteLossError", "Preempted",
           "sweep", "tune"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # rt.tune and rt.sweep import ray.tune (seconds): only when used.
    if name == "tune":
        import importlib
        return importlib.import_module("raytrainer.tune")
    if name == "sweep":
        from raytrainer.tune import sweep
        return sweep
    raise AttributeError(f"module 'raytrainer' has no attribute {name!r}")
