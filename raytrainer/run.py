"""Run: what one fit/validate/test/predict call holds while it runs.

The loop (loop.py, evaluation.py) drives a Run; the Trainer's Lightning-style attributes
(``global_step``, ``callback_metrics``, ...) read from it; the Module's ``self.log`` and manual
optimization calls go to it. The Run never decides *when* anything happens — that is the loop's.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from raytrainer import checkpoint as ckpt_io
from raytrainer import redaction
from raytrainer.callbacks.base import Callback
from raytrainer.checkpoint_writer import CheckpointWriter
from raytrainer.evaluation import run_evaluation
from raytrainer.metrics import MetricCollector
from raytrainer.optim import OptimizerHandle, SchedulerConfig, parse_optimizers
from raytrainer.precision import build_precision
from raytrainer.utilities import capture_rng_state, restore_rng_state

CHECKPOINT_FORMAT_VERSION = 1


class Run:
    def __init__(self, trainer, module, ctx, stage: str, datamodule=None):
        self.trainer = trainer
        self.module = module
        self.ctx = ctx
        self.cfg = trainer.cfg
        self.stage = stage
        self.datamodule = datamodule
        self.device = ctx.device
        self.metrics = MetricCollector(ctx.all_reduce, ctx.world_size)
        self.callbacks = _merge_callbacks(trainer.callbacks, module.configure_callbacks())
        if ctx.global_rank != 0:
            # Rank zero at the boundary: other ranks have no loggers and no progress bar at all.
            self.callbacks = [cb for cb in self.callbacks if not getattr(cb, "rank_zero_only", False)]
        self.loggers = list(trainer._loggers) if ctx.global_rank == 0 else []
        self.precision = build_precision(self.cfg.precision, self.device)
        self.writer = CheckpointWriter(asynchronous=self.cfg.async_checkpoint, policy=self.cfg.checkpoint_retry)
        self.model: torch.nn.Module = module  # what forward passes go through (DDP wrapper or module)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.scheduler_configs: list[SchedulerConfig] = []
        self.optimizer_handles: list[OptimizerHandle] = []
        # Loop counters (saved in checkpoints).
        self.global_step = 0
        self.current_epoch = 0
        self.batches_done = 0          # batches of current_epoch consumed
        self.epoch_finished = False    # True at an epoch-end boundary
        self.epoch_data_state: dict | None = None  # RNG at the epoch's start (mid-epoch resume)
        self.should_stop = False
        self.preempted: str | None = None  # the signal that stopped the fit (preemption.py)
        self.num_training_batches: float = math.inf
        self.validated_this_boundary = False
        self.boundary = None           # "step" | "epoch" while on_checkpoint_boundary runs
        self.last_saved_position = None
        self.boundary_checkpoint: str | None = None
        self.recent_losses: list[tuple[int, torch.Tensor]] = []  # since the last finiteness check
        self.saved_checkpoints: list[str] = []

    # ------------------------------------------------------------------ hooks
    @property
    def callbacks(self) -> list[Callback]:
        return self._callbacks

    @callbacks.setter
    def callbacks(self, callbacks: list[Callback]) -> None:
        self._callbacks = callbacks
        self._implemented: dict[str, tuple] = {}  # hook -> (module fn, callback fns)
        self.hooks = _Hooks(self)

    def call(self, hook: str, *args: Any) -> Any:
        """Module hook, then each callback's (the documented order)."""
        fn = getattr(self.hooks, hook)
        return fn(*args) if fn is not None else None

    def call_module(self, hook: str, *args: Any) -> Any:
        module_fn = self._implementations(hook)[0]
        return module_fn(*args) if module_fn is not None else None

    def call_callbacks(self, hook: str, *args: Any) -> None:
        for fn in self._implementations(hook)[1]:
            fn(self.trainer, self.module, *args)

    def _implementations(self, hook: str) -> tuple:
        """Who implements ``hook``, looked up once per run: the module's method unless it is
        Module's no-op default, and the callbacks whose method is not Callback's no-op. The step
        loop fires six hooks per batch; calling every inherited no-op of the module and of each
        callback every step would be most of the loop's own overhead."""
        entry = self._implemented.get(hook)
        if entry is None:
            module_fn = getattr(self.module, hook, None)
            if _is_default(module_fn, _module_base(), hook):
                module_fn = None
            callback_fns = [fn for fn in (getattr(cb, hook) for cb in self.callbacks)
                            if not _is_default(fn, Callback, hook)]
            self._implemented[hook] = entry = (module_fn, callback_fns)
        return entry

    def _dispatcher(self, hook: str):
        """One function running ``hook``'s implementations in order, or None when there are none."""
        module_fn, callback_fns = self._implementations(hook)
        if not callback_fns:
            return module_fn
        trainer, module = self.trainer, self.module

        def dispatch(*args: Any) -> Any:
            out = module_fn(*args) if module_fn is not None else None
            for fn in callback_fns:
                fn(trainer, module, *args)
            return out
        return dispatch

    def call_datamodule(self, hook: str, *args: Any) -> None:
        fn = getattr(self.datamodule, hook, None) if self.datamodule is not None else None
        if fn is not None:
            fn(*args)

    def evaluate(self, loaders: list, stage: str) -> dict[str, float]:
        """One evaluation pass (evaluation.py), called through the run so a profiler can time it."""
        return run_evaluation(self, loaders, stage)

    def log_to_loggers(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            for lg in self.loggers:
                lg.log_metrics(metrics, step)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> None:
        from raytrainer.module import Module
        if not self.module.automatic_optimization:
            # The loop never clips or accumulates for a module that steps its own optimizers:
            # refuse the arguments instead of silently ignoring them (as Lightning does).
            for arg, off in (("gradient_clip_val", None), ("accumulate_grad_batches", 1)):
                if getattr(self.cfg, arg) != off:
                    raise ValueError(f"Trainer({arg}={getattr(self.cfg, arg)!r}) is not supported with "
                                     f"manual optimization ({type(self.module).__name__}."
                                     "automatic_optimization = False): call self.clip_gradients(...) "
                                     "or accumulate in training_step instead")
        if not self.module.automatic_optimization and \
                type(self.module).configure_optimizers is Module.configure_optimizers:
            return  # manual optimization without optimizers of ours to manage
        self.optimizers, self.scheduler_configs = parse_optimizers(self.module.configure_optimizers())
        self.optimizer_handles = [OptimizerHandle(o, self) for o in self.optimizers]

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        hooks = self.hooks  # a hook nobody overrides is None: not called at all (every step)
        if hooks.on_before_backward is not None:
            hooks.on_before_backward(loss)
        self.precision.backward(loss)
        if hooks.on_after_backward is not None:
            hooks.on_after_backward()

    def clip_gradients(self, optimizer, clip_val=None, algorithm=None) -> None:
        clip_val = self.cfg.gradient_clip_val if clip_val is None else clip_val
        if not clip_val:
            return
        algorithm = algorithm or self.cfg.gradient_clip_algorithm
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, clip_val)

    def optimizer_step(self, optimizer) -> None:
        """Unscale, hooks, clip, step, zero_grad: one automatic-optimization step."""
        hooks = self.hooks  # a hook nobody overrides is None: not called at all (every step)
        self.precision.unscale(optimizer)  # hooks and clipping must see true gradients
        if hooks.on_before_optimizer_step is not None:
            hooks.on_before_optimizer_step(optimizer)
        if self.cfg.gradient_clip_val:
            self.clip_gradients(optimizer)
        self.precision.step(optimizer)
        if hooks.on_before_zero_grad is not None:
            hooks.on_before_zero_grad(optimizer)
        optimizer.zero_grad(set_to_none=True)

    def manual_optimizer_step(self, optimizer, closure=None) -> None:
        self.precision.unscale(optimizer)
        self.call("on_before_optimizer_step", optimizer)
        self.precision.step(optimizer, closure)
        self.precision.update()
        self.global_step += 1

    def step_schedulers(self, interval: str) -> None:
        """Step every scheduler of ``interval`` whose frequency divides the step/epoch count.
        In manual optimization the module steps its schedulers itself (as in Lightning)."""
        if not self.scheduler_configs or not self.module.automatic_optimization:
            return
        count = self.global_step if interval == "step" else self.current_epoch + 1
        for cfg in self.scheduler_configs:
            if cfg.interval != interval or count % cfg.frequency:
                continue
            if cfg.is_plateau:
                metrics = self.metrics.callback_metrics()
                if cfg.monitor not in metrics:
                    if not cfg.strict:
                        continue
                    raise KeyError(f"ReduceLROnPlateau monitors {cfg.monitor!r}, which was not logged; "
                                   f"logged metrics: {sorted(metrics)}. Log it with self.log({cfg.monitor!r}, "
                                   "...), fix the 'monitor' name, or set 'strict': False in the scheduler config")
                cfg.scheduler.step(float(metrics[cfg.monitor]))
            else:
                cfg.scheduler.step()

    # ------------------------------------------------------------------ checkpoint state
    def position(self) -> tuple[int, bool]:
        return self.global_step, self.epoch_finished

    def checkpoint_state(self) -> dict:
        """The full state, in Lightning's key names where Lightning has one."""
        state = {
            "raytrainer_format_version": CHECKPOINT_FORMAT_VERSION,
            "state_dict": self.strategy.checkpoint_model_state(),  # full, or this rank's shards
            "optimizer_states": self.strategy.checkpoint_optimizer_states(),
            "lr_schedulers": [c.scheduler.state_dict() for c in self.scheduler_configs],
            "precision": self.precision.state_dict(),
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "loops": {"batches_done": self.batches_done, "epoch_finished": self.epoch_finished},
            "rank_state": {"rng": capture_rng_state(), "epoch_data_state": self.epoch_data_state},
            "metrics": self.metrics.state_dict(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
            "loggers": [lg.state_dict() for lg in self.loggers],
            "hyper_parameters": ckpt_io.plain_hparams(redaction.module_hparams(self.module)),  # no credentials
            "datamodule": self.datamodule.state_dict() if self.datamodule is not None else {},
        }
        self.call("on_save_checkpoint", state)
        return state

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
        value = values[bad]
        raise NonFiniteLossError(
            f"the training loss was {value} at step {steps[bad]} (epoch {self.current_epoch}); training "
            "stopped and no checkpoint of the weights after it was committed. Lower the learning "
            "rate, clip gradients (gradient_clip_val), check the data for NaN/inf, or use "
            "precision='bf16-mixed' instead of '16-mixed'; resume from the last checkpoint with ckpt_path='last'")

    def checkpoint_uri(self) -> str:
        """Where a checkpoint of the current position goes (deterministic: step and boundary)."""
        return ckpt_io.checkpoint_uri(self.cfg, self.global_step, self.epoch_finished)

    def save_checkpoint(self, after_commit: list | None = None) -> str:
        """Snapshot the current state as ``checkpoints/step=...`` and return its URI. The commit
        completes in the background (``Trainer(async_checkpoint=True)``); ``after_commit`` runs
        once it has."""
        self.check_finite_losses()
        uri = self.checkpoint_uri()
        if self.last_saved_position == self.position():
            if after_commit:  # e.g. a second ModelCheckpoint at the same boundary: its retention
                self.writer.submit(lambda: None, list(after_commit), f"retention after {uri}")
            return uri
        ckpt_io.save(uri, self.checkpoint_state(), self.cfg.storage_options, self.ctx,
                     meta={"fit_token": getattr(self.ctx, "fit_token", None)},
                     writer=self.writer, after_commit=after_commit, sharded=self.strategy.sharded_checkpoint)
        self.last_saved_position = self.position()
        for lg in self.loggers:
            lg.save()
        self.boundary_checkpoint = uri  # reported with the boundary's metrics (loop.py)
        return uri

    def metrics_for_report(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.metrics.callback_metrics().items() if v.numel() == 1}
        out.update(epoch=self.current_epoch, step=self.global_step)
        return out

    def restore(self, state: dict, weights_only_stage: bool = False, own_run: bool = True) -> None:
        """Load a checkpoint's state; counters and RNG only for fit (``weights_only_stage``
        is validate/test/predict, which need the weights alone). Loggers continue the
        checkpoint's logger runs only when it is ``own_run``'s (see ``Logger.load_state_dict``)."""
        self.strategy.load_model_state_dict(state["state_dict"])
        self.call("on_load_checkpoint", state)
        if weights_only_stage:
            return
        if len(state["optimizer_states"]) != len(self.optimizers):
            raise ValueError(f"the checkpoint has {len(state['optimizer_states'])} optimizer states but "
                             f"configure_optimizers() returned {len(self.optimizers)} optimizers")
        self.strategy.load_optimizer_state_dicts(state["optimizer_states"])
        for cfg, sd in zip(self.scheduler_configs, state["lr_schedulers"]):
            cfg.scheduler.load_state_dict(sd)
        self.precision.load_state_dict(state.get("precision", {}))
        by_key = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.state_key in by_key:
                cb.load_state_dict(by_key[cb.state_key])
        for lg, sd in zip(self.loggers, state.get("loggers", []) if own_run else []):
            lg.load_state_dict(sd)
        if self.datamodule is not None and state.get("datamodule"):
            self.datamodule.load_state_dict(state["datamodule"])
        self.metrics.load_state_dict(state.get("metrics", {}), self.device)
        self.global_step = state["global_step"]
        self.current_epoch = state["epoch"]
        loops = state["loops"]
        self.batches_done = loops["batches_done"]
        self.epoch_finished = loops["epoch_finished"]
        rank_states = state["rank_states"]
        # Each rank resumes its own RNG streams; with a different world size, rank 0's.
        rank_state = rank_states.get(self.ctx.global_rank, rank_states.get(0))
        self.epoch_data_state = rank_state["epoch_data_state"]
        if len(rank_states) != self.ctx.world_size:
            self._resume_on_another_world_size(len(rank_states))
        self.last_saved_position = self.position()
        if self.epoch_finished:
            # The next epoch starts fresh: its RNG capture must see the saved state.
            restore_rng_state(rank_state["rng"])
            self.current_epoch += 1
            self.batches_done = 0
            self.epoch_finished = False
            self.resume_rng = None
        else:
            self.resume_rng = rank_state["rng"]  # restored after the epoch's iterator is rebuilt

    def _resume_on_another_world_size(self, saved: int) -> None:
        """A checkpoint of ``saved`` workers resumed on a different number. Mid-epoch, the
        position is kept in *samples*: each of the ``saved`` ranks had taken ``batches_done``
        batches, so the new ranks skip as many as cover the same count (rounded down), and the
        epoch ends after as many samples as it would have. With a DistributedSampler on both sides
        (several workers each) the skipped samples are exactly those trained on: its shards
        interleave one global order. Keeping the per-rank count would retrain or skip part of
        the epoch."""
        world = self.ctx.world_size
        mapped = self.batches_done * saved // world
        if self.ctx.global_rank == 0:
            where = (f"epoch {self.current_epoch} resumes after {mapped} batches per worker "
                     f"({self.batches_done} x {saved} saved): as many samples as were already "
                     "trained on" if self.batches_done and not self.epoch_finished
                     else "it was saved at an epoch boundary")
            warnings.warn(f"resuming a checkpoint written by {saved} worker(s) on {world}: weights, "
                          f"optimizer state and counters are restored exactly; {where}. Data order "
                          f"and RNG streams differ from a {saved}-worker run, so the result is not "
                          f"bit-identical to one", stacklevel=2)
        if not self.epoch_finished:
            self.batches_done = mapped


class _Hooks:
    """``run.hooks.on_x`` runs hook ``on_x`` (the module's override, then the callbacks'), or is
    None when nothing overrides it. Resolved at first use, then a plain attribute: the step loop
    skips a hook nobody implements without even a function call."""

    def __init__(self, run: Run):
        self._run = run

    def __getattr__(self, hook: str):
        if hook.startswith("_"):
            raise AttributeError(hook)
        fn = self._run._dispatcher(hook)
        setattr(self, hook, fn)
        return fn


def _module_base() -> type:
    from raytrainer.module import Module
    return Module


def _is_default(fn: Any, base: type, hook: str) -> bool:
    """True when ``fn`` (a bound method or None) is ``base``'s no-op for ``hook`` (an
    override, or a function set on the instance, is not)."""
    return fn is None or getattr(fn, "__func__", None) is getattr(base, hook, None)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def _merge_callbacks(given: list[Callback], from_module: Any) -> list[Callback]:
    """Trainer callbacks, with those from ``configure_callbacks`` replacing same-type ones (as in
    Lightning) and appended last."""
    extra = list(from_module or [])
    if not extra:
        return list(given)
    types = {type(cb) for cb in extra}
    return [cb for cb in given if type(cb) not in types] + extra
