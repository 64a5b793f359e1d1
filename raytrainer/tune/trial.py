"""What one sweep trial runs, inside its Ray Tune trial actor.

A 1-worker trial runs the one loop right here in the trial actor, through a TuneContext: no nested
Ray Train run, so no second placement group that Tune does not know about (the root of Tune+Train
deadlocks and leaks), and no 8–10 s of Train start-up per trial. When ASHA stops a trial, Tune ends
this actor and nothing else is left running.

A trial of N > 1 workers starts a Ray Train run from the trial actor (``fit_on_workers``); sweep()
sizes concurrency for the actor and its workers together, and Tune kills the actor (not reuses it)
when the trial ends, taking the Train controller and its workers along.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from typing import Any

from raytrainer import storage
from raytrainer.checkpoint.format import read_marker
from raytrainer.checkpoint.store import latest_committed, list_committed
from raytrainer.loop.context import LocalContext, resolve_device
from raytrainer.loop.execute import execute
from raytrainer.runtime.ray_internals import TUNE_STORAGE_LOGGER
from raytrainer.trainer import Trainer

log = logging.getLogger(__name__)

POINTER_FILE = "raytrainer_checkpoint.json"
RESULT_FILE = "trial_result.json"


class TuneContext(LocalContext):
    """RunContext of a 1-worker trial: one process (LocalContext's collectives); reports become
    Tune results; no stop requests (Tune stops and restores trials itself)."""

    def __init__(self, device, metric: str):
        super().__init__(device)
        self._metric = metric
        self._pending_checkpoint: str | None = None
        self.reports = 0

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        from ray import tune
        if checkpoint_dir is not None:
            self._pending_checkpoint = checkpoint_dir
        if self._metric not in metrics:
            return  # Tune rejects results without the sweep's metric; the pointer waits
        checkpoint = None
        if self._pending_checkpoint is not None:
            # Tune keeps a pointer to our checkpoint (PBT exploits and sweep resumes read it),
            # never a second copy of the weights.
            folder = tempfile.mkdtemp(prefix="raytrainer-tune-")
            with open(os.path.join(folder, POINTER_FILE), "w") as f:
                json.dump({"uri": self._pending_checkpoint}, f)
            checkpoint = tune.Checkpoint.from_directory(folder)
            self._pending_checkpoint = None
        tune.report({**metrics, "checkpoint_path": checkpoint_dir or ""}, checkpoint=checkpoint)
        self.reports += 1


def split_config(config: dict) -> tuple[dict, dict, dict]:
    """Trial config -> (module kwargs, Trainer overrides, DataModule overrides)."""
    module, trainer, data = {}, {}, {}
    for key, value in config.items():
        if key.startswith("trainer."):
            trainer[key[len("trainer."):]] = value
        elif key.startswith("data."):
            data[key[len("data."):]] = value
        else:
            module[key] = value
    return module, trainer, data


def build_module(spec: Any, kwargs: dict, config: dict):
    if isinstance(spec, type):
        return spec(**kwargs)
    return spec(config)  # a factory taking the whole trial config


def build_data(data: Any, overrides: dict):
    if not overrides or data is None:
        return copy.deepcopy(data)
    return type(data)(**{**dict(data.hparams), **overrides})


def run_trial(config: dict, job: dict) -> None:
    """The Tune function trainable."""
    from ray import tune

    # Tune logs every (tiny) pointer checkpoint at INFO: one line per validation per trial (this
    # process is the trial's actor).
    logging.getLogger(TUNE_STORAGE_LOGGER).setLevel(logging.WARNING)
    trial_id = tune.get_context().get_trial_id()
    module_kwargs, trainer_overrides, data_overrides = split_config(config)
    module = build_module(job["module"], module_kwargs, config)
    data = build_data(job["data"], data_overrides)
    kwargs = {**job["trainer_kwargs"], **trainer_overrides,
              "storage_path": job["sweep_dir"], "name": f"trial_{trial_id}",
              "launcher": "ray" if job.get("workers", 1) > 1 else "local",
              "enable_progress_bar": False,
              # Tune may end this actor right after any report (ASHA stop, PBT pause): a
              # checkpoint it is told about must already be committed.
              "async_checkpoint": False,
              "callbacks": copy.deepcopy(job["trainer_kwargs"].get("callbacks")),
              "logger": copy.deepcopy(job["trainer_kwargs"].get("logger", True))}
    trainer = Trainer(**kwargs)
    for lg in trainer.loggers:  # W&B / MLflow: this trial's own run, grouped under the sweep
        lg.join_sweep(job["sweep_dir"], kwargs["name"])
    previous = read_trial_summary(trainer.cfg.run_dir, trainer.cfg.storage_options) or {}
    if previous.get("completed"):
        # Finished before an interrupted sweep's driver died, but not yet recorded by Tune:
        # report the final result again instead of training again.
        tune.report(previous["metrics"])
        return
    # A restarted trial continues from its own newest committed checkpoint, unless Tune hands
    # it one (a PBT exploit: the donor's state; a resumed sweep: its last reported one).
    start_from = latest_committed(trainer.cfg, trainer.cfg.storage_options)
    restored = tune.get_checkpoint()
    if restored is not None:  # PBT exploit (a donor's state) or a resumed sweep
        with restored.as_directory() as folder:
            with open(os.path.join(folder, POINTER_FILE)) as f:
                start_from = resolve_pointer(json.load(f)["uri"], trainer.cfg.storage_options)
    restores = list(previous.get("restores", []))
    if restored is not None:
        restores.append(start_from)
        # Recorded before training: a later PBT pause must not lose the history of exploits.
        _write_json(f"{trainer.cfg.run_dir}/{RESULT_FILE}", {"completed": False, "restores": restores},
                    trainer.cfg.storage_options)
    ctx = TuneContext(resolve_device(trainer.cfg.accelerator), job["metric"])
    if job.get("workers", 1) > 1:
        out = fit_on_workers(trainer, module, data, start_from, ctx)
    else:
        out = execute(trainer, "fit", module, data, {}, start_from, ctx)
    if not ctx.reports and job["metric"] in out["metrics"]:
        tune.report(out["metrics"])  # resumed at its end: Tune still needs one result
    ckpt = trainer.checkpoint_callback
    summary = {"completed": True, "metrics": out["metrics"], "global_step": out["global_step"],
               "current_epoch": out["current_epoch"], "restores": restores,
               "best_checkpoint": ckpt.best_model_path if ckpt else None,
               "last_checkpoint": latest_committed(trainer.cfg, trainer.cfg.storage_options)}
    _write_json(f"{trainer.cfg.run_dir}/{RESULT_FILE}", summary, trainer.cfg.storage_options)


def fit_on_workers(trainer, module, data, start_from: str | None, ctx: TuneContext) -> dict:
    """A trial of N workers: a Ray Train run started from this trial actor (Tune does not see its
    workers; sweep() limits concurrency so they always fit). Rank 0 sends every report through a
    queue; this thread — the trial's own — turns each into a Tune result with a checkpoint
    pointer, exactly as a 1-worker trial does. When Tune ends the trial (ASHA stop, PBT pause) it
    kills this actor, which owns the Train controller: the workers go with it."""
    import threading

    from ray.util.queue import Empty, Queue

    from raytrainer.runtime.ray_train import launch_ray  # imports ray.train: multi-worker trials only
    reports = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["out"] = launch_ray(trainer, "fit", module, data, {}, start_from, report_queue=reports)
        except BaseException as e:  # re-raised in the trial's thread, where Tune sees it
            outcome["error"] = e

    worker = threading.Thread(target=fit, daemon=True, name="raytrainer-trial-fit")
    worker.start()
    while worker.is_alive() or not reports.empty():
        try:
            metrics, checkpoint_dir = reports.get(timeout=0.2)
        except Empty:
            continue
        ctx.report(metrics, checkpoint_dir)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["out"]


def resolve_pointer(uri: str, storage_options, timeout_s: float = 30.0) -> str:
    """The checkpoint a Tune pointer names. If it is not committed (the donor's retention has
    deleted it since), the newest committed checkpoint of the same trial: its latest state."""
    deadline = time.monotonic() + timeout_s
    while True:
        if read_marker(uri, storage_options) is not None:
            return uri
        committed = list_committed(uri.rsplit("/", 1)[0], storage_options)
        if committed:
            log.info("%s is gone; resuming from %s of the same trial", uri, committed[-1])
            return committed[-1]
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"no committed checkpoint at or beside {uri}")
        time.sleep(0.2)


def _write_json(uri: str, obj: dict, storage_options) -> None:
    fs, path = storage.filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(obj, indent=1, default=str).encode())


def read_trial_summary(run_dir: str, storage_options) -> dict | None:
    fs, path = storage.filesystem(f"{run_dir}/{RESULT_FILE}", storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
