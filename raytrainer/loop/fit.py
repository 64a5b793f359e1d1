"""THE training loop. One implementation: in-process, in Ray Train workers and in Tune trials it is
this code; what differs is the RunContext inside ``run.ctx``. It never imports ray.

Read top to bottom: epochs -> batches -> (accumulate, clip, step) -> log -> validate ->
checkpoint boundary. The event order is documented in ``raytrainer/callbacks/base.py``. The
profiler is called at each stage (``with prof.region(...)``); with profiling off those calls
return at once.
"""
from __future__ import annotations

import logging
import math

from raytrainer.loop.closure import TrainingClosure
from raytrainer.loop.evaluate import end_epoch_in_order, run_evaluation, run_sanity_check
from raytrainer.loop.fit_data import FitData
from raytrainer.loop.preemption import handle_stop_request
from raytrainer.profiler import DATA_NEXT, DATA_START, FORWARD, LOGGING, SCHEDULERS, VALIDATION
from raytrainer.utilities import infer_batch_size

log = logging.getLogger(__name__)


def fit_loop(run, data: FitData) -> None:
    run.hooks.call("on_fit_start")
    run.log_hyperparams()  # after on_fit_start, as Lightning
    if data.val and not run.resumed:
        run_sanity_check(run, data.val)  # not when resuming: the run already passed it
    run.hooks.call("on_train_start")
    progress = run.progress
    while not _fit_done(run):
        data.reload_train_if_due()  # reload_dataloaders_every_n_epochs
        ended = train_epoch(run, data)
        if ended is INTERRUPTED:
            break  # a preemption: the epoch stays unfinished, the resumed run continues it
        if ended is CUT_SHORT:
            _end_cut_short_epoch(run)
            break
        _end_epoch(run, step_schedulers=ended is COMPLETE)
        progress.current_epoch += 1
        progress.batches_done = 0
        progress.epoch_finished = False
    run.check_finite_losses()
    run.hooks.call("on_train_end")
    run.hooks.call("on_fit_end")


def _fit_done(run) -> bool:
    cfg, progress = run.cfg, run.progress
    return ((run.should_stop and can_stop_early(run))
            or (cfg.max_steps != -1 and progress.global_step >= cfg.max_steps)
            or (cfg.max_epochs != -1 and progress.current_epoch >= cfg.max_epochs))


def can_stop_early(run) -> bool:
    """should_stop (EarlyStopping, a module) ends the fit once min_epochs and min_steps are met;
    before that training goes on (Lightning's rule), with a notice."""
    cfg, progress = run.cfg, run.progress
    min_epochs = run.trainer.min_epochs  # 1 when only min_steps is set (Lightning's rule)
    met = ((not min_epochs or progress.current_epoch >= min_epochs)
           and (not cfg.min_steps or progress.global_step >= cfg.min_steps))
    if not met and not run.noted_min_not_met:
        run.noted_min_not_met = True
        log.info("trainer.should_stop was set but min_epochs=%s / min_steps=%s are not reached yet: "
                 "training continues", cfg.min_epochs, cfg.min_steps)
    return met


# How an epoch's batches ended (train_epoch). Lightning runs the epoch's end in every case but a
# preemption, and steps epoch schedulers only after a complete epoch.
COMPLETE = "complete"          # every batch consumed
STOPPED = "stopped"            # should_stop, or on_train_batch_start returned -1: on to the next epoch
CUT_SHORT = "cut short"        # max_steps reached mid-epoch: the fit ends; its checkpoint resumes the epoch
INTERRUPTED = "interrupted"    # a preemption: no epoch end; the resumed run continues the epoch


def train_epoch(run, data: FitData) -> str:
    """Run the rest of ``progress.current_epoch``; how it ended (COMPLETE, STOPPED, ...)."""
    cfg, module, metrics, hooks, progress, prof = run.cfg, run.module, run.metrics, run.hooks, run.progress, run.profiler
    train = data.train
    start = progress.batches_done
    if start == 0:
        metrics.start_epoch("train")
    module.train()
    hooks.call("on_train_epoch_start")
    # Creating the iterator draws the epoch's shuffle seed; on a mid-epoch resume this restores
    # the epoch-start RNG, skips `start` index batches, then restores the checkpoint's RNG.
    with prof.region(DATA_START):
        it = run.epoch_iterator(train)

    n = run.num_training_batches
    accumulate = run.accumulate_grad_batches  # read after on_train_epoch_start: a callback may set it
    automatic = module.automatic_optimization
    data_region = prof.region(DATA_NEXT)
    batch_idx = start
    # With a known length, the last batch is known by index. Without one, one batch of lookahead
    # tells (an accumulation window closes at the epoch's end). Lookahead is avoided otherwise:
    # fetching batch b+1 before step b would move RNG draws of data loading across a checkpoint.
    lookahead = math.isinf(n)
    if batch_idx < n:
        with data_region:
            pending = next(it, _END)
    else:
        pending = _END
    while pending is not _END:
        batch = pending
        if lookahead:
            with data_region:
                pending = next(it, _END)
            is_last = pending is _END
        else:
            is_last = batch_idx + 1 >= n
            pending = None  # fetched at the bottom of the loop, after this step
        run.is_last_batch = is_last
        batch = run.batch_to_device(batch)
        metrics.batch_size = infer_batch_size(batch)
        # self.log defaults to per-step values from on_train_batch_start to on_train_batch_end
        # (training_step and the backward/optimizer hooks), per-epoch values elsewhere.
        metrics.in_step = True
        # hooks.on_x is None when nothing overrides on_x: a no-op hook costs no call per batch.
        if hooks.on_train_batch_start is not None and hooks.on_train_batch_start(batch, batch_idx) == -1:
            metrics.in_step = False
            return STOPPED  # the module ended the epoch early (Lightning's -1): on to epoch end
        window_done = (batch_idx + 1) % accumulate == 0 or is_last
        if automatic:
            closure = TrainingClosure(run, batch, batch_idx)
            if window_done:
                # the module's optimizer_step runs the closure inside optimizer.step (Lightning's)
                run.optimizer_step(batch_idx, closure)
                progress.global_step += 1
                prof.step()
                if run.scheduler_configs:
                    with prof.region(SCHEDULERS):
                        run.step_schedulers("step", plateau=False)
                        if is_last:  # the epoch's schedulers step with its last batch (Lightning)
                            run.step_schedulers("epoch", plateau=False)
            else:
                # Inside an accumulation window DDP must not all-reduce gradients: no_sync defers
                # the communication to the window's last backward.
                with run.strategy.no_sync():
                    closure()
            # counted once trained on (Lightning's "processed"): a checkpoint of a step that
            # raised (OnExceptionCheckpoint) trains that batch again
            progress.batches_done = batch_idx + 1
            if hooks.on_train_batch_end is not None:
                hooks.on_train_batch_end(closure.batch_end_outputs(), batch, batch_idx)
        else:
            with prof.region(FORWARD), run.precision.autocast():
                outputs = run.training_step(batch, batch_idx)
            progress.batches_done = batch_idx + 1
            window_done = True
            if hooks.on_train_batch_end is not None:
                hooks.on_train_batch_end(outputs, batch, batch_idx)
        metrics.in_step = False

        if window_done and run.logs_this_step():
            # The only per-step host syncs, and only every log_every_n_steps steps. Rows carry
            # Lightning's step: the batches that stepped before this one.
            with prof.region(LOGGING):
                run.check_finite_losses()
                step_metrics = metrics.logger_filter(metrics.step_metrics(), "train")
                step_metrics["epoch"] = float(progress.current_epoch)
                run.log_to_loggers(step_metrics, progress.batches_stepped)

        if data.val and _validation_due(run, batch_idx, is_last):
            if window_done:  # frees the gradients, unless a window is still accumulating them
                module.on_validation_model_zero_grad()
            with prof.region(VALIDATION):
                data.reload_val_if_due()
                run_evaluation(run, data.val, "validate")
            run.boundary.validated = True
        if window_done:
            if run.scheduler_configs:
                with prof.region(SCHEDULERS):  # after validation: they may monitor its metrics
                    run.step_schedulers("step", plateau=True)
            progress.batches_stepped += 1
            checkpoint_boundary(run, "step")
        batch_idx += 1
        if run.should_stop and can_stop_early(run):
            # should_stop (EarlyStopping, a module) ends the epoch here and its end runs, as in
            # Lightning; a preemption leaves it unfinished, so the resumed run continues it.
            if run.preempted is not None and not is_last:
                return INTERRUPTED
            return COMPLETE if is_last else STOPPED
        if cfg.max_steps != -1 and progress.global_step >= cfg.max_steps:
            return COMPLETE if is_last else CUT_SHORT
        if not lookahead:
            if is_last:
                pending = _END
            else:
                with data_region:
                    pending = next(it, _END)
    return COMPLETE


def _end_epoch(run, step_schedulers: bool) -> None:
    """Epoch end: hooks, epoch aggregates to the loggers, epoch schedulers, boundary."""
    _epoch_end_hooks(run)
    if step_schedulers:  # not after an epoch stopped early (Lightning's rule)
        with run.profiler.region(SCHEDULERS):  # the others stepped with the epoch's last batch
            run.step_schedulers("epoch", plateau=True)
    run.progress.epoch_finished = True
    checkpoint_boundary(run, "epoch")
    for lg in run.loggers:
        lg.save()


def _end_cut_short_epoch(run) -> None:
    """max_steps reached mid-epoch: the epoch's end runs and current_epoch moves on, as in
    Lightning. It is no checkpoint boundary: the run's checkpoints stay at its last step, inside
    the epoch, so a resume with a larger max_steps trains the rest of the epoch (Lightning's
    checkpoint would start the next one)."""
    _epoch_end_hooks(run)
    run.progress.epoch_cut_short = True
    for lg in run.loggers:
        lg.save()


def _epoch_end_hooks(run) -> None:
    # The module's hook sees this epoch's aggregates; callbacks (EarlyStopping without validation)
    # also what the module logged in its hook (evaluate.py end_epoch_in_order).
    values = run.metrics.logger_filter(end_epoch_in_order(run, "on_train_epoch_end", "train"), "train")
    if values:
        values["epoch"] = float(run.progress.current_epoch)
        with run.profiler.region(LOGGING):  # at the epoch's last step, as Lightning logs it
            run.log_to_loggers(values, run.progress.batches_stepped - 1)


def checkpoint_boundary(run, kind: str) -> None:
    """A point from which a resumed run continues exactly like this one: checkpoints go here."""
    boundary = run.boundary
    boundary.kind = kind
    run.hooks.call_callbacks("on_checkpoint_boundary")
    # A SIGTERM, Ctrl-C or Ray's drain notice, agreed on by every rank (loop/preemption.py).
    request = run.ctx.poll_stop(run.progress.global_step, kind == "epoch")
    if request is not None:
        handle_stop_request(run, request)
    boundary.kind = None
    if boundary.validated or boundary.checkpoint:
        # One report per validation or checkpoint, never per step: Ray drains reports on a poll
        # (a report is a barrier), and a Tune iteration is one validation.
        run.ctx.report(run.metrics_for_report(), boundary.checkpoint)
    boundary.checkpoint = None
    boundary.validated = False


def _validation_due(run, batch_idx: int, is_last: bool) -> bool:
    cfg = run.cfg
    if cfg.limit_val_batches == 0:
        return False
    epoch = run.progress.current_epoch
    if cfg.check_val_every_n_epoch is not None and (epoch + 1) % cfg.check_val_every_n_epoch:
        return False
    if run.should_stop and run.preempted is None and can_stop_early(run):
        return True  # stopping early mid-epoch validates first (Lightning)
    vci = cfg.val_check_interval
    if isinstance(vci, float):
        if vci == 1.0 or math.isinf(run.num_training_batches):
            return is_last
        # Lightning's rule: every int(n * interval) batches, and not at the epoch's end unless it
        # falls there (0.3 of 10 batches: after 3, 6 and 9)
        every = max(1, int(run.num_training_batches * vci))
        return (batch_idx + 1) % every == 0
    if cfg.check_val_every_n_epoch is None:  # an int interval counts batches across epochs
        return (epoch * run.num_training_batches + batch_idx + 1) % vci == 0
    return (batch_idx + 1) % vci == 0


_END = object()
