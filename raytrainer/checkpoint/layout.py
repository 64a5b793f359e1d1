"""A run's state as Lightning's checkpoint dict, and back: the keys pytorch-lightning reads
(``state_dict``, ``epoch``, ``global_step``, ``optimizer_states``, ``lr_schedulers``,
``hyper_parameters``, ``callbacks``, ``loops``) with raytrainer's exact-resume state beside them
(every rank's RNG, the data position, metric aggregates), which Lightning ignores. Pure: no I/O.
"""
from __future__ import annotations

import warnings

# The Lightning checkpoint layout these files follow; pytorch-lightning reads the version to decide
# which of its migrations to apply (none for this one).
LIGHTNING_FORMAT_VERSION = "2.6.0"


def lightning_dict(state: dict, weights_only: bool = False) -> dict:
    """A raytrainer checkpoint state as Lightning's file holds it: Lightning's keys, and
    raytrainer's exact-resume extras beside them (Lightning ignores keys it does not know)."""
    out = {"pytorch-lightning_version": LIGHTNING_FORMAT_VERSION, "epoch": state["epoch"],
           "global_step": state["global_step"], "state_dict": state["state_dict"],
           "hyper_parameters": dict(state.get("hyper_parameters") or {}),
           "loops": _lightning_loops(state), "raytrainer_loops": state.get("loops", {})}
    if "datamodule_hyper_parameters" in state:  # Lightning keeps both hparams in a weights-only file too
        out["datamodule_hyper_parameters"] = dict(state["datamodule_hyper_parameters"])
    if weights_only:
        return out
    extras = {k: v for k, v in state.items() if k not in out and k not in ("rank_state", "loops")}
    if "rank_state" in state:  # a live snapshot: the state of the process that writes the file
        extras["rank_states"] = {0: state["rank_state"]}  # (a committed checkpoint has every rank's)
    return {**extras, **out}


def _lightning_loops(state: dict) -> dict:
    """Lightning's loop progress for the same position, so pytorch-lightning continues a fit
    from the file: inside an epoch after ``batches_done`` batches, or at the next epoch's start
    after an epoch-end boundary."""
    loops = state.get("loops", {})
    epoch, step = state["epoch"], state["global_step"]
    batches, stepped = loops.get("batches_done", 0), loops.get("batches_stepped", step)
    if loops.get("epoch_finished"):
        epoch, batches = epoch + 1, 0

    def counts(current: int, total: int, keys=("ready", "started", "processed", "completed")) -> dict:
        return {"total": dict.fromkeys(keys, total), "current": dict.fromkeys(keys, current)}
    started = epoch + (1 if batches else 0)
    epoch_progress = {"total": {"ready": started, "started": started, "processed": epoch, "completed": epoch}}
    epoch_progress["current"] = dict(epoch_progress["total"])
    optimizer_steps = {"step": counts(0, step, ("ready", "completed")), "zero_grad": counts(0, step, ("ready", "started", "completed"))}
    fit_loop = {
        "state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": stepped},
        "epoch_loop.batch_progress": {**counts(batches, stepped), "is_last_batch": False},
        "epoch_loop.scheduler_progress": counts(0, 0, ("ready", "completed")),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": optimizer_steps},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": counts(0, step, ("ready", "completed")),
        "epoch_loop.val_loop.state_dict": {}, "epoch_loop.val_loop.batch_progress": {**counts(0, 0), "is_last_batch": False},
        "epoch_progress": epoch_progress,
    }
    return {"fit_loop": fit_loop}


def resumable_state(checkpoint: dict, path: str) -> dict:
    """A ``.ckpt`` as ``loop/state.restore`` takes it. One written by raytrainer carries its exact
    position. One written by Lightning carries its counters but not where the data stood inside
    an epoch: a checkpoint taken mid-epoch restarts that epoch from its first batch (said in a
    warning); one taken after the epoch's last batch continues with the epoch's end."""
    if "raytrainer_loops" in checkpoint:
        state = {k: v for k, v in checkpoint.items() if k not in ("loops", "raytrainer_loops")}
        state["loops"] = checkpoint["raytrainer_loops"]
        state.setdefault("rank_states", {})
        state.setdefault("optimizer_states", [])
        return state
    step = checkpoint["global_step"]
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
    if fit_loop is None:  # no loop state: taken at an epoch's end (Lightning's oldest format)
        epoch, finished, batches, stepped = checkpoint["epoch"], True, 0, step
    else:
        epochs = fit_loop["epoch_progress"]["current"]
        batch_progress = fit_loop["epoch_loop.batch_progress"]
        stepped = fit_loop.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", step)
        epoch = epochs["completed"]
        finished = epochs["processed"] > epochs["completed"]  # saved in on_train_epoch_end
        inside = epochs["started"] > epochs["completed"] and not finished
        batches = batch_progress["current"]["processed"] if inside else 0  # (completed lags by the hooks)
        if inside and batches and not batch_progress.get("is_last_batch"):
            warnings.warn(f"{path} was saved by Lightning after {batches} batches of epoch {epoch}, without "
                          f"the position of its data loader: epoch {epoch} restarts from its first batch, and "
                          f"those {batches} batches are trained on again",
                          stacklevel=2)
            batches = 0
    return {**checkpoint, "epoch": epoch, "rank_states": {}, "metrics": {}, "callbacks": {}, "loggers": [],
            "loops": {"batches_done": batches, "epoch_finished": finished, "batches_stepped": stepped},
            "optimizer_states": checkpoint.get("optimizer_states", []),
            "lr_schedulers": checkpoint.get("lr_schedulers", [])}
