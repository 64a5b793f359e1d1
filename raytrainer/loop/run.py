"""Run: what one fit/validate/test/predict call holds while it runs, declared in ``__init__``.

The loop (fit.py, evaluate.py) drives a Run and decides *when* everything happens; the Run knows
*how*: optimizer steps, backward, schedulers, checkpoint saves. The loop's position lives in
``progress`` (saved in every checkpoint: state.py) and what happened since the last checkpoint
boundary in ``boundary``; both are small declared records the loop advances. Every other
attribute is set here, by the Run's own methods. The Trainer's Lightning attributes
(``global_step``, ``callback_metrics``...) read from the Run; the Module's ``self.log`` and manual
optimization calls come to it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from raytrainer import redaction
from raytrainer.checkpoint import lightning_file, store
from raytrainer.checkpoint.format import checkpoint_uri
from raytrainer.checkpoint.writer import CheckpointWriter
from raytrainer.errors import NonFiniteLossError
from raytrainer.loggers._folder import versions_record
from raytrainer.loggers.base import off_rank_zero
from raytrainer.loop import state
from raytrainer.loop.evaluate import PredictLoop
from raytrainer.loop.hooks import Hooks, merge_callbacks
from raytrainer.loop.metrics import MetricCollector
from raytrainer.loop.optim import OptimizerHandle, SchedulerConfig, parse_optimizers
from raytrainer.loop.precision import build_precision
from raytrainer.loop.strategy import build_strategy, noting_the_batch
from raytrainer.data import DataModule
from raytrainer.module import Module, is_overridden, takes_batch_idx
from raytrainer.profiler import CHECKPOINT_SAVE, CHECKPOINT_WAIT, OPTIMIZER, NoProfiler
from raytrainer.utilities import move_to_device


@dataclass
class Progress:
    """Where the loop stands (Lightning's loop counters); saved in every checkpoint."""
    global_step: int = 0           # optimizer steps taken
    current_epoch: int = 0
    batches_done: int = 0          # batches of current_epoch consumed
    epoch_finished: bool = False   # True at an epoch-end boundary, until the next epoch starts
    # Lightning's _batches_that_stepped, the loggers' step: batches that closed an accumulation
    # window (every batch in manual optimization, where global_step counts optimizer steps)
    batches_stepped: int = 0
    # max_steps ended the fit inside current_epoch after running its end (loop/fit.py): Lightning's
    # current_epoch reads one more. Never saved: checkpoints resume inside the epoch.
    epoch_cut_short: bool = False

    @property
    def lightning_epoch(self) -> int:
        """``trainer.current_epoch`` as Lightning counts it."""
        return self.current_epoch + self.epoch_cut_short

    def position(self) -> tuple[int, bool]:
        """What identifies a checkpoint: two saves at one position hold the same state."""
        return self.global_step, self.epoch_finished


@dataclass
class Boundary:
    """What happened since the last checkpoint boundary (fit.py's ``checkpoint_boundary``)."""
    kind: str | None = None        # "step" | "epoch" while on_checkpoint_boundary runs
    validated: bool = False        # a validation ran: its metrics are reported there
    checkpoint: str | None = None  # a checkpoint saved there: reported with the metrics


class Run:
    def __init__(self, trainer, module, ctx, stage: str, datamodule=None, profiler=None):
        self.trainer = trainer
        self.module = module
        self.ctx = ctx
        self.cfg = trainer.cfg
        self.stage = stage
        self.datamodule = datamodule
        self.device = ctx.device
        self.profiler = profiler if profiler is not None else NoProfiler()
        self.metrics = MetricCollector(ctx, module)
        callbacks = merge_callbacks(trainer.callbacks, module.configure_callbacks())
        if ctx.global_rank != 0:
            # Rank zero at the boundary: other ranks have no loggers and no progress bar at all.
            callbacks = [cb for cb in callbacks if not getattr(cb, "rank_zero_only", False)]
        self.callbacks = callbacks
        # Predictions are kept for the caller, or for a writer that writes them at the epoch's end.
        self.predict_loop = PredictLoop(keep=trainer._return_predictions or any(
            getattr(cb, "keeps_predictions", False) for cb in callbacks))
        self.loggers = list(trainer._loggers) if ctx.global_rank == 0 else []
        # What modules and callbacks see as trainer.loggers: elsewhere than on rank zero, the same
        # loggers doing nothing (Lightning's rank_zero_only methods and dummy experiment).
        self.visible_loggers = self.loggers if ctx.global_rank == 0 else [off_rank_zero(lg) for lg in trainer._loggers]
        self.hooks = Hooks(trainer, module, self.callbacks, self.profiler)
        self.precision = build_precision(self.cfg.precision, self.device)
        self.writer = CheckpointWriter(asynchronous=self.cfg.async_checkpoint, policy=self.cfg.checkpoint_retry)
        # Distributed only for training: evaluation needs no gradient sync, and each rank keeps
        # the full weights.
        self.strategy = build_strategy(self.cfg.strategy, module, self.device, ctx,
                                       distributed=ctx.world_size > 1 and stage == "fit",
                                       sync_batchnorm=self.cfg.sync_batchnorm)
        self.training_step = None  # the strategy's training step (setup_strategy)
        # on_before_batch_transfer, transfer_batch_to_device, on_after_batch_transfer: the
        # datamodule's where it overrides one (Lightning's choice), else the module's
        self.transfer_hooks = tuple(_batch_hook(name, module, datamodule) for name in _TRANSFER_HOOKS)
        overridden = any(is_overridden(name, obj, base) for obj, base in ((module, Module), (datamodule, DataModule))
                         if obj is not None for name in _TRANSFER_HOOKS)
        # batch_to_device(batch, dataloader_idx): through the hooks; the defaults as one call
        self.batch_to_device = self._through_transfer_hooks if overridden else self._move_batch
        self.clipping_overridden = is_overridden("configure_gradient_clipping", module, Module)
        self.optimizer_step_overridden = is_overridden("optimizer_step", module, Module)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.scheduler_configs: list[SchedulerConfig] = []
        self.optimizer_handles: list[OptimizerHandle] = []
        # validate/test/predict keep the counters the trainer's last fit left (Lightning's loops
        # are the trainer's): self.global_step in test_step reads the trained steps.
        self.progress = Progress() if stage == "fit" else Progress(**trainer._counters())
        self.boundary = Boundary()
        # trainer.accumulate_grad_batches: a callback may change it at an epoch's start
        # (GradientAccumulationScheduler); the loop reads it there.
        self.accumulate_grad_batches: int = self.cfg.accumulate_grad_batches
        self.num_training_batches: float = math.inf
        self.num_val_batches: list[float] = []   # per validation loader, after limit_val_batches
        self.epoch_data_state: dict | None = None  # RNG at the epoch's start (mid-epoch resume)
        self.resume_rng: dict | None = None        # the checkpoint's RNG, restored after the skip
        self.should_stop = False
        self.noted_min_not_met = False   # should_stop before min_epochs/min_steps: said once
        self.resumed = False             # the fit continues from a checkpoint (no sanity check)
        self.sanity_checking = False
        self.is_last_batch = False       # the batch in progress is the epoch's last
        self.preempted: str | None = None  # the signal that stopped the fit (loop/preemption.py)
        self.last_saved_position: tuple[int, bool] | None = None
        self.recent_losses: list[tuple[int, torch.Tensor]] = []  # since the last finiteness check
        self.eval_batches_seen: dict[int, int] = {}  # per eval loader, in this run: the loggers' step

    # ------------------------------------------------------------------ setup
    def setup_strategy(self) -> None:
        """Place (and for training, wrap) the model; after the module's own setup()."""
        self.strategy.setup()
        self.training_step = noting_the_batch(self.strategy.step_fn("training_step"), "training_step",
                                              takes_batch_idx(self.module.training_step))

    @property
    def num_sanity_val_batches(self) -> list[float]:
        steps = self.cfg.num_sanity_val_steps
        return [min(math.inf if steps == -1 else steps, n) for n in self.num_val_batches]

    def set_data_sizes(self, num_training_batches: float, num_val_batches: list[float]) -> None:
        self.num_training_batches = num_training_batches
        self.num_val_batches = list(num_val_batches)

    def epoch_iterator(self, train) -> Any:
        """The iterator over the rest of the current epoch's batches (``TrainData``); keeps the
        RNG state at the epoch's start, which a mid-epoch checkpoint saves."""
        start = self.progress.batches_done
        it, self.epoch_data_state = train.epoch_iterator(
            self.progress.current_epoch, start, self.epoch_data_state if start else None,
            self.resume_rng if start else None)
        self.resume_rng = None
        return it

    def configure_optimizers(self) -> None:
        module = self.module
        if not module.automatic_optimization:
            # The loop never clips or accumulates for a module that steps its own optimizers:
            # refuse the arguments instead of silently ignoring them (as Lightning does).
            for arg, off in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
                if getattr(self.cfg, arg) != off:
                    raise ValueError(f"Trainer({arg}={getattr(self.cfg, arg)!r}) is not supported with "
                                     f"manual optimization ({type(module).__name__}."
                                     "automatic_optimization = False): call self.clip_gradients(...) "
                                     "or accumulate in training_step instead")
            if not is_overridden("configure_optimizers", module, Module):
                return  # manual optimization without optimizers of ours to manage
        self.optimizers, self.scheduler_configs = parse_optimizers(module.configure_optimizers())
        self.optimizer_handles = [OptimizerHandle(o, self) for o in self.optimizers]
        self.strategy.set_optimizers(self.optimizers)
        if module.automatic_optimization and len(self.optimizers) > 1:
            raise ValueError("configure_optimizers() returned several optimizers: set "
                             "self.automatic_optimization = False in __init__ and step them in "
                             "training_step (manual optimization), as in Lightning")
        if module.automatic_optimization and not self.optimizers:
            raise TypeError("configure_optimizers() returned no optimizer")

    # ------------------------------------------------------------------ what modules call
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Automatic optimization's backward and ``self.manual_backward``: the loss scaled by the
        precision (fp16's GradScaler), then the hooks and ``module.backward`` (Lightning's order)."""
        hooks = self.hooks  # a hook nobody overrides is None: not called at all (every step)
        loss = self.precision.scale_loss(loss)
        if hooks.on_before_backward is not None:
            hooks.on_before_backward(loss)
        self.module.backward(loss, *args, **kwargs)
        if hooks.on_after_backward is not None:
            hooks.on_after_backward()

    def clip_gradients(self, optimizer, clip_val=None, algorithm=None) -> None:
        """``self.clip_gradients``: Lightning's rules (the Trainer's values when None; both set
        and different is an error, a silent override either way would surprise)."""
        cfg = self.cfg
        for name, given, configured in (("gradient_clip_val", clip_val, cfg.gradient_clip_val),
                                        ("gradient_clip_algorithm", algorithm, cfg.gradient_clip_algorithm)):
            if given is not None and configured is not None and given != configured:
                raise ValueError(f"Trainer({name}={configured!r}) and clip_gradients({name}={given!r}) "
                                 "disagree: set only one of them")
        clip_val = cfg.gradient_clip_val if clip_val is None else clip_val
        if not clip_val:
            return
        algorithm = algorithm or cfg.gradient_clip_algorithm or "norm"
        optimizer = getattr(optimizer, "optimizer", optimizer)  # the handle or the optimizer
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_val)

    def step_optimizer(self, optimizer, closure=None, **kwargs: Any) -> Any:
        """``optimizer.step(closure)`` through the handle (``self.optimizers()``, ``optimizer_step``):
        the closure, then unscale, ``on_before_optimizer_step`` and (automatic optimization)
        ``configure_gradient_clipping``, then the update. In manual optimization each call is a
        global step; in automatic optimization the loop counts the step."""
        hooks, module, cfg, precision = self.hooks, self.module, self.cfg, self.precision
        automatic = module.automatic_optimization
        # The default configure_gradient_clipping does nothing without gradient_clip_val: not
        # called then (every step counts on a small model), as if it had been.
        clipping = automatic and (cfg.gradient_clip_val or self.clipping_overridden)

        def after_closure() -> None:
            precision.unscale(optimizer)  # hooks and clipping must see true gradients
            if hooks.on_before_optimizer_step is not None:
                hooks.on_before_optimizer_step(optimizer)
            if clipping:
                module.configure_gradient_clipping(optimizer, cfg.gradient_clip_val, cfg.gradient_clip_algorithm)

        with self.profiler.region(OPTIMIZER):
            out = precision.optimizer_step(optimizer, closure, after_closure, automatic, **kwargs)
        if not automatic:
            self.progress.global_step += 1
            self.profiler.step()
        return out

    # ------------------------------------------------------------------ what the loop calls
    def optimizer_step(self, batch_idx: int, closure) -> None:
        """One automatic step: the module's ``optimizer_step`` (Lightning's default steps the
        optimizer with the closure; an override may warm the LR up first)."""
        if not self.optimizer_step_overridden:  # what the default does, without its two calls
            self.step_optimizer(self.optimizers[0], closure)
            return
        self.module.optimizer_step(self.progress.current_epoch, batch_idx, self.optimizer_handles[0], closure)
        closure.check_called()

    def zero_grad(self, batch_idx: int) -> None:
        """Where Lightning clears gradients: after the first training_step of an accumulation
        window, before its backward (so the last step's gradients stay readable until then, in
        on_train_batch_end and callbacks, as in Lightning)."""
        hooks, module, epoch = self.hooks, self.module, self.progress.current_epoch
        for optimizer in self.optimizers:
            if hooks.on_before_zero_grad is not None:
                hooks.on_before_zero_grad(optimizer)
            module.optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _move_batch(self, batch: Any, dataloader_idx: int = 0) -> Any:
        return move_to_device(batch, self.device)

    def _through_transfer_hooks(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """The batch on the device through the three transfer hooks (the datamodule's where it
        overrides one, as in Lightning)."""
        before, transfer, after = self.transfer_hooks
        return after(transfer(before(batch, dataloader_idx), self.device, dataloader_idx), dataloader_idx)

    def step_schedulers(self, interval: str, plateau: bool) -> None:
        """Step every scheduler of ``interval`` whose frequency divides the step/epoch count: the
        ReduceLROnPlateau ones (``plateau``) or the others. Lightning steps the others as soon as
        the step (the epoch's last batch) is done, before validation; plateau schedulers after
        it, since they read its metrics. In manual optimization the module steps its schedulers
        itself (as in Lightning)."""
        if not self.scheduler_configs or not self.module.automatic_optimization:
            return
        count = self.progress.global_step if interval == "step" else self.progress.current_epoch + 1
        for cfg in self.scheduler_configs:
            if cfg.interval != interval or count % cfg.frequency or cfg.is_plateau != plateau:
                continue
            if cfg.is_plateau:
                metrics = self.metrics.callback_metrics()
                if cfg.monitor not in metrics:
                    if not cfg.strict:
                        continue
                    raise KeyError(f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged; "
                                   f"logged metrics: {sorted(metrics)}. Log it with self.log({cfg.monitor!r}, "
                                   "...), fix the 'monitor' name, or set 'strict': False in the scheduler config")
                self.module.lr_scheduler_step(cfg.scheduler, float(metrics[cfg.monitor]))
            else:
                self.module.lr_scheduler_step(cfg.scheduler, None)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Keep the step's loss (on the device) for the next finiteness check."""
        self.recent_losses.append((self.progress.global_step, loss.detach()))

    def check_finite_losses(self) -> None:
        """Raise at the first non-finite loss since the last check (one host sync for all of
        them). Runs on logging steps and before every checkpoint snapshot, so a checkpoint of
        weights trained on a NaN/inf loss is never committed."""
        if not self.recent_losses:
            return
        steps, losses = zip(*self.recent_losses)
        self.recent_losses = []
        # The values themselves, tested on the host: two tensor ops (one for a single loss, as
        # with log_every_n_steps=1) instead of stack, cast, isfinite and tolist on every check.
        # (A loss may have any shape with one element, e.g. (1,): flatten before reading.)
        values = [losses[0].item()] if len(losses) == 1 else torch.stack(losses).flatten().tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is None:
            return
        raise NonFiniteLossError(
            f"the training loss was {values[bad]} at step {steps[bad]} (epoch {self.progress.current_epoch}); "
            "training stopped and no checkpoint of the weights after it was committed. Lower the learning "
            "rate, clip gradients (gradient_clip_val), check the data for NaN/inf, or use "
            "precision='bf16-mixed' instead of '16-mixed'; resume from the last checkpoint with ckpt_path='last'")

    def logs_this_step(self) -> bool:
        """The training batch in progress logs its step values (Lightning's should_update_logs:
        every log_every_n_steps, and once should_stop is set). With several ranks only the former:
        logging may reduce across ranks, and should_stop set on one rank alone (a module's own
        condition) would leave the others out of that collective."""
        return (self.progress.batches_stepped + 1) % self.cfg.log_every_n_steps == 0 or (
            self.should_stop and self.ctx.world_size == 1)

    def log_hyperparams(self) -> None:
        """The module's and datamodule's hparams (redacted) and the model's graph, to the loggers
        (``enable_autolog_hparams``)."""
        if not self.loggers or not self.cfg.enable_autolog_hparams:
            return
        hparams = redaction.run_hparams(self.module, self.datamodule)
        for lg in self.loggers:
            lg.log_hyperparams(hparams)
            lg.log_graph(self.module)  # TensorBoardLogger(log_graph=True): example_input_array traced

    def log_to_loggers(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            # Lightning's logged_metrics: what was logged, without the "epoch" every row carries
            self.metrics.logged_metrics.update({k: v for k, v in metrics.items() if k != "epoch"})
            for lg in self.loggers:
                lg.log_metrics(metrics, step)

    def set_should_stop(self, value: bool = True, preempted_by: str | None = None) -> None:
        """``trainer.should_stop = value`` (EarlyStopping, a module); ``preempted_by``: the signal
        that stopped the fit (loop/preemption.py)."""
        self.should_stop = value
        if preempted_by is not None:
            self.preempted = preempted_by

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_uri(self) -> str:
        """Where a checkpoint of the current position goes (deterministic: step and boundary)."""
        return checkpoint_uri(self.cfg, *self.progress.position(), sharded=self.strategy.sharded_checkpoint)

    def saved_current_position(self) -> bool:
        return self.last_saved_position == self.progress.position()

    def save_checkpoint(self, after_commit: list | None = None) -> str:
        """Snapshot the current state as ``checkpoints/step=....ckpt`` and return its URI; once per
        position (a second save there only runs ``after_commit``). The commit completes in the
        background (``Trainer(async_checkpoint=True)``); ``after_commit`` runs once it has."""
        self.check_finite_losses()
        uri = self.checkpoint_uri()
        if self.saved_current_position():
            if after_commit:  # e.g. a second ModelCheckpoint at the same boundary: its retention
                self.writer.submit(lambda: None, list(after_commit), f"retention after {uri}")
            return uri
        with self.profiler.region(CHECKPOINT_WAIT):
            self.writer.wait()  # the commit in flight (or its failure) comes first
        with self.profiler.region(CHECKPOINT_SAVE):
            store.save(uri, state.checkpoint_state(self), self.cfg.storage_options, self.ctx,
                       meta={"fit_token": getattr(self.ctx, "fit_token", None),
                             "logger_versions": versions_record(self.loggers)}, writer=self.writer,
                       after_commit=after_commit, sharded=self.strategy.sharded_checkpoint)
        self.last_saved_position = self.progress.position()
        for lg in self.loggers:
            lg.save()
        self.boundary.checkpoint = uri  # reported with the boundary's metrics (fit.py)
        return uri

    def export_checkpoint(self, path: str, weights_only: bool = False) -> str:
        """The current state as one Lightning ``.ckpt`` file at ``path`` (any fsspec URI); every
        rank calls this (gathering the state is a collective), rank 0 writes."""
        if self.strategy.sharded_checkpoint:
            raise ValueError(f"save_checkpoint({path!r}): a sharded FSDP state is a folder of shards, not one "
                             "file; use strategy='fsdp' (full state) to export a .ckpt, or save_checkpoint() "
                             "for the run's sharded checkpoint")
        snapshot = state.checkpoint_state(self)
        if self.ctx.global_rank == 0:
            lightning_file.write_ckpt(path, lightning_file.lightning_dict(snapshot, weights_only),
                                      self.cfg.storage_options)
        self.ctx.barrier()
        return path

    def wait_for_commits(self) -> None:
        """Every checkpoint committed (or its failure raised): before fit returns."""
        with self.profiler.region(CHECKPOINT_WAIT):
            self.writer.wait()

    def restore(self, checkpoint: dict, weights_only: bool = False, own_run: bool = True) -> None:
        """Load a checkpoint (loop/state.py); ``weights_only`` for validate/test/predict."""
        position = state.restore(self, checkpoint, weights_only=weights_only, own_run=own_run)
        self.resumed = not weights_only
        if position is not None:
            self.epoch_data_state = position.epoch_data_state
            self.resume_rng = position.resume_rng
            self.last_saved_position = position.saved_position

    def metrics_for_report(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.metrics.callback_metrics().items() if v.numel() == 1}
        out.update(epoch=self.progress.current_epoch, step=self.progress.global_step)
        return out


_TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _batch_hook(name: str, module: Module, datamodule):
    if datamodule is not None and is_overridden(name, datamodule, DataModule):
        if is_overridden(name, module, Module):
            warnings.warn(f"{name} is overridden in both {type(module).__name__} and {type(datamodule).__name__}: "
                          "the datamodule's is used (as in Lightning)", stacklevel=2)
        return getattr(datamodule, name)
    return getattr(module, name)
