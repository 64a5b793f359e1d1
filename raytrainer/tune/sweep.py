"""``rt.sweep``: a Ray Tune experiment whose trials fit the same Trainer and loop.

Resources are decided up front, so no trial ever waits for workers that cannot be scheduled: a
1-worker trial is one Tune trial actor holding its worker's resources; a trial of N workers is a
small trial actor plus a Ray Train run of N workers, counted together. At most as many trials run
at once as the cluster fits; a trial too big for the cluster is an error before Tune starts.
Trial checkpoints and logs go to ``{storage_path}/{name}/trial_<id>/`` (Tune's own files to
``{storage_path}/{name}/_tune``), on the same storage as single runs, s3:// included.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import signal
from typing import Any

from raytrainer import storage
from raytrainer.data import DataModule
from raytrainer.errors import ConfigError
from raytrainer.module import Module
from raytrainer.runtime.cluster import ensure_ray, environment, import_ray, log_notice_dropped
from raytrainer.runtime.ray_internals import TUNE_RESULT_LOGGER
from raytrainer.runtime.signals import handlers_restored
from raytrainer.tune.result import build_sweep_result
from raytrainer.trainer import Trainer
from raytrainer.tune.trial import run_trial, split_config
from raytrainer.utilities import show_info_logs

log = logging.getLogger(__name__)

TRIAL_ACTOR = {"CPU": 0.25}  # a multi-worker trial's actor only waits on its workers' reports


def sweep(module: Any, data: Any, trainer, search_space: dict, metric: str, mode: str = "min",
          num_samples: int = 1, scheduler: Any = "asha", search_alg: Any = None,
          max_concurrent_trials: int | None = None, grace_period: int = 1, reduction_factor: int = 2,
          max_t: int | None = None, perturbation_interval: int = 2, hyperparam_mutations: dict | None = None,
          time_budget_s: float | None = None,
          resume: bool = False, verbose: bool = True):
    """Run ``num_samples`` trials of ``module`` (a Module class whose ``__init__`` takes the
    config's keys, or ``fn(config) -> Module``) on ``data`` with ``trainer``'s arguments;
    ``trainer.``/``data.``-prefixed keys override the Trainer's / DataModule's arguments.
    PBT perturbs ``hyperparam_mutations`` (default: the search space's sampled domains).
    ``verbose=False``: none of Tune's own output (its configuration box, its hint at a
    TensorBoard folder inside Ray's temporary directory); the summary is logged either way.
    Returns a :class:`raytrainer.tune.result.SweepResult`."""
    import_ray("ray.tune")
    from ray import tune

    show_info_logs()  # the sweep's line and its summary, as a fit's notices
    _validate(module, data, trainer, search_space, metric, mode, num_samples)
    cfg = trainer.cfg
    for lg in trainer.loggers:  # what each trial will do, on a copy: a refusal comes before Ray
        copy.deepcopy(lg).join_sweep(cfg.run_dir, "trial_check")
    if cfg.devices == "auto" and cfg.accelerator == "gpu":
        raise ConfigError("sweep: devices='auto' with accelerator='gpu' would give every trial all "
                          "GPUs; set devices=<workers per trial>")
    workers = cfg.devices * cfg.num_nodes if isinstance(cfg.devices, int) else 1
    ensure_ray()
    cluster = import_ray().cluster_resources()
    trainer_kwargs = dict(trainer._init_kwargs)
    if workers > 1:
        # Tune reserves only the trial actor; the trial's Train workers reserve theirs when they
        # start. Concurrency counts both, so every running trial's workers always fit.
        worker_res = _worker_resources(cfg, workers, cluster)
        trainer_kwargs["resources_per_worker"] = worker_res
        actor_res = dict(TRIAL_ACTOR)
        per_trial = {k: actor_res.get(k, 0) + workers * worker_res.get(k, 0)
                     for k in set(actor_res) | set(worker_res)}
    else:
        actor_res = per_trial = _per_trial_resources(cfg)
    concurrent = _max_concurrent(per_trial, cluster, max_concurrent_trials)
    sweep_dir = cfg.run_dir
    job = {"module": module, "data": data, "trainer_kwargs": trainer_kwargs,
           "sweep_dir": sweep_dir, "metric": metric, "workers": workers}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), actor_res)
    tune_storage, tune_fs = storage.ray_storage(sweep_dir, cfg.storage_options)
    run_config = tune.RunConfig(name="_tune", storage_path=tune_storage, storage_filesystem=tune_fs,
                                # Tune's checkpoints are tiny pointers to ours: keep them all
                                # (num_to_keep forces an experiment snapshot per checkpoint).
                                verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                failure_config=tune.FailureConfig(max_failures=0))
    tune_scheduler = _scheduler(scheduler, hyperparam_mutations or search_space, cfg, grace_period,
                                reduction_factor, max_t, perturbation_interval)
    tune_config = tune.TuneConfig(
        metric=metric, mode=mode, num_samples=num_samples, search_alg=search_alg, scheduler=tune_scheduler,
        max_concurrent_trials=concurrent, time_budget_s=time_budget_s,
        # A finished or stopped trial's actor runs the next trial: no new process, no torch
        # import (~2-3 s a trial here). Tune falls back to a new actor if a reset fails.
        # (Not with workers: ending the actor is what takes a stopped trial's Train run down.)
        reuse_actors=workers == 1,
        trial_dirname_creator=_trial_dirname)
    experiment = f"{tune_storage.rstrip('/')}/_tune"
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=tune_fs):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False,
                                   storage_filesystem=tune_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=search_space, tune_config=tune_config,
                           run_config=run_config)
    shape = f"{workers} workers, " if workers > 1 else ""
    log.info("sweep: %d trial(s) x %s%s each, %d at once, scheduler=%s, metric=%s (%s), dir=%s",
             num_samples, shape, per_trial, concurrent, _name(scheduler), metric, mode, sweep_dir)
    # On a PBT restore Tune's result loggers fetch the trial's result.json / progress.csv from
    # storage, where they are synced only at the trial's end, and log a WARNING per file
    # ("Remote file not found"). The copy fails before it touches the local files they append to
    # (each trial's curve still runs to its last iteration: tests/test_sweep.py): noise.
    # Tune installs SIGINT/SIGUSR1 handlers for its run and leaves them installed: after a sweep,
    # Ctrl-C in the same process (a notebook, a script that goes on to fit) would only log
    # "ending Ray Tune run". Put back what was there.
    signums = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    # Tune's new output engine prints its box and hints even at verbose=0; its legacy one prints
    # nothing there.
    quiet = {} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}
    with handlers_restored(*signums), log_notice_dropped(TUNE_RESULT_LOGGER, "Remote file not found: "), \
            environment(quiet):
        grid = tuner.fit()
    # Tune ends a trial's actor as soon as it reaches the scheduler's max_t, before the trial can
    # say it finished: reaching max_t counts as completed.
    completes_at = getattr(tune_scheduler, "_max_t", None)
    result = build_sweep_result(grid, metric, mode, sweep_dir, cfg.storage_options, completes_at)
    log.info("%s", result.summary())
    return result


def _validate(module, data, trainer, search_space, metric, mode, num_samples) -> None:
    """Every key of the search space must land somewhere; fail before Tune starts."""
    if not isinstance(trainer, Trainer):
        raise ConfigError(f"sweep(trainer=...) must be an rt.Trainer, got {type(trainer).__name__}")
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep(mode={mode!r}) is invalid: expected 'min' or 'max'")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"sweep(metric={metric!r}) is invalid: expected the name of a logged metric")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"sweep(num_samples={num_samples!r}) is invalid: expected an int >= 1")
    if not isinstance(search_space, dict):
        raise ConfigError("sweep(search_space=...) must be a dict of name -> value or rt.tune domain")
    if data is not None and not isinstance(data, DataModule):
        raise ConfigError(f"sweep(data=...) must be an rt.DataModule, got {type(data).__name__}")
    module_keys, trainer_keys, data_keys = split_config(search_space)
    if isinstance(module, type):
        if not issubclass(module, Module):
            raise ConfigError(f"sweep(module=...) must be an rt.Module subclass or a factory, got {module!r}")
        _check_keys(module.__init__, module_keys, f"{module.__name__}.__init__")
    elif not callable(module):
        raise ConfigError("sweep(module=...) must be an rt.Module subclass or a factory fn(config) -> Module")
    _check_keys(Trainer.__init__, trainer_keys, "Trainer", prefix="trainer.")
    if data_keys:
        if data is None or not getattr(data, "hparams", None):
            raise ConfigError("sweep: 'data.*' keys need a DataModule that calls save_hyperparameters() "
                              "(each trial rebuilds it from its hparams plus the overrides)")
        _check_keys(type(data).__init__, data_keys, f"{type(data).__name__}.__init__", prefix="data.")


def _check_keys(fn, keys: dict, where: str, prefix: str = "") -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in keys if k not in params or k == "self")
    if unknown:
        valid = sorted(k for k in params if k != "self")
        raise ConfigError(f"sweep: search_space keys {[prefix + k for k in unknown]} are not arguments of "
                          f"{where}; valid: {valid}")


def _per_trial_resources(cfg) -> dict:
    res = dict(cfg.resources_per_worker or {"CPU": 1})
    if cfg.accelerator == "gpu":
        res.setdefault("GPU", 1)
    return res


def _worker_resources(cfg, workers: int, cluster: dict) -> dict:
    """One Train worker of a multi-worker trial: resources_per_worker, else 1 CPU (and 1 GPU on
    accelerator='gpu') — shrunk to a CPU share when one trial would not fit the cluster at 1."""
    if cfg.resources_per_worker is not None:
        return dict(cfg.resources_per_worker)
    res = {"CPU": 1.0}
    room = cluster.get("CPU", 0) - TRIAL_ACTOR["CPU"]
    if workers * res["CPU"] > room > 0:
        res["CPU"] = math.floor(100 * room / workers) / 100
    if cfg.accelerator == "gpu":
        res["GPU"] = 1
    return res


def _max_concurrent(per_trial: dict, cluster: dict, requested: int | None) -> int:
    fits = min(math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in per_trial.items() if v > 0)
    if fits < 1:
        raise ConfigError(f"sweep: one trial needs {per_trial} but the Ray cluster has "
                          f"{ {k: cluster.get(k, 0) for k in per_trial} }; lower resources_per_worker "
                          "or add nodes")
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"sweep(max_concurrent_trials={requested!r}) is invalid: expected None or an int >= 1")
        if requested > fits:
            log.warning("sweep: max_concurrent_trials=%d does not fit the cluster; running %d at once",
                        requested, fits)
        return min(requested, fits)
    return fits


def _default_max_t(cfg) -> int:
    """Validations a trial would run (ASHA's time unit is one validation)."""
    if cfg.max_epochs != -1 and cfg.val_check_interval == 1.0 and cfg.check_val_every_n_epoch:
        return max(1, cfg.max_epochs // cfg.check_val_every_n_epoch)
    return 100


def _scheduler(scheduler, search_space, cfg, grace_period, reduction_factor, max_t, perturbation_interval):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    if not isinstance(scheduler, str):
        return scheduler
    if scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t or _default_max_t(cfg),
                             grace_period=grace_period, reduction_factor=reduction_factor)
    if scheduler == "pbt":
        mutations = {k: v for k, v in search_space.items() if hasattr(v, "sample")}
        if not mutations:
            raise ConfigError("sweep(scheduler='pbt') needs at least one rt.tune domain in search_space to perturb")
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=perturbation_interval,
                                       hyperparam_mutations=mutations, quantile_fraction=0.5)
    if scheduler == "fifo":
        return FIFOScheduler()
    raise ConfigError(f"sweep(scheduler={scheduler!r}) is invalid: expected 'asha', 'pbt', 'fifo' or a ray.tune scheduler")


def _name(scheduler) -> str:
    return scheduler if isinstance(scheduler, str) else type(scheduler).__name__


def _trial_dirname(trial) -> str:
    """Tune's folder of a trial is named by its id (its last result may carry a PBT donor's)."""
    return f"trial_{trial.trial_id}"
