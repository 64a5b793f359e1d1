"""A run's full state as a checkpoint dict, and back (exact resume).

Lightning's key names where Lightning has one (``state_dict``, ``optimizer_states``,
``lr_schedulers``, ``epoch``, ``global_step``, ``callbacks``, ``hyper_parameters``, ``loops``,
``datamodule_hyper_parameters``, the datamodule's state under its class name);
raytrainer's own for what exact resume needs beyond them: every rank's RNG and the RNG at the
epoch's start (``rank_state``, written per rank), the metric aggregates of the epoch in progress,
the loggers' run identities.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from raytrainer import redaction
from raytrainer.checkpoint.format import plain_hparams
from raytrainer.utilities import capture_rng_state, restore_rng_state

CHECKPOINT_FORMAT_VERSION = 1


def checkpoint_state(run) -> dict:
    """Every rank calls this: under FSDP the model state is a collective (a gather, or this
    rank's shards)."""
    progress = run.progress
    state = {
        "raytrainer_format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": run.strategy.checkpoint_model_state(),  # full, or this rank's shards
        "optimizer_states": run.strategy.checkpoint_optimizer_states(),
        "lr_schedulers": [c.scheduler.state_dict() for c in run.scheduler_configs],
        "precision": run.precision.state_dict(),
        "epoch": progress.current_epoch,
        "global_step": progress.global_step,
        "loops": {"batches_done": progress.batches_done, "epoch_finished": progress.epoch_finished,
                  "batches_stepped": progress.batches_stepped},
        "rank_state": {"rng": capture_rng_state(), "epoch_data_state": run.epoch_data_state},
        "metrics": run.metrics.state_dict(),
        "callbacks": {cb.state_key: cb.state_dict() for cb in run.callbacks},
        "loggers": [lg.state_dict() for lg in run.loggers],
        "hyper_parameters": plain_hparams(redaction.module_hparams(run.module)),  # no credentials
    }
    if run.datamodule is not None:  # Lightning's keys: its hparams, and its state under its class name
        if run.datamodule.hparams:
            state["datamodule_hyper_parameters"] = plain_hparams(redaction.datamodule_hparams(run.datamodule))
        if dm_state := run.datamodule.state_dict():
            state[type(run.datamodule).__qualname__] = dm_state
    run.hooks.call("on_save_checkpoint", state)
    return state


@dataclass(frozen=True)
class DataPosition:
    """What a restore hands back to the run for its data: the RNG at the resumed epoch's start
    (to rebuild its iterator), the checkpoint's RNG (restored after the skip), and the position
    the checkpoint was saved at."""
    epoch_data_state: dict | None
    resume_rng: dict | None
    saved_position: tuple[int, bool]


def restore(run, state: dict, weights_only: bool = False, own_run: bool = True) -> DataPosition | None:
    """Load ``state`` into ``run``'s model, optimizers, callbacks, loggers, metrics and
    ``progress``; counters and RNG only for fit (``weights_only`` is validate/test/predict, which
    need the weights alone). Loggers continue the checkpoint's logger runs only when it is
    ``own_run``'s (see ``Logger.load_state_dict``)."""
    # Lightning's order: the module's hook before the weights load (it may rename keys of a
    # renamed layer), the callbacks' after, and only when the fit continues from the checkpoint.
    run.hooks.call_module("on_load_checkpoint", state)
    run.strategy.load_model_state_dict(state["state_dict"])
    if weights_only:
        return None
    run.hooks.call_callbacks("on_load_checkpoint", state)
    if len(state["optimizer_states"]) != len(run.optimizers):
        raise ValueError(f"the checkpoint has {len(state['optimizer_states'])} optimizer states but "
                         f"configure_optimizers() returned {len(run.optimizers)} optimizers")
    run.strategy.load_optimizer_state_dicts(state["optimizer_states"])
    for cfg, sd in zip(run.scheduler_configs, state["lr_schedulers"]):
        cfg.scheduler.load_state_dict(sd)
    run.precision.load_state_dict(state.get("precision", {}))
    by_key = state.get("callbacks", {})
    for cb in run.callbacks:
        if cb.state_key in by_key:
            cb.load_state_dict(by_key[cb.state_key])
    for lg, sd in zip(run.loggers, state.get("loggers", []) if own_run else []):
        lg.load_state_dict(sd)
    if run.datamodule is not None:  # "datamodule": where checkpoints before Lightning's key kept it
        if dm_state := state.get(type(run.datamodule).__qualname__) or state.get("datamodule"):
            run.datamodule.load_state_dict(dm_state)
    run.metrics.load_state_dict(state.get("metrics", {}), run.device)
    progress = run.progress
    progress.global_step = state["global_step"]
    progress.current_epoch = state["epoch"]
    progress.batches_done = state["loops"]["batches_done"]
    progress.epoch_finished = state["loops"]["epoch_finished"]
    progress.batches_stepped = state["loops"].get("batches_stepped", progress.global_step)  # older checkpoints
    rank_states = state["rank_states"]
    saved_position = progress.position()
    if not rank_states:  # a Lightning .ckpt: no RNG saved, the epoch restarts (checkpoint/lightning_file.py)
        if progress.epoch_finished:
            progress.current_epoch += 1
            progress.batches_done = 0
            progress.epoch_finished = False
        return DataPosition(None, None, saved_position)
    # Each rank resumes its own RNG streams; with a different world size, rank 0's.
    rank_state = rank_states.get(run.ctx.global_rank, rank_states.get(0))
    if len(rank_states) != run.ctx.world_size:
        _resume_on_another_world_size(run, len(rank_states))
    if not progress.epoch_finished and progress.batches_done:
        # the checkpoint's RNG is restored after the epoch's iterator is rebuilt
        return DataPosition(rank_state["epoch_data_state"], rank_state["rng"], saved_position)
    if not progress.epoch_finished:  # at an epoch's start (a .ckpt exported after fit): nothing to skip
        restore_rng_state(rank_state["rng"])
        return DataPosition(None, None, saved_position)
    # The next epoch starts fresh: its RNG capture must see the saved state.
    restore_rng_state(rank_state["rng"])
    progress.current_epoch += 1
    progress.batches_done = 0
    progress.epoch_finished = False
    return DataPosition(rank_state["epoch_data_state"], None, saved_position)


def _resume_on_another_world_size(run, saved: int) -> None:
    """A checkpoint of ``saved`` workers resumed on a different number. Mid-epoch, the position
    is kept in *samples*: each of the ``saved`` ranks had taken ``batches_done`` batches, so the
    new ranks skip as many as cover the same count (rounded down), and the epoch ends after as
    many samples as it would have. With a DistributedSampler on both sides (several workers each)
    the skipped samples are exactly those trained on: its shards interleave one global order.
    Keeping the per-rank count would retrain or skip part of the epoch."""
    world, progress = run.ctx.world_size, run.progress
    mapped = progress.batches_done * saved // world
    if run.ctx.global_rank == 0:
        where = (f"epoch {progress.current_epoch} resumes after {mapped} batches per worker "
                 f"({progress.batches_done} x {saved} saved): as many samples as were already "
                 "trained on" if progress.batches_done and not progress.epoch_finished
                 else "it was saved at an epoch boundary")
        warnings.warn(f"resuming a checkpoint written by {saved} worker(s) on {world}: weights, "
                      f"optimizer state and counters are restored exactly; {where}. Data order "
                      f"and RNG streams differ from a {saved}-worker run, so the result is not "
                      f"bit-identical to one", stacklevel=2)
    if not progress.epoch_finished:
        progress.batches_done = mapped
