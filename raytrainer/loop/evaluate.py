"""Evaluation loops: validation (also inside fit), test and predict.

Eval mode and ``torch.no_grad`` for the whole pass; the module's previous mode is restored after,
so a validation in the middle of an epoch returns to training mode.
"""
from __future__ import annotations

from typing import Any

import torch

from raytrainer.utilities import infer_batch_size, move_to_device

_STEP = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_HOOK = {"validate": "validation", "test": "test", "predict": "predict"}
_LIMIT = {"validate": "limit_val_batches", "test": "limit_test_batches", "predict": "limit_predict_batches"}


def run_evaluation(run, loaders: list, stage: str) -> tuple[dict[str, float], list]:
    """One pass over ``loaders`` with ``{stage}_step``; returns the epoch metrics and, for
    predict, the outputs (one list per loader; the list itself with one loader)."""
    module, hook = run.module, _HOOK[stage]
    step_fn = run.strategy.step_fn(_STEP[stage])
    was_training = module.training
    previous_stage = run.metrics.stage
    run.metrics.stage = stage
    run.metrics.start_epoch(stage)
    module.eval()
    predictions: list[list[Any]] = []
    try:
        run.hooks.call(f"on_{hook}_start")
        run.hooks.call(f"on_{hook}_epoch_start")
        with torch.no_grad():
            for dl_idx, loader in enumerate(loaders):
                outputs: list[Any] = []
                limit = _limit(getattr(run.cfg, _LIMIT[stage]), loader)
                extra = (dl_idx,) if len(loaders) > 1 else ()
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    batch = move_to_device(batch, run.device)
                    run.metrics.batch_size = infer_batch_size(batch)
                    run.hooks.call(f"on_{hook}_batch_start", batch, batch_idx, dl_idx)
                    with run.precision.autocast():
                        out = step_fn(batch, batch_idx, *extra)
                    run.hooks.call(f"on_{hook}_batch_end", out, batch, batch_idx, dl_idx)
                    if stage == "predict":
                        outputs.append(_to_cpu(out))
                predictions.append(outputs)
        run.hooks.call(f"on_{hook}_epoch_end")
        values = run.metrics.logger_filter(run.metrics.end_epoch(stage), stage)
        if values:
            logged = {**values, "epoch": float(run.progress.current_epoch)}  # as every logged row (Lightning)
            run.log_to_loggers(logged, run.progress.global_step)
        run.hooks.call(f"on_{hook}_end")
    finally:
        run.metrics.stage = previous_stage
        module.train(was_training)
    return values, (predictions[0] if len(predictions) == 1 else predictions)


def _limit(limit, loader) -> float:
    if limit is None:
        return float("inf")
    if isinstance(limit, float):
        try:
            return int(len(loader) * limit) if limit < 1.0 else float("inf")
        except TypeError:
            raise ValueError("a fractional limit_*_batches needs a loader with a length; pass an int") from None
    return limit


def _to_cpu(out: Any) -> Any:
    return move_to_device(out, torch.device("cpu"))
