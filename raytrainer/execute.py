"""What one process does for one stage (fit | validate | test | predict).

The same function runs in the calling process (launcher="local") and in every Ray Train worker;
only ``ctx`` differs. It sets up data and model, resumes, runs the loop, and returns plain values.
"""
from __future__ import annotations

import warnings
from typing import Any

from raytrainer import checkpoint as ckpt_io
from raytrainer import redaction
from raytrainer import storage
from raytrainer.data import TrainData, resolve_loaders, shard_eval_loader
from raytrainer.evaluation import run_evaluation
from raytrainer.loop import fit_loop
from raytrainer.module import is_overridden
from raytrainer.preemption import commit_preemption_checkpoint
from raytrainer.profiler import profiling
from raytrainer.run import Run
from raytrainer.strategy import apply_determinism, setup_strategy
from raytrainer.utilities import seed_everything

_EVAL_STEP = {"validate": "validation_step", "test": "test_step"}
_LOADER_KIND = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}


def execute(trainer, stage: str, module, datamodule, loaders: dict[str, Any], ckpt_path, ctx) -> dict:
    cfg = trainer.cfg
    if cfg.seed is not None:
        seed_everything(cfg.seed)
    restore_determinism = apply_determinism(cfg.deterministic)
    run = Run(trainer, module, ctx, stage, datamodule)
    trainer._run = run
    module.trainer = trainer
    try:
        return _execute(run, stage, module, datamodule, loaders, ckpt_path, ctx)
    except BaseException as e:
        try:  # checkpoints already snapshotted still commit: a crash loses only later steps
            run.writer.wait()
        except Exception as upload_error:
            print(f"[raytrainer] also failed to commit a checkpoint: {upload_error}", flush=True)
        for cb in run.callbacks:
            cb.on_exception(trainer, module, e)
        for lg in run.loggers:
            lg.finalize("failed")
        raise
    finally:
        restore_determinism()


def _execute(run: Run, stage: str, module, datamodule, loaders, ckpt_path, ctx) -> dict:
    trainer, cfg = run.trainer, run.cfg
    # prepare_data once per node (downloads), then setup in every process.
    if ctx.local_rank == 0:
        run.call_datamodule("prepare_data")
        module.prepare_data()
    ctx.barrier()
    run.call_datamodule("setup", stage)
    module.setup(stage)
    for cb in run.callbacks:
        cb.setup(trainer, module, stage)

    main = resolve_loaders(_LOADER_KIND[stage], loaders.get(_LOADER_KIND[stage]), datamodule, module)
    if main is None:
        raise ValueError(f"{stage} needs data: pass {_LOADER_KIND[stage]}_dataloaders= / dataloaders=, "
                         f"a datamodule with {_LOADER_KIND[stage]}_dataloader(), or define "
                         f"{_LOADER_KIND[stage]}_dataloader() on the module")
    val_loaders = []
    if stage == "fit":
        val_loaders = resolve_loaders("val", loaders.get("val"), datamodule, module) or []
        if val_loaders and not is_overridden("validation_step", module, object):
            warnings.warn("validation loaders were given but the module has no validation_step; "
                          "validation is skipped")
            val_loaders = []
        val_loaders = [shard_eval_loader(dl, ctx.world_size, ctx.global_rank) for dl in val_loaders]
    elif stage in _EVAL_STEP and not callable(getattr(module, _EVAL_STEP[stage], None)):
        raise TypeError(f"{type(module).__name__} has no {_EVAL_STEP[stage]}(batch, batch_idx); "
                        f"define it to run trainer.{stage}()")
    run.has_validation = bool(val_loaders) and cfg.limit_val_batches != 0

    setup_strategy(run)
    if stage == "fit":
        run.configure_optimizers()
        if module.automatic_optimization and len(run.optimizers) > 1:
            raise ValueError("configure_optimizers() returned several optimizers: set "
                             "self.automatic_optimization = False in __init__ and step them in "
                             "training_step (manual optimization), as in Lightning")
        if module.automatic_optimization and not run.optimizers:
            raise TypeError("configure_optimizers() returned no optimizer")
    run_dir = cfg.run_dir
    for lg in run.loggers:
        _setup_logger(lg, run_dir, cfg.storage_options)

    resume_uri = resolve_checkpoint(ckpt_path, cfg, ctx)
    if resume_uri is not None:
        # A sharded checkpoint loads straight into an FSDP model's shards (the strategy's target)
        run.restore(ckpt_io.load(resume_uri, cfg.storage_options, strategy=run.strategy),
                    weights_only_stage=stage != "fit",
                    own_run=resume_uri.startswith(ckpt_io.checkpoints_root(cfg) + "/"))
    if stage == "fit":
        for lg in run.loggers:
            lg.log_hyperparams(redaction.module_hparams(module))  # credentials as "<redacted>"
        train = TrainData(main[0], ctx.world_size, ctx.global_rank, seed=cfg.seed or 0)
        with profiling(run, train) as profile:  # Trainer(profiler=...); with None nothing is wrapped
            fit_loop(run, train, val_loaders)
            if run.preempted:
                preempted = {"reason": run.preempted, "global_step": run.global_step,
                             "checkpoint": commit_preemption_checkpoint(run)}
            run.writer.wait()  # every checkpoint committed (or its failure raised) before fit returns
        out = {"stage": stage, "metrics": _floats(run.metrics.callback_metrics()), **profile}
        if run.preempted:
            out["preempted"] = preempted  # the launcher raises Preempted once the fit is wound up
    else:
        eval_loaders = [shard_eval_loader(dl, ctx.world_size, ctx.global_rank) for dl in main]
        values = run_evaluation(run, eval_loaders, stage)
        out = {"stage": stage, "metrics": values}
        if stage == "predict":
            out["predictions"] = run.predictions
    run.call_datamodule("teardown", stage)
    module.teardown(stage)
    for cb in run.callbacks:
        cb.teardown(trainer, module, stage)
    for lg in run.loggers:
        lg.finalize("preempted" if run.preempted else "success")
    out.update(global_step=run.global_step, current_epoch=run.current_epoch)
    return out


def resolve_checkpoint(ckpt_path, cfg, ctx) -> str | None:
    """``None`` | ``"last"`` | ``"best"`` | a URI -> a committed checkpoint URI (or None)."""
    restart = ctx.latest_checkpoint()
    if restart is not None:
        # Workers restarted after a failure resume from the newest checkpoint this fit committed
        # (found in storage, never from the runtime's registry: a report in flight when a worker
        # died may never have been registered).
        return restart
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        uri = ckpt_io.latest_committed(cfg, cfg.storage_options)
        if uri is None and ctx.global_rank == 0:
            print(f"[raytrainer] ckpt_path='last': no committed checkpoint under {cfg.run_dir}; "
                  "starting from scratch")
        return uri
    if ckpt_path == "best":
        latest = ckpt_io.latest_committed(cfg, cfg.storage_options)
        best = best_checkpoint_recorded_in(latest, cfg.storage_options) if latest else None
        if not best:
            raise ValueError(f"ckpt_path='best': no best checkpoint recorded under {cfg.run_dir} "
                             "(a ModelCheckpoint with a monitor records one)")
        return best
    return storage.normalize(str(ckpt_path))


def best_checkpoint_recorded_in(uri: str, storage_options) -> str | None:
    """The best checkpoint a ModelCheckpoint had recorded when ``uri`` was saved."""
    state = ckpt_io.load(uri, storage_options, weights=False)  # only the callbacks' state is read
    for key, cb_state in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and cb_state.get("best_model_path"):
            return cb_state["best_model_path"]
    return None


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def _setup_logger(logger, run_dir: str, storage_options) -> None:
    """Loggers write where checkpoints go, with the same credentials; a user logger written
    against the one-argument ``setup(run_dir)`` still works."""
    import inspect
    if "storage_options" in inspect.signature(logger.setup).parameters:
        logger.setup(run_dir, storage_options=storage_options)
    else:
        logger.setup(run_dir)
