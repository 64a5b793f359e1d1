"""THE training loop. One implementation: in-process, in Ray Train workers and in Tune trials it is
this code; what differs is the RunContext inside ``run.ctx``. It never imports ray.

Read top to bottom: epochs -> batches -> (accumulate, clip, step) -> log -> validate ->
checkpoint boundary. The event order is documented in ``raytrainer/callbacks/base.py``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .data import TrainData
from .preemption import handle_stop_request
from .utilities import infer_batch_size, move_to_device


def fit_loop(run, train: TrainData, val_loaders: list) -> None:
    cfg = run.cfg
    run.num_training_batches = _num_batches(train, cfg.limit_train_batches)
    run.call("on_fit_start")
    run.call("on_train_start")
    while not _fit_done(run):
        finished_epoch = train_epoch(run, train, val_loaders)
        if not finished_epoch:
            break  # stopped mid-epoch (max_steps or should_stop): the epoch stays unfinished
        _end_epoch(run)
        run.current_epoch += 1
        run.batches_done = 0
        run.epoch_finished = False
    run.check_finite_losses()
    run.call("on_train_end")
    run.call("on_fit_end")


def _fit_done(run) -> bool:
    cfg = run.cfg
    return (run.should_stop
            or (cfg.max_steps != -1 and run.global_step >= cfg.max_steps)
            or (cfg.max_epochs != -1 and run.current_epoch >= cfg.max_epochs))


def train_epoch(run, train: TrainData, val_loaders: list) -> bool:
    """Run the rest of ``run.current_epoch``; True when all its batches were consumed."""
    cfg, module, metrics, hooks = run.cfg, run.module, run.metrics, run.hooks
    start = run.batches_done
    if start == 0:
        metrics.start_epoch("train")
    module.train()
    run.call("on_train_epoch_start")
    # Creating the iterator draws the epoch's shuffle seed; on a mid-epoch resume this restores
    # the epoch-start RNG, skips `start` index batches, then restores the checkpoint's RNG.
    it, run.epoch_data_state = train.epoch_iterator(
        run.current_epoch, start, run.epoch_data_state if start else None,
        getattr(run, "resume_rng", None) if start else None)
    run.resume_rng = None

    n = run.num_training_batches
    accumulate = cfg.accumulate_grad_batches
    automatic = module.automatic_optimization
    window_has_grad = False
    batch_idx = start
    # With a known length, the last batch is known by index. Without one, one batch of lookahead
    # tells (an accumulation window closes at the epoch's end). Lookahead is avoided otherwise:
    # fetching batch b+1 before step b would move RNG draws of data loading across a checkpoint.
    lookahead = math.isinf(n)
    pending = next(it, _END) if batch_idx < n else _END
    while pending is not _END:
        batch = pending
        if lookahead:
            pending = next(it, _END)
            is_last = pending is _END
        else:
            is_last = batch_idx + 1 >= n
            pending = None  # fetched at the bottom of the loop, after this step
        batch = move_to_device(batch, run.device)
        metrics.batch_size = infer_batch_size(batch)
        # self.log defaults to per-step values from on_train_batch_start to on_train_batch_end
        # (training_step and the backward/optimizer hooks), per-epoch values elsewhere.
        metrics.in_step = True
        # hooks.on_x is None when nothing overrides on_x: a no-op hook costs no call per batch.
        if hooks.on_train_batch_start is not None and hooks.on_train_batch_start(batch, batch_idx) == -1:
            metrics.in_step = False
            return True  # the module ended the epoch early (Lightning's -1): on to epoch end
        run.batches_done = batch_idx + 1
        steps_before = run.global_step
        window_done = (batch_idx + 1) % accumulate == 0 or is_last
        if automatic:
            outputs, backward_done = _automatic_forward_backward(run, batch, batch_idx, window_done)
            window_has_grad |= backward_done
            if window_done:
                if window_has_grad:  # a window whose every step returned None skips the step
                    for opt in run.optimizers:
                        run.optimizer_step(opt)
                    run.precision.update()
                    run.global_step += 1
                    if run.scheduler_configs:
                        run.step_schedulers("step")
                window_has_grad = False
        else:
            outputs = _manual_step(run, batch, batch_idx)
            window_done = True
        if hooks.on_train_batch_end is not None:
            hooks.on_train_batch_end(outputs, batch, batch_idx)
        metrics.in_step = False

        if run.global_step != steps_before and run.global_step % cfg.log_every_n_steps == 0:
            # The only per-step host syncs, and only every log_every_n_steps steps.
            run.check_finite_losses()
            step_metrics = metrics.logger_filter(metrics.step_metrics(), "train")
            step_metrics["epoch"] = float(run.current_epoch)
            metrics.logged_metrics.update(step_metrics)
            run.log_to_loggers(step_metrics, run.global_step)

        if val_loaders and _validation_due(run, batch_idx, is_last):
            run.evaluate(val_loaders, "validate")
            run.validated_this_boundary = True
        if window_done:
            _checkpoint_boundary(run, "step")
        batch_idx += 1
        if run.should_stop or (cfg.max_steps != -1 and run.global_step >= cfg.max_steps):
            return is_last
        if not lookahead:
            pending = next(it, _END) if not is_last else _END
    return True


def _end_epoch(run) -> None:
    """Epoch end: hooks, epoch aggregates to the loggers, epoch schedulers, boundary."""
    # The epoch's aggregates are reduced between the module's hook and the callbacks', so callbacks
    # (EarlyStopping without validation) see this epoch's values, including those the module logs
    # in its own on_train_epoch_end, as in Lightning; what callbacks log is reduced after them.
    run.call_module("on_train_epoch_end")
    values = run.metrics.end_epoch("train")
    run.call_callbacks("on_train_epoch_end")
    values.update(run.metrics.end_epoch("train"))
    values = run.metrics.logger_filter(values, "train")
    if values:
        values["epoch"] = float(run.current_epoch)
        run.metrics.logged_metrics.update(values)
        run.log_to_loggers(values, run.global_step)
    run.step_schedulers("epoch")
    run.epoch_finished = True
    _checkpoint_boundary(run, "epoch")
    for lg in run.loggers:
        lg.save()


def _checkpoint_boundary(run, kind: str) -> None:
    """A point from which a resumed run continues exactly like this one: checkpoints go here."""
    run.boundary = kind
    run.call_callbacks("on_checkpoint_boundary")
    # A SIGTERM, Ctrl-C or Ray's drain notice, agreed on by every rank (preemption.py).
    request = run.ctx.poll_stop(run.global_step, kind == "epoch")
    if request is not None:
        handle_stop_request(run, request)
    run.boundary = None
    if run.validated_this_boundary or run.boundary_checkpoint:
        # One report per validation or checkpoint, never per step: Ray drains reports on a poll
        # (a report is a barrier), and a Tune iteration is one validation.
        run.ctx.report(run.metrics_for_report(), run.boundary_checkpoint)
    run.boundary_checkpoint = None
    run.validated_this_boundary = False


def _automatic_forward_backward(run, batch: Any, batch_idx: int, window_done: bool):
    if not window_done:
        # Inside an accumulation window DDP must not all-reduce gradients: no_sync defers the
        # communication to the window's last backward.
        with run.no_sync():
            return _forward_backward(run, batch, batch_idx)
    return _forward_backward(run, batch, batch_idx)


def _forward_backward(run, batch: Any, batch_idx: int):
    with run.precision.autocast():
        outputs = run.training_forward(batch, batch_idx)
    loss = extract_loss(outputs)
    if loss is None:
        return outputs, False
    run.recent_losses.append((run.global_step, loss.detach()))  # checked on logging steps
    # Backward runs outside autocast (as torch recommends); the loss is averaged over the
    # window so k accumulated micro-batches equal one batch k times larger.
    k = run.cfg.accumulate_grad_batches
    run.backward(loss / k if k > 1 else loss)
    return outputs, True


def _manual_step(run, batch: Any, batch_idx: int):
    with run.precision.autocast():
        return run.training_forward(batch, batch_idx)


def extract_loss(outputs: Any) -> torch.Tensor | None:
    if outputs is None:
        return None
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(outputs, dict) and "loss" not in outputs:
        raise ValueError(f"training_step returned a dict without a 'loss' key (keys: {sorted(outputs)}); "
                         "return the loss tensor, a dict with 'loss', or None to skip the batch")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"training_step returned {type(loss).__name__}; return the loss tensor, "
                        "a dict with 'loss', or None to skip the batch")
    if loss.numel() != 1:
        raise ValueError(f"training_step's loss has shape {tuple(loss.shape)}; it must be a scalar "
                         "(reduce it with .mean() or .sum())")
    if not loss.requires_grad:
        raise ValueError("training_step's loss does not require grad (was it detached, computed "
                         "under torch.no_grad(), or from a module without trainable parameters?); "
                         "return the loss tensor itself, computed from the module's parameters")
    return loss


def _validation_due(run, batch_idx: int, is_last: bool) -> bool:
    cfg = run.cfg
    if cfg.limit_val_batches == 0:
        return False
    if cfg.check_val_every_n_epoch is not None and (run.current_epoch + 1) % cfg.check_val_every_n_epoch:
        return False
    vci = cfg.val_check_interval
    if isinstance(vci, float):
        if vci == 1.0 or math.isinf(run.num_training_batches):
            return is_last
        every = max(1, int(run.num_training_batches * vci))
        return (batch_idx + 1) % every == 0 or is_last
    if cfg.check_val_every_n_epoch is None:  # an int interval counts batches across epochs
        return (run.current_epoch * run.num_training_batches + batch_idx + 1) % vci == 0
    return (batch_idx + 1) % vci == 0


def _num_batches(train: TrainData, limit) -> float:
    total = len(train) if train.has_len() else math.inf
    if limit is None:
        return total
    if isinstance(limit, float):
        if math.isinf(total):
            raise ValueError("a fractional limit_train_batches needs a train loader with a length; "
                             "pass an int number of batches")
        return int(total * limit) if limit < 1.0 else total
    return min(total, limit)


_END = object()

