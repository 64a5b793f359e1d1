"""Trainer: the public entry point. Validates everything up front, picks the launcher, and exposes
Lightning's trainer attributes. It holds no loop logic (see loop.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytrainer import storage
from raytrainer.callbacks import Callback, EarlyStopping, ModelCheckpoint, ProgressBar
from raytrainer.config import ConfigError, build_config
from raytrainer.data import DataModule
from raytrainer.loggers import CSVLogger, Logger, TensorBoardLogger
from raytrainer.module import Module
from raytrainer.preemption import Preempted
from raytrainer.result import FitResult

if TYPE_CHECKING:
    from raytrainer.strategy import FSDPStrategy


class Trainer:
    def __init__(self, *, max_epochs: int | None = None, max_steps: int = -1,
                 accelerator: str = "auto", devices: int | str = 1, strategy: str | FSDPStrategy = "ddp",
                 precision: str | int = "32-true", accumulate_grad_batches: int = 1,
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str = "norm",
                 val_check_interval: float | int | None = 1.0, check_val_every_n_epoch: int | None = 1,
                 log_every_n_steps: int = 50, limit_train_batches=None, limit_val_batches=None,
                 limit_test_batches=None, limit_predict_batches=None, fast_dev_run: bool | int = False,
                 callbacks: list[Callback] | Callback | None = None, logger: Any = True,
                 enable_progress_bar: bool = True, enable_checkpointing: bool = True,
                 async_checkpoint: bool = True, checkpoint_retry: Any = None,
                 seed: int | None = None, deterministic: bool = False, storage_path: str | None = None,
                 storage_options: dict | None = None, name: str | None = None, launcher: str = "ray",
                 max_failures: int = 0, resources_per_worker: dict | None = None, profiler: Any = None):
        # The arguments as given: a sweep builds each trial's Trainer from them plus overrides.
        self._init_kwargs = {k: v for k, v in locals().items() if k != "self"}
        cfg = build_config(**{k: v for k, v in self._init_kwargs.items() if k not in ("callbacks", "logger")})
        if cfg.fast_dev_run:
            # Lightning's fast_dev_run: n batches of each stage, one epoch, nothing written.
            n = cfg.fast_dev_run
            cfg = cfg.replace(max_epochs=1, max_steps=n, limit_train_batches=n, limit_val_batches=n,
                              limit_test_batches=n, limit_predict_batches=n, val_check_interval=1.0,
                              check_val_every_n_epoch=1, enable_checkpointing=False)
            logger = False
        self.cfg = cfg.replace(storage_path=storage.normalize(cfg.storage_path))
        self.callbacks = self._build_callbacks(callbacks)
        self._loggers = _build_loggers(logger)
        self._run = None
        self._last_out: dict = {}
        self._should_stop = False

    def _build_callbacks(self, callbacks) -> list[Callback]:
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, Callback):
            callbacks = [callbacks]
        if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, Callback) for c in callbacks):
            raise ConfigError(f"Trainer(callbacks={callbacks!r}) is invalid: expected a list of "
                              "rt.Callback instances")
        callbacks = list(callbacks)
        has_ckpt = any(isinstance(c, ModelCheckpoint) for c in callbacks)
        if self.cfg.enable_checkpointing and not has_ckpt:
            callbacks.append(ModelCheckpoint())  # as Lightning: keep the latest epoch-end state
        if not self.cfg.enable_checkpointing and has_ckpt:
            raise ConfigError("Trainer(enable_checkpointing=False) conflicts with the ModelCheckpoint "
                              "in callbacks; remove one")
        if self.cfg.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(ProgressBar())
        if not self.cfg.enable_progress_bar:
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        return callbacks

    # ------------------------------------------------------------------ stages
    def fit(self, model: Module, train_dataloaders=None, val_dataloaders=None,
            datamodule: DataModule | None = None, ckpt_path: str | None = None) -> FitResult:
        self._check_inputs(model, datamodule, train_dataloaders, "train_dataloaders")
        self._check_inputs(model, datamodule, val_dataloaders, "val_dataloaders")
        if isinstance(train_dataloaders, DataModule):  # fit(model, dm) as Lightning allows
            datamodule, train_dataloaders = train_dataloaders, None
        _check_module(model, "fit")
        if train_dataloaders is None and not any(callable(getattr(o, "train_dataloader", None))
                                                 for o in (datamodule, model)):
            # Known before anything starts (the same check in execute.py would come after Ray).
            raise ValueError("fit needs data: pass train_dataloaders=, a datamodule with "
                             "train_dataloader(), or define train_dataloader() on the module")
        out = self._launch("fit", model, datamodule,
                           {"train": train_dataloaders, "val": val_dataloaders}, ckpt_path)
        ckpt = self.checkpoint_callback
        from raytrainer import checkpoint as ckpt_io
        checkpoints = ckpt_io.list_committed(self.cfg, self.cfg.storage_options) if ckpt else []
        return FitResult(
            metrics=out["metrics"], global_step=out["global_step"], current_epoch=out["current_epoch"],
            best_checkpoint=(ckpt.best_model_path or None) if ckpt else None,
            last_checkpoint=((ckpt.last_model_path or None) if ckpt and ckpt.save_last else None)
            or (checkpoints[-1] if checkpoints else None),
            log_dir=out.get("log_dir") or self.log_dir, checkpoints=checkpoints, profile=out.get("profile"))

    def validate(self, model: Module | None = None, dataloaders=None, ckpt_path: str | None = None,
                 datamodule: DataModule | None = None, verbose: bool = True) -> list[dict[str, float]]:
        return [self._evaluate("validate", model, dataloaders, ckpt_path, datamodule, verbose)]

    def test(self, model: Module | None = None, dataloaders=None, ckpt_path: str | None = None,
             datamodule: DataModule | None = None, verbose: bool = True) -> list[dict[str, float]]:
        return [self._evaluate("test", model, dataloaders, ckpt_path, datamodule, verbose)]

    def predict(self, model: Module | None = None, dataloaders=None, datamodule: DataModule | None = None,
                return_predictions: bool = True, ckpt_path: str | None = None):
        model = self._model_or_last(model)
        out = self._launch("predict", model, datamodule, {"predict": dataloaders}, ckpt_path)
        return out.get("predictions") if return_predictions else None

    def _evaluate(self, stage, model, dataloaders, ckpt_path, datamodule, verbose):
        model = self._model_or_last(model)
        if isinstance(dataloaders, DataModule):
            datamodule, dataloaders = dataloaders, None
        kind = "val" if stage == "validate" else "test"
        out = self._launch(stage, model, datamodule, {kind: dataloaders}, ckpt_path)
        if verbose:
            print(f"[raytrainer] {stage}: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(out["metrics"].items())))
        return out["metrics"]

    def _model_or_last(self, model):
        if model is None:
            if self._run is None:
                raise ValueError("pass the model: this Trainer has not fit one yet")
            model = self._run.module
        _check_module(model, "evaluate")
        return model

    def _launch(self, stage, model, datamodule, loaders, ckpt_path) -> dict:
        if datamodule is not None and not isinstance(datamodule, DataModule):
            raise TypeError(f"datamodule must be an rt.DataModule, got {type(datamodule).__name__}")
        from raytrainer.launch import launch
        self._should_stop = False
        out = launch(self, stage, model, datamodule, loaders, ckpt_path)
        if out.get("preempted"):
            # Raised once the fit is wound up (checkpoint committed, loggers closed, weights in
            # `model`); a SystemExit, so an unhandled one ends the process as the signal would.
            error = Preempted(**out["preempted"])
            print(f"[raytrainer] {error}", flush=True)
            raise error
        return out

    @staticmethod
    def _check_inputs(model, datamodule, loaders, arg) -> None:
        if loaders is not None and datamodule is not None and not isinstance(loaders, DataModule):
            raise ValueError(f"pass either {arg}= or datamodule=, not both")

    def save_checkpoint(self, filepath: str | None = None) -> str:
        """Commit the current state now (inside a run) and return its URI."""
        if self._run is None:
            raise RuntimeError("save_checkpoint() needs a running or finished fit")
        uri = self._run.save_checkpoint()
        self._run.writer.wait()  # a user's explicit save returns once committed
        return uri

    # ------------------------------------------------------------------ Lightning's attributes
    def _run_attr(self, name: str, default: Any) -> Any:
        if self._run is not None:
            return getattr(self._run, name)
        return self._last_out.get(name, default)  # after a run in Ray workers

    global_step = property(lambda self: self._run_attr("global_step", 0))
    current_epoch = property(lambda self: self._run_attr("current_epoch", 0))
    num_training_batches = property(lambda self: self._run_attr("num_training_batches", float("inf")))
    optimizers = property(lambda self: self._run_attr("optimizers", []))
    lr_scheduler_configs = property(lambda self: self._run_attr("scheduler_configs", []))
    global_rank = property(lambda self: self._run.ctx.global_rank if self._run else 0)
    local_rank = property(lambda self: self._run.ctx.local_rank if self._run else 0)
    node_rank = property(lambda self: self._run.ctx.node_rank if self._run else 0)
    world_size = property(lambda self: self._run.ctx.world_size if self._run else 1)
    is_global_zero = property(lambda self: self.global_rank == 0)
    max_epochs = property(lambda self: self.cfg.max_epochs)
    max_steps = property(lambda self: self.cfg.max_steps)
    log_every_n_steps = property(lambda self: self.cfg.log_every_n_steps)
    accumulate_grad_batches = property(lambda self: self.cfg.accumulate_grad_batches)
    precision = property(lambda self: self.cfg.precision)
    sanity_checking = property(lambda self: False)
    training = property(lambda self: self._run is not None and self._run.stage == "fit"
                        and self._run.metrics.stage == "train")
    validating = property(lambda self: self._run is not None and self._run.metrics.stage == "validate")
    testing = property(lambda self: self._run is not None and self._run.metrics.stage == "test")
    predicting = property(lambda self: self._run is not None and self._run.metrics.stage == "predict")

    @property
    def should_stop(self) -> bool:
        return self._run.should_stop if self._run is not None else self._should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        if self._run is not None:
            self._run.should_stop = bool(value)
        self._should_stop = bool(value)

    @property
    def callback_metrics(self) -> dict:
        if self._run is not None:
            return self._run.metrics.callback_metrics()
        import torch
        return {k: torch.tensor(v) for k, v in self._last_out.get("metrics", {}).items()}

    @property
    def logged_metrics(self) -> dict[str, float]:
        return dict(self._run.metrics.logged_metrics) if self._run is not None else {}

    @property
    def progress_bar_metrics(self) -> dict[str, float]:
        return self._run.metrics.progress_bar_metrics() if self._run is not None else {}

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        cbs = self._run.callbacks if self._run is not None else self.callbacks
        return [c for c in cbs if isinstance(c, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        cbs = self.checkpoint_callbacks
        return cbs[0] if cbs else None

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        cbs = self._run.callbacks if self._run is not None else self.callbacks
        return next((c for c in cbs if isinstance(c, EarlyStopping)), None)

    @property
    def loggers(self) -> list[Logger]:
        """During a run, the run's loggers: empty off global rank 0 (rank zero by construction)."""
        return self._run.loggers if self._run is not None else self._loggers

    @property
    def logger(self) -> Logger | None:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        for lg in self.loggers:
            if lg.log_dir:
                return lg.log_dir
        return self.cfg.run_dir

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    @property
    def lightning_module(self):
        return self._run.module if self._run is not None else None

    @property
    def datamodule(self):
        return self._run.datamodule if self._run is not None else None

    @property
    def estimated_stepping_batches(self) -> float:
        """Optimizer steps the fit will take (for OneCycleLR-style schedulers)."""
        n = self.num_training_batches
        per_epoch = -(-n // self.cfg.accumulate_grad_batches) if n != float("inf") else float("inf")
        by_epochs = per_epoch * self.cfg.max_epochs if self.cfg.max_epochs != -1 else float("inf")
        return by_epochs if self.cfg.max_steps == -1 else min(self.cfg.max_steps, by_epochs)

    def __getstate__(self):  # a Trainer travels to Ray workers without its finished run
        return {**self.__dict__, "_run": None}


def _check_module(model, stage: str) -> None:
    if not isinstance(model, Module):
        raise TypeError(f"expected an rt.Module (a raytrainer.Module subclass), got {type(model).__name__}. "
                        "A LightningModule only needs its import changed: `import raytrainer as rt; "
                        "class Lit(rt.Module)`")
    if stage == "fit" and type(model).training_step is Module.training_step:
        raise TypeError(f"{type(model).__name__} does not define training_step(self, batch, batch_idx)")
    if stage == "fit" and model.automatic_optimization and \
            type(model).configure_optimizers is Module.configure_optimizers:
        raise TypeError(f"{type(model).__name__} does not define configure_optimizers()")


def _build_loggers(logger: Any) -> list[Logger]:
    if logger is True or logger is None:
        return [TensorBoardLogger(), CSVLogger()]
    if logger is False:
        return []
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    for lg in loggers:
        if not isinstance(lg, Logger):
            raise ConfigError(f"Trainer(logger={logger!r}) is invalid: expected True, False, an "
                              "rt.loggers.Logger or a list of them")
    return loggers
