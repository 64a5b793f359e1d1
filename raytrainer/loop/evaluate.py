"""Evaluation loops: validation (also inside fit), test and predict.

Eval mode and ``torch.no_grad`` (``torch.inference_mode`` where Lightning uses it) for the whole
pass; the module's previous mode is restored after, so a validation in the middle of an epoch
returns to training mode.

With several ranks every sample is evaluated exactly once (loaders.py ``EvalShard``): ranks may
run different numbers of batches, so an evaluation step must not run a per-batch collective.
Epoch values are reduced once at the end (loop/sync.py), and a strategy whose forward is itself
a collective (FSDP) gathers its parameters once for the pass instead (``Strategy.evaluation``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from raytrainer.loop.loaders import EvalShard
from raytrainer.module import Module, is_overridden, takes_batch_idx
from raytrainer.utilities import capture_rng_state, infer_batch_size, move_to_device, restore_rng_state

_STEP = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}
_HOOK = {"validate": "validation", "test": "test", "predict": "predict"}
_MODEL_HOOK = {"validate": "on_validation_model", "test": "on_test_model", "predict": "on_predict_model"}
_LIMIT = {"validate": "limit_val_batches", "test": "limit_test_batches", "predict": "limit_predict_batches"}


@dataclass
class PredictLoop:
    """``trainer.predict_loop`` (Lightning's names), what prediction writers read.

    ``outputs``/``epoch_batch_indices``: one list per loader, one entry per batch of this rank;
    ``order``: each batch's place in the order one process would produce it, so that the
    driver puts every rank's predictions back in dataset order (``merge_predictions``)."""
    keep: bool = True                                   # False: predict(return_predictions=False)
    outputs: list[list[Any]] = field(default_factory=list)
    epoch_batch_indices: list[list[list[int] | None]] = field(default_factory=list)
    order: list[list[tuple[int, int]]] = field(default_factory=list)
    current_batch_indices: list[int] | None = None

    @property
    def predictions(self) -> list:
        return self.outputs[0] if len(self.outputs) == 1 else self.outputs

    def shard(self) -> dict:
        """What this rank sends to the driver."""
        return {"outputs": self.outputs, "order": self.order}


def merge_predictions(shards: list[dict]) -> list:
    """Every rank's predictions in the order one process gives them: one list of batch outputs
    (a list of such lists with several loaders)."""
    merged = []
    for dl_idx in range(len(shards[0]["outputs"])):
        pairs = [(key, out) for s in shards for key, out in zip(s["order"][dl_idx], s["outputs"][dl_idx])]
        merged.append([out for _, out in sorted(pairs, key=lambda p: p[0])])
    return merged[0] if len(merged) == 1 else merged


def run_sanity_check(run, loaders: list) -> None:
    """Lightning's sanity check: ``num_sanity_val_steps`` validation batches per loader before
    training, so a bug in validation_step fails in seconds, not after an epoch. Nothing of it is
    logged or kept, and it draws from no RNG the training uses."""
    steps = run.cfg.num_sanity_val_steps
    if steps == 0 or run.cfg.limit_val_batches == 0:
        return
    rng = capture_rng_state()
    run.sanity_checking = True
    run.hooks.call_callbacks("on_sanity_check_start")
    try:
        run_evaluation(run, loaders, "validate", max_batches=math.inf if steps == -1 else steps)
        run.hooks.call_callbacks("on_sanity_check_end")
    finally:
        run.sanity_checking = False
    run.metrics.clear_results()
    restore_rng_state(rng)


def run_evaluation(run, loaders: list, stage: str, max_batches: float = math.inf) -> dict[str, float]:
    """One pass over ``loaders`` with ``{stage}_step``; returns the epoch metrics. Predictions
    are kept in ``run.predict_loop``. ``max_batches``: per loader, below the stage's limit (the
    sanity check's)."""
    with _grad_mode(run):
        return _evaluation_pass(run, loaders, stage, max_batches)


def _evaluation_pass(run, loaders: list, stage: str, max_batches: float) -> dict[str, float]:
    module, hook = run.module, _HOOK[stage]
    _check_dataloader_idx(module, stage, several=len(loaders) > 1)
    step_fn = run.strategy.step_fn(_STEP[stage])
    pass_batch_idx = takes_batch_idx(getattr(module, _STEP[stage]))
    limits = [min(max_batches, _limit(getattr(run.cfg, _LIMIT[stage]), loader)) for loader in loaders]
    to_loggers = not run.sanity_checking  # the sanity check logs nothing
    predict = run.predict_loop if stage == "predict" else None
    modes = {m: m.training for m in module.modules()}  # each submodule's, restored after
    previous_stage = run.metrics.stage
    run.metrics.stage = stage
    run.metrics.start_epoch(stage)
    getattr(module, f"{_MODEL_HOOK[stage]}_eval")()  # Lightning's default: trainer.model.eval()
    try:
        run.hooks.call(f"on_{hook}_start")
        run.hooks.call(f"on_{hook}_epoch_start")
        with run.strategy.evaluation(_shard_sizes(loaders, limits)):
            for dl_idx, loader in enumerate(loaders):
                shard = loader.batch_sampler if isinstance(getattr(loader, "batch_sampler", None), EvalShard) else None
                if shard is not None:
                    shard.record_indices = predict is not None
                extra = (dl_idx,) if len(loaders) > 1 else ()
                run.metrics.dataloader_idx = dl_idx if len(loaders) > 1 else None
                if predict is not None:
                    for record in (predict.outputs, predict.epoch_batch_indices, predict.order):
                        record.append([])
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limits[dl_idx]:
                        break
                    batch = run.batch_to_device(batch, dl_idx)
                    run.metrics.batch_size = infer_batch_size(batch)
                    if predict is not None:
                        predict.current_batch_indices = shard.next_batch_indices() if shard else None
                    run.hooks.call(f"on_{hook}_batch_start", batch, batch_idx, dl_idx)
                    with run.precision.autocast():
                        out = step_fn(batch, batch_idx, *extra) if pass_batch_idx else step_fn(batch, *extra)
                    if predict is not None:
                        _record_prediction(predict, run.ctx, shard, dl_idx, batch_idx, out)
                    run.hooks.call(f"on_{hook}_batch_end", out, batch, batch_idx, dl_idx)
                    step_values = run.metrics.eval_step_metrics()
                    # Lightning's step for them: this loader's batches evaluated so far in the run
                    if to_loggers:
                        seen = run.eval_batches_seen.get(dl_idx, 0)
                        if step_values:
                            run.log_to_loggers(step_values, seen)
                        run.eval_batches_seen[dl_idx] = seen + 1
                run.metrics.dataloader_idx = None
        values = end_epoch_in_order(run, f"on_{hook}_epoch_end", stage)
        values = run.metrics.logger_filter(values, stage)
        if values and to_loggers:
            logged = {**values, "epoch": float(run.progress.current_epoch)}  # as every logged row (Lightning)
            run.log_to_loggers(logged, run.progress.batches_stepped)
        run.hooks.call(f"on_{hook}_end")
    finally:
        run.metrics.dataloader_idx = None
        run.metrics.stage = previous_stage
        _restore_modes(module, modes, f"{_MODEL_HOOK[stage]}_train")
    return values


def _check_dataloader_idx(module, stage: str, several: bool) -> None:
    """Lightning's check, before the first batch: with several loaders the step (and the batch
    hooks the module overrides) take ``dataloader_idx``; with one, it must have a default."""
    prefix = "val" if stage == "validate" else stage
    hooks = [_STEP[stage]] + [h for h in (f"on_{_HOOK[stage]}_batch_start", f"on_{_HOOK[stage]}_batch_end")
                              if is_overridden(h, module, Module)]
    for name in hooks:
        params = inspect.signature(getattr(module, name)).parameters
        takes = "dataloader_idx" in params
        if several and not takes:
            raise RuntimeError(f"You provided multiple `{prefix}_dataloader`, but no `dataloader_idx` argument in "
                               f"`{type(module).__name__}.{name}()`. Try adding `dataloader_idx=0` to its signature.")
        if not several and takes and params["dataloader_idx"].default is inspect.Parameter.empty:
            raise RuntimeError(f"You provided only a single `{prefix}_dataloader`, but have included `dataloader_idx` "
                               f"in `{type(module).__name__}.{name}()`. Either remove the argument or give it a "
                               "default value i.e. `dataloader_idx=0`.")


def _grad_mode(run):
    """Lightning's for the whole pass, hooks included: ``torch.inference_mode`` for
    trainer.validate/test/predict with ``inference_mode=True``; ``torch.no_grad`` for the
    validation inside fit, over gloo (CPU workers: its collectives fail on inference tensors),
    with FSDP, or with ``inference_mode=False``."""
    cfg, ctx = run.cfg, run.ctx
    if run.stage == "fit" or not cfg.inference_mode or cfg.strategy.startswith("fsdp") or \
            (ctx.world_size > 1 and run.device.type == "cpu"):
        return torch.no_grad()
    return torch.inference_mode()


def _restore_modes(module, modes: dict, train_hook: str) -> None:
    """After a pass: the module's ``on_*_model_train`` where it overrides it, else every
    submodule's mode as it was (a frozen BatchNorm stays in eval mode), as in Lightning."""
    if is_overridden(train_hook, module, Module):
        getattr(module, train_hook)()
        return
    for m, training in modes.items():
        m.training = training


def end_epoch_in_order(run, hook: str, stage: str) -> dict[str, float]:
    """An epoch's end, as Lightning orders it. The steps' values are reduced first: every hook
    sees them in ``callback_metrics``. Then the callbacks' hook and the module's; at a training
    epoch's end the callbacks that decide on metrics (ModelCheckpoint, EarlyStopping) run after
    the module's hook and see what it logged there. Every rank runs every reduction (collectives)."""
    values = run.metrics.end_epoch(stage)
    if stage == "train":
        run.hooks.call_callbacks(hook, monitoring=False)
        run.hooks.call_module(hook)
        values.update(run.metrics.end_epoch(stage))
        run.hooks.call_callbacks(hook, monitoring=True)
    else:
        run.hooks.call(hook)
    values.update(run.metrics.end_epoch(stage))
    return values


def _record_prediction(predict: PredictLoop, ctx, shard: EvalShard | None, dl_idx: int, batch_idx: int,
                       out: Any) -> None:
    predict.epoch_batch_indices[dl_idx].append(predict.current_batch_indices)
    if predict.keep:
        predict.outputs[dl_idx].append(_to_cpu(out))
        # A map-style loader's batches interleave across ranks (EvalShard); a loader the runtime
        # sharded (a Ray Dataset split in order) holds a contiguous run of rows per rank.
        predict.order[dl_idx].append((shard.global_batch_idx(batch_idx), 0) if shard else (ctx.global_rank, batch_idx))


def _shard_sizes(loaders: list, limits: list) -> list[float]:
    """Batches this rank will evaluate per loader (inf: not known before the pass)."""
    sizes = []
    for loader, limit in zip(loaders, limits):
        try:
            sizes.append(min(len(loader), limit))
        except TypeError:
            sizes.append(float("inf"))
    return sizes


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
