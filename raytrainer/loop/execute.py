"""One stage (fit / validate / test / predict) in one process: the same function in-process, in
every Ray Train worker and in a Tune trial. It sets the run up (data, strategy, optimizers, the
checkpoint to start from), runs the loop, tears down, and returns plain values.

    prepare_data (once per node) -> setup(stage) -> configure_model -> loaders -> strategy -> configure_optimizers
    -> loggers -> restore the starting checkpoint -> fit loop | one evaluation pass -> teardown
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from raytrainer.checkpoint.resume import is_own_checkpoint
from raytrainer.checkpoint.lightning_file import load_for_run
from raytrainer.loop.evaluate import run_evaluation
from raytrainer.loop.fit import fit_loop
from raytrainer.loop.fit_data import FitData, seeding_workers
from raytrainer.loop.loaders import resolve_loaders, shard_eval_loader
from raytrainer.loop.preemption import commit_preemption_checkpoint
from raytrainer.loop.run import Run
from raytrainer.loop.strategy import apply_determinism
from raytrainer.profiler import build_profiler
from raytrainer.utilities import seed_rngs

log = logging.getLogger(__name__)

_EVAL_STEP = {"validate": "validation_step", "test": "test_step"}
_LOADER_KIND = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}


def execute(trainer, stage: str, module, datamodule, loaders: dict[str, Any], resume_uri: str | None, ctx) -> dict:
    """Run ``stage``; ``resume_uri`` is the checkpoint to start from, decided on the driver
    (checkpoint/resume.py), unless the runtime restarted this worker group (``ctx``)."""
    cfg = trainer.cfg
    if cfg.seed is not None:
        seed_rngs(cfg.seed)
    restore_determinism = apply_determinism(cfg.deterministic, cfg.benchmark)
    profiler = build_profiler(cfg.profiler if stage == "fit" else None)
    run = Run(trainer, module, ctx, stage, datamodule, profiler)
    trainer._attach(run)
    module._attach(trainer, run)
    try:
        return _execute(run, loaders, resume_uri)
    except BaseException as e:
        profiler.abort()
        try:  # checkpoints already snapshotted still commit: a crash loses only later steps
            run.writer.wait()
        except Exception as upload_error:
            log.warning("also failed to commit a checkpoint: %s", upload_error)
        for cb in run.callbacks:
            cb.on_exception(trainer, module, e)
        for lg in run.loggers:
            lg.finalize("failed")
        raise
    finally:
        module._attach(trainer, None)  # self.log after the run is an error, as before it
        restore_determinism()


def _execute(run: Run, loaders: dict, resume_uri: str | None) -> dict:
    trainer, module, datamodule, ctx, cfg, stage = run.trainer, run.module, run.datamodule, run.ctx, run.cfg, run.stage
    # prepare_data once per node (downloads), then setup in every process.
    if ctx.local_rank == 0:
        _call_datamodule(datamodule, "prepare_data")
        module.prepare_data()
    ctx.barrier()
    if datamodule is not None:
        datamodule.trainer = trainer
    _call_datamodule(datamodule, "setup", stage)  # Lightning's order: datamodule, callbacks, module
    for cb in run.callbacks:
        cb.setup(trainer, module, stage)
    module.setup(stage)
    with torch.device(run.device):  # layers built here are created on the device (Lightning)
        module.configure_model()

    data = main = None
    if stage == "fit":
        data = FitData(run, loaders)
        data.load()  # sized before configure_optimizers: estimated_stepping_batches is right there
    else:
        kind = _LOADER_KIND[stage]
        main = seeding_workers(trainer, resolve_loaders(kind, loaders.get(kind), datamodule, module))
        if main is None:
            raise ValueError(f"{stage} needs data: pass {kind}_dataloaders= / dataloaders=, a datamodule with "
                             f"{kind}_dataloader(), or define {kind}_dataloader() on the module")
        if stage in _EVAL_STEP and not callable(getattr(module, _EVAL_STEP[stage], None)):
            raise TypeError(f"{type(module).__name__} has no {_EVAL_STEP[stage]}(batch, batch_idx); "
                            f"define it to run trainer.{stage}()")
    run.setup_strategy()
    if stage == "fit":
        run.configure_optimizers()
    for lg in run.loggers:
        _setup_logger(lg, cfg.run_dir, cfg.storage_options)

    start_from = ctx.restart_checkpoint() or resume_uri
    if start_from is not None:
        # A sharded checkpoint loads straight into an FSDP model's shards (the strategy's target)
        run.restore(load_for_run(start_from, cfg.storage_options, strategy=run.strategy), weights_only=stage != "fit",
                    own_run=is_own_checkpoint(start_from, cfg))
        if data is not None:
            data.restored()
    if stage == "fit":
        run.profiler.start(ctx, run.device, cfg)
        with torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
            fit_loop(run, data)
        preempted = None
        if run.preempted:
            preempted = {"reason": run.preempted, "global_step": run.progress.global_step,
                         "checkpoint": commit_preemption_checkpoint(run)}
        run.wait_for_commits()  # every checkpoint committed (or its failure raised) before fit returns
        out = {"stage": stage, "metrics": _floats(run.metrics.callback_metrics()), "profile": run.profiler.finish()}
        if preempted:
            out["preempted"] = preempted  # the Trainer raises Preempted once the fit is wound up
    else:
        eval_loaders = [shard_eval_loader(dl, ctx.world_size, ctx.global_rank, cfg.use_distributed_sampler)
                        for dl in main]
        run.log_hyperparams()  # every stage logs them, as Lightning
        values = run_evaluation(run, eval_loaders, stage)
        out = {"stage": stage, "metrics": values, "per_loader": run.metrics.per_loader(values, stage, len(eval_loaders))}
        if stage == "predict" and trainer._return_predictions:
            out["predictions"] = run.predict_loop.shard()  # this rank's (merge_predictions)
    _call_datamodule(datamodule, "teardown", stage)
    for cb in run.callbacks:
        cb.teardown(trainer, module, stage)
    module.teardown(stage)
    for lg in run.loggers:
        lg.finalize("preempted" if run.preempted else "success")
    out.update(global_step=run.progress.global_step, current_epoch=run.progress.lightning_epoch,
               batches_stepped=run.progress.batches_stepped)
    return out


def _call_datamodule(datamodule, hook: str, *args: Any) -> None:
    fn = getattr(datamodule, hook, None) if datamodule is not None else None
    if fn is not None:
        fn(*args)


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _setup_logger(logger, run_dir: str, storage_options) -> None:
    """Loggers write where checkpoints go, with the same credentials; a user logger written
    against the one-argument ``setup(run_dir)`` still works."""
    if "storage_options" in inspect.signature(logger.setup).parameters:
        logger.setup(run_dir, storage_options=storage_options)
    else:
        logger.setup(run_dir)
