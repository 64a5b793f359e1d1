"""Trainer: the public entry point. Validates everything up front (config.py), picks the runtime
(runtime/local.py or runtime/ray_train.py), and exposes Lightning's trainer attributes, read from
the run in progress (loop/run.py). It holds no loop logic."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raytrainer.callbacks import Callback, EarlyStopping, ModelCheckpoint, ModelSummary, ProgressBar, Timer
from raytrainer.checkpoint import lightning_file
from raytrainer.checkpoint.store import list_committed
from raytrainer.config import TrainerConfig
from raytrainer.data import DataModule
from raytrainer.errors import ConfigError, Preempted
from raytrainer.loggers import CSVLogger, Logger, TensorBoardLogger
from raytrainer.loop.evaluate import merge_predictions
from raytrainer.module import Module
from raytrainer.result import FitResult
from raytrainer.refusals import check_module as _check_module
from raytrainer.refusals import refuse_unsupported as _refuse
from raytrainer.runtime import preflight
from raytrainer.runtime.local import launch_local
from raytrainer.utilities import show_info_logs

if TYPE_CHECKING:
    from raytrainer.loop.strategy import FSDPStrategy, Strategy

log = logging.getLogger(__name__)
_D = TrainerConfig  # the defaults below are TrainerConfig's: one place (tests check they agree)


@dataclass(frozen=True)
class TrainerState:
    """``trainer.state``: what the Trainer is doing, with Lightning's values.
    ``fn``: "fit" | "validate" | "test" | "predict" (None between runs); ``stage``: "train" |
    "validate" | "test" | "predict" (validation inside fit is "validate")."""
    fn: str | None = None
    stage: str | None = None


class Trainer:
    def __init__(self, *, max_epochs: int | None = _D.max_epochs, max_steps: int = _D.max_steps,
                 accelerator: str = _D.accelerator, devices: int | str = _D.devices,
                 strategy: str | FSDPStrategy = _D.strategy, precision: str | int = _D.precision,
                 accumulate_grad_batches: int = _D.accumulate_grad_batches,
                 gradient_clip_val: float | None = _D.gradient_clip_val,
                 gradient_clip_algorithm: str | None = _D.gradient_clip_algorithm,
                 val_check_interval: float | int | None = _D.val_check_interval,
                 check_val_every_n_epoch: int | None = _D.check_val_every_n_epoch,
                 log_every_n_steps: int = _D.log_every_n_steps,
                 limit_train_batches: int | float | None = _D.limit_train_batches,
                 limit_val_batches: int | float | None = _D.limit_val_batches,
                 limit_test_batches: int | float | None = _D.limit_test_batches,
                 limit_predict_batches: int | float | None = _D.limit_predict_batches,
                 fast_dev_run: bool | int = _D.fast_dev_run,
                 callbacks: list[Callback] | Callback | None = None, logger: Any = True,
                 enable_progress_bar: bool = _D.enable_progress_bar,
                 enable_checkpointing: bool = _D.enable_checkpointing,
                 async_checkpoint: bool = _D.async_checkpoint, checkpoint_retry: Any = _D.checkpoint_retry,
                 seed: int | None = _D.seed, deterministic: bool = _D.deterministic,
                 use_distributed_sampler: bool = _D.use_distributed_sampler,
                 storage_path: str | None = _D.storage_path, storage_options: dict | None = _D.storage_options,
                 name: str | None = _D.name, launcher: str = _D.launcher, max_failures: int = _D.max_failures,
                 resources_per_worker: dict | None = _D.resources_per_worker, profiler: Any = _D.profiler,
                 default_root_dir: str | None = _D.default_root_dir, num_nodes: int = _D.num_nodes,
                 num_sanity_val_steps: int = _D.num_sanity_val_steps, min_epochs: int | None = _D.min_epochs,
                 min_steps: int | None = _D.min_steps, enable_model_summary: bool = _D.enable_model_summary,
                 benchmark: bool | None = _D.benchmark, detect_anomaly: bool = _D.detect_anomaly,
                 inference_mode: bool = _D.inference_mode, sync_batchnorm: bool = _D.sync_batchnorm,
                 overfit_batches: int | float = _D.overfit_batches, barebones: bool = _D.barebones,
                 enable_autolog_hparams: bool = _D.enable_autolog_hparams, max_time: Any = _D.max_time,
                 reload_dataloaders_every_n_epochs: int = _D.reload_dataloaders_every_n_epochs,
                 **not_supported: Any):
        """Lightning's Trainer arguments (same names and meanings), plus where a run goes
        (``storage_path``, ``storage_options``, ``name``), how it runs (``launcher``: "ray" or
        "local"; ``max_failures``, ``resources_per_worker``) and how checkpoints commit
        (``async_checkpoint``, ``checkpoint_retry``). Every argument is checked here."""
        _refuse(not_supported)
        self.cfg = TrainerConfig(
            max_epochs=max_epochs, max_steps=max_steps, accelerator=accelerator, devices=devices,
            strategy=strategy, precision=precision, accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
            val_check_interval=val_check_interval, check_val_every_n_epoch=check_val_every_n_epoch,
            log_every_n_steps=log_every_n_steps, limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches, limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches, fast_dev_run=fast_dev_run,
            enable_progress_bar=enable_progress_bar, enable_checkpointing=enable_checkpointing,
            async_checkpoint=async_checkpoint, checkpoint_retry=checkpoint_retry, seed=seed,
            deterministic=deterministic, use_distributed_sampler=use_distributed_sampler,
            storage_path=storage_path, storage_options=storage_options,
            name=name, launcher=launcher, max_failures=max_failures,
            resources_per_worker=resources_per_worker, profiler=profiler, default_root_dir=default_root_dir,
            num_nodes=num_nodes, num_sanity_val_steps=num_sanity_val_steps, min_epochs=min_epochs,
            min_steps=min_steps, enable_model_summary=enable_model_summary, benchmark=benchmark,
            detect_anomaly=detect_anomaly, inference_mode=inference_mode, sync_batchnorm=sync_batchnorm,
            overfit_batches=overfit_batches, barebones=barebones, enable_autolog_hparams=enable_autolog_hparams,
            max_time=max_time, reload_dataloaders_every_n_epochs=reload_dataloaders_every_n_epochs)
        # The arguments as given: a sweep builds each trial's Trainer from them plus overrides.
        self._init_kwargs = {**self.cfg.given, "callbacks": callbacks, "logger": logger}
        self.callbacks = self._build_callbacks(callbacks)
        # Lightning's fast_dev_run writes nothing: no loggers either.
        if barebones and logger not in (True, False, None):
            raise ConfigError("Trainer(barebones=True) runs without loggers: drop logger=")
        self._loggers = [] if self.cfg.fast_dev_run or barebones else _build_loggers(logger)
        self._run = None             # the run in progress, or the last one (loop/run.py)
        self._last_out: dict = {}    # what a run in Ray workers sent back
        self._module = None          # the module of the last stage (Lightning's lightning_module after it)
        self._datamodule = None      # the last datamodule given to a stage (Lightning keeps it attached)
        self._should_stop = False
        self._return_predictions = True  # the predict() call's: read by the run (loop/evaluate.py)
        # seed_everything(workers=True) before the Trainer: its loaders seed their worker processes
        self._seed_workers = os.environ.get("PL_SEED_WORKERS") == "1"

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
        if self.cfg.max_time is not None:
            if any(isinstance(c, Timer) for c in callbacks):
                log.info("Trainer(max_time=...) ignored: the callbacks already hold a Timer (as Lightning)")
            else:
                callbacks.append(Timer(duration=self.cfg.max_time, interval="step"))
        has_summary = any(isinstance(c, ModelSummary) for c in callbacks)
        if self.cfg.enable_model_summary and not has_summary:
            callbacks.append(ModelSummary())
        if not self.cfg.enable_model_summary and has_summary:
            raise ConfigError("Trainer(enable_model_summary=False) conflicts with the ModelSummary in callbacks; "
                              "remove one")
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
            # Known before anything starts (the same check in the workers would come after Ray).
            raise ValueError("fit needs data: pass train_dataloaders=, a datamodule with "
                             "train_dataloader(), or define train_dataloader() on the module")
        out = self._launch("fit", model, datamodule,
                           {"train": train_dataloaders, "val": val_dataloaders}, ckpt_path)
        ckpt = self.checkpoint_callback
        checkpoints = list_committed(self.cfg, self.cfg.storage_options) if ckpt else []
        return FitResult(
            metrics=out["metrics"], global_step=out["global_step"], current_epoch=out["current_epoch"],
            best_checkpoint=(ckpt.best_model_path or None) if ckpt else None,
            last_checkpoint=((ckpt.last_model_path or None) if ckpt and ckpt.save_last else None)
            or (checkpoints[-1] if checkpoints else None),
            log_dir=out.get("log_dir") or self.log_dir, checkpoints=checkpoints, profile=out.get("profile"))

    def validate(self, model: Module | None = None, dataloaders=None, ckpt_path: str | None = None,
                 datamodule: DataModule | None = None, verbose: bool = True) -> list[dict[str, float]]:
        """The epoch values, one dict per loader (Lightning's result)."""
        return self._evaluate("validate", model, dataloaders, ckpt_path, datamodule, verbose)

    def test(self, model: Module | None = None, dataloaders=None, ckpt_path: str | None = None,
             datamodule: DataModule | None = None, verbose: bool = True) -> list[dict[str, float]]:
        """The epoch values, one dict per loader (Lightning's result)."""
        return self._evaluate("test", model, dataloaders, ckpt_path, datamodule, verbose)

    def predict(self, model: Module | None = None, dataloaders=None, datamodule: DataModule | None = None,
                return_predictions: bool = True, ckpt_path: str | None = None):
        """Predictions of every worker, in dataset order (the batch outputs one process would
        return). ``return_predictions=False``: nothing is kept or sent back (write them with a
        prediction writer, rt.callbacks.BasePredictionWriter)."""
        model = self._model_or_last(model)
        if isinstance(dataloaders, DataModule):
            datamodule, dataloaders = dataloaders, None
        self._return_predictions = bool(return_predictions)
        out = self._launch("predict", model, datamodule, {"predict": dataloaders}, ckpt_path)
        return merge_predictions(out["predictions"]) if return_predictions else None

    def _evaluate(self, stage, model, dataloaders, ckpt_path, datamodule, verbose):
        model = self._model_or_last(model)
        if isinstance(dataloaders, DataModule):
            datamodule, dataloaders = dataloaders, None
        kind = "val" if stage == "validate" else "test"
        out = self._launch(stage, model, datamodule, {kind: dataloaders}, ckpt_path)
        if verbose:
            log.info("%s: %s", stage, ", ".join(f"{k}={v:.6g}" for k, v in sorted(out["metrics"].items())))
        return out["per_loader"]

    def _model_or_last(self, model):
        if model is None:
            if self.lightning_module is None:
                raise ValueError("pass the model: this Trainer has not fit one yet")
            model = self.lightning_module
        _check_module(model, "evaluate")
        return model

    def _launch(self, stage, model, datamodule, loaders, ckpt_path) -> dict:
        if datamodule is not None and not isinstance(datamodule, DataModule):
            raise TypeError(f"datamodule must be an rt.DataModule, got {type(datamodule).__name__}")
        show_info_logs()
        self._should_stop = False
        self._module = model
        self._datamodule = datamodule if datamodule is not None else self._datamodule
        resume_uri = preflight.prepare(self, stage, model, ckpt_path, datamodule)
        if self.cfg.launcher == "local":
            out = launch_local(self, stage, model, datamodule, loaders, resume_uri)
        else:
            from raytrainer.runtime.ray_train import launch_ray  # imports ray: only for Ray runs
            out = launch_ray(self, stage, model, datamodule, loaders, resume_uri)
        if out.get("preempted"):
            # Raised once the fit is wound up (checkpoint committed, loggers closed, weights in
            # `model`); a SystemExit, so an unhandled one ends the process as the signal would.
            error = Preempted(**out["preempted"])
            log.warning("%s", error)
            raise error
        return out

    @staticmethod
    def _check_inputs(model, datamodule, loaders, arg) -> None:
        if loaders is not None and datamodule is not None and not isinstance(loaders, DataModule):
            raise ValueError(f"pass either {arg}= or datamodule=, not both")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filepath: str | None = None, weights_only: bool = False, *,
                        after_commit: list | None = None, wait: bool = True) -> str:
        """``filepath``: the state now as one Lightning ``.ckpt`` file there (any fsspec URI;
        ``weights_only``: weights, counters and hyperparameters only), which pytorch-lightning's
        ``load_from_checkpoint`` reads too. Without one: commit the state at the current position
        to the run's checkpoint folder and return its URI (once per position: a second call
        there returns the same URI); ``wait=False`` returns once the state is snapshotted (the
        commit goes on in the background) and runs ``after_commit`` once it has committed
        (ModelCheckpoint's retention)."""
        if filepath is not None and self._run is None and self._last_out:  # the run was on Ray workers
            return lightning_file.export_newest(self.cfg, self._last_out["global_step"], str(filepath), weights_only)
        run = self._require_run("save_checkpoint()")
        if filepath is not None and str(filepath).rstrip("/") != run.checkpoint_uri():
            return run.export_checkpoint(str(filepath), weights_only)
        if weights_only:
            raise ValueError("save_checkpoint(weights_only=True) needs a filepath: the run's own checkpoints hold "
                             "the full state (exact resume); save_checkpoint('model.ckpt', weights_only=True) "
                             "exports the weights")
        uri = run.save_checkpoint(after_commit=after_commit)
        if wait:
            run.wait_for_commits()  # a user's explicit save returns once committed
        return uri

    @property
    def checkpoint_boundary(self) -> str | None:
        """raytrainer's one addition to Lightning's trainer: "step" or "epoch" while the loop is
        at a checkpoint boundary (on_checkpoint_boundary), else None. Checkpoints are taken only
        there, where a resumed run continues exactly as this one would."""
        return self._run.boundary.kind if self._run is not None else None

    @property
    def boundary_checkpoint_path(self) -> str:
        """Where a checkpoint of the current position is (or would be) committed."""
        return self._require_run("boundary_checkpoint_path").checkpoint_uri()

    def _require_run(self, what: str):
        if self._run is None:
            raise RuntimeError(f"{what} needs a running or finished fit")
        return self._run

    # ------------------------------------------------------------------ the loop's hand-off
    def _attach(self, run) -> None:
        """The run that starts now (loop/execute.py): the attributes below read from it."""
        self._run = run

    def _callback_states(self) -> dict:
        return {cb.state_key: cb.state_dict() for cb in self._run.callbacks}

    def _finished_on_workers(self, out: dict) -> None:
        """A run in Ray workers ended: the driver's callbacks learn what the workers' did."""
        for cb in self.callbacks:
            if cb.state_key in out["callbacks"]:
                cb.load_state_dict(out["callbacks"][cb.state_key])
        self._last_out = out

    # ------------------------------------------------------------------ Lightning's attributes
    def _progress(self, name: str, default: Any) -> Any:
        if self._run is not None:
            return getattr(self._run.progress, name)
        return self._last_out.get(name, default)  # after a run in Ray workers

    def _counters(self) -> dict[str, int]:
        """Where the last run left the loop's counters (an evaluation stage starts there)."""
        if self._run is not None:
            progress = self._run.progress
            return {"global_step": progress.global_step, "current_epoch": progress.lightning_epoch,
                    "batches_stepped": progress.batches_stepped}
        return {k: self._last_out.get(k, 0) for k in ("global_step", "current_epoch", "batches_stepped")}

    global_step = property(lambda self: self._progress("global_step", 0))
    current_epoch = property(lambda self: self._run.progress.lightning_epoch if self._run is not None
                             else self._last_out.get("current_epoch", 0))
    num_training_batches = property(lambda self: self._run.num_training_batches if self._run else float("inf"))
    num_val_batches = property(lambda self: list(self._run.num_val_batches) if self._run else [])
    optimizers = property(lambda self: self._run.optimizers if self._run else [])
    lr_scheduler_configs = property(lambda self: self._run.scheduler_configs if self._run else [])
    global_rank = property(lambda self: self._run.ctx.global_rank if self._run else 0)
    local_rank = property(lambda self: self._run.ctx.local_rank if self._run else 0)
    node_rank = property(lambda self: self._run.ctx.node_rank if self._run else 0)
    world_size = property(lambda self: self._run.ctx.world_size if self._run else 1)
    is_global_zero = property(lambda self: self.global_rank == 0)
    max_epochs = property(lambda self: self.cfg.max_epochs)
    max_steps = property(lambda self: self.cfg.max_steps)
    log_every_n_steps = property(lambda self: self.cfg.log_every_n_steps)
    @property
    def accumulate_grad_batches(self) -> int:
        return self._run.accumulate_grad_batches if self._run is not None else self.cfg.accumulate_grad_batches

    @accumulate_grad_batches.setter
    def accumulate_grad_batches(self, value: int) -> None:
        """During a fit (GradientAccumulationScheduler, at an epoch's start); else Trainer(...)."""
        if self._run is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"trainer.accumulate_grad_batches = {value!r}: set an int >= 1 during a fit (at an "
                             "epoch's start, as GradientAccumulationScheduler does), or pass "
                             "Trainer(accumulate_grad_batches=...)")
        self._run.accumulate_grad_batches = value
    precision = property(lambda self: self.cfg.precision)
    val_check_interval = property(lambda self: self.cfg.val_check_interval)
    check_val_every_n_epoch = property(lambda self: self.cfg.check_val_every_n_epoch)
    # raytrainer's own: the step the loggers' rows carry now (Lightning's internal
    # _batches_that_stepped), and whether this training batch is a logging step
    logger_step = property(lambda self: self._run.progress.batches_stepped if self._run else 0)
    logs_this_step = property(lambda self: self._run is not None and self._run.logs_this_step())
    sanity_checking = property(lambda self: self._run.sanity_checking if self._run else False)
    is_last_batch = property(lambda self: self._run.is_last_batch if self._run else False)
    num_sanity_val_batches = property(lambda self: list(self._run.num_sanity_val_batches) if self._run else [])
    num_nodes = property(lambda self: self.cfg.num_nodes)
    num_devices = property(lambda self: self._run.ctx.world_size // self.cfg.num_nodes if self._run
                           else self.cfg.devices if isinstance(self.cfg.devices, int) else 1)
    # not set: 1 with min_steps (should_stop is re-checked after an epoch), else 0 (Lightning's)
    min_epochs = property(lambda self: self.cfg.min_epochs if self.cfg.min_epochs is not None
                          else int(self.cfg.min_steps is not None))
    min_steps = property(lambda self: self.cfg.min_steps)
    default_root_dir = property(lambda self: self.cfg.storage_path)
    gradient_clip_val = property(lambda self: self.cfg.gradient_clip_val)
    gradient_clip_algorithm = property(lambda self: self.cfg.gradient_clip_algorithm)
    training = property(lambda self: self.state.stage == "train")
    validating = property(lambda self: self.state.stage == "validate")
    testing = property(lambda self: self.state.stage == "test")
    predicting = property(lambda self: self.state.stage == "predict")

    @property
    def state(self) -> TrainerState:
        if self._run is None:
            return TrainerState()
        return TrainerState(fn=self._run.stage, stage=self._run.metrics.stage)

    @property
    def predict_loop(self):
        """Lightning's ``trainer.predict_loop``: ``predictions``, ``current_batch_indices``,
        ``epoch_batch_indices`` of this rank (what prediction writers read)."""
        return self._run.predict_loop if self._run is not None else None

    @property
    def strategy(self) -> Strategy | None:
        """The run's strategy (Lightning's ``trainer.strategy``): ``broadcast``, ``barrier``,
        ``reduce``, ``root_device``, ... None before the first run."""
        return self._run.strategy if self._run is not None else None

    @property
    def should_stop(self) -> bool:
        return self._run.should_stop if self._run is not None else self._should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        if self._run is not None:
            self._run.set_should_stop(bool(value))
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
    def progress_sink(self):
        """raytrainer's: where the progress bar sends its state when the driver draws it (a Ray
        fit's rank 0); None: it draws in this process."""
        return self._run.ctx.progress_sink if self._run is not None else None

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
        """During a run, the run's loggers; off global rank 0 they do nothing (as in Lightning)."""
        return self._run.visible_loggers if self._run is not None else self._loggers

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
    def model(self):
        """The module as the strategy wrapped it (DDP, FSDP) during a run; None outside one."""
        return self._run.strategy.model if self._run is not None else None

    @property
    def lightning_module(self):
        """The module of the stage in progress, or of the last one (its weights trained there)."""
        return self._run.module if self._run is not None else self._module

    @property
    def datamodule(self):
        """The datamodule of the stage in progress; between stages, the last one given (a stage
        without one leaves it attached, as in Lightning)."""
        run_dm = self._run.datamodule if self._run is not None else None
        return run_dm if run_dm is not None else self._datamodule

    @property
    def estimated_stepping_batches(self) -> float:
        """Optimizer steps the fit will take (for OneCycleLR-style schedulers)."""
        n = self.num_training_batches
        per_epoch = -(-n // self.cfg.accumulate_grad_batches) if n != float("inf") else float("inf")
        by_epochs = per_epoch * self.cfg.max_epochs if self.cfg.max_epochs != -1 else float("inf")
        return by_epochs if self.cfg.max_steps == -1 else min(self.cfg.max_steps, by_epochs)

    def __getstate__(self):  # a Trainer travels to Ray workers without its finished run
        return {**self.__dict__, "_run": None, "_module": None}  # the stage's module travels on its own


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
