"""launcher="ray": run ``execute`` in Ray Train workers (a TorchTrainer).

Embedded local Ray when none is running and ``RAY_ADDRESS`` is unset; the cluster otherwise (as
under ``ray job submit``). Fast defaults (RAY_NOTES.md): the controller polls workers every 0.1 s
instead of 2 s, and Ray's print patch (each worker line twice) is off.

Driver <-> workers: the job (trainer, module, data) goes to the object store once; rank 0 sends
the final weights and results back through a small mailbox actor, and every rank sends its
exception there before it dies, so the driver re-raises the user's own exception type.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import sys
import threading
import time
import traceback
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any

from raytrainer import storage
from raytrainer.config import ConfigError
from raytrainer.execute import execute
from raytrainer.launch import print_resolved
from raytrainer.preemption import WORKER_TRAINING, StopFlag, set_driver_probe, stop_on_signals
from raytrainer.ray_data import data_config, materialize, split_ray_datasets

# Imported in a Jupyter kernel without ipywidgets, Ray warns (tqdm.auto, through Ray's tqdm_ray)
# and logs three times (ray.widgets.util, at INFO) that ipywidgets is missing: it wants it for
# rich reprs of its own objects, which raytrainer never displays. Our own bar needs no widget
# (raytrainer/callbacks/progress.py).
logging.getLogger("ray.widgets.util").setLevel(logging.WARNING)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    import ray


@contextmanager
def log_notice_dropped(logger_name: str, prefix: str):
    """Drop the records of ``logger_name`` that start with ``prefix`` for the duration: a notice
    of Ray's that is noise to our users, silenced around the one call that emits it (a user's
    own Ray calls keep it)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    log = logging.getLogger(logger_name)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


FAST_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 # A driver blocked in ray.get checks for signals this often (Ray: 1000 ms). A
                 # signal landing on another thread, as a Jupyter kernel's interrupt does, waited up
                 # to a second for the check; measured 1.0 s -> 0.1 s from press to handler.
                 "RAY_get_check_signal_interval_milliseconds": "100"}


def ensure_ray() -> bool:
    """Connect to a running Ray (RAY_ADDRESS) or start an embedded one; True if we started it."""
    for key, value in FAST_DEFAULTS.items():
        os.environ.setdefault(key, value)  # read by ray.init and passed on to controller/workers
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # One node, nothing to preempt: the watcher only adds an alarming log line.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard hosts the state API, which Ray Train's placement-group cleaner (and Tune's)
    # needs to release the resources of a run whose controller died.
    # Actors of an embedded Ray (Tune trials, Train workers) import the driver's modules —
    # scripts, tests, notebooks — from the driver's path.
    runtime_env = None if address else {"env_vars": {"PYTHONPATH": _driver_pythonpath()}}
    # A new local Ray (2.60) turns token authentication on and logs a WARNING saying so on every
    # start: good news, not a problem. Dropped; auth stays on. (RAY_AUTH_MODE=token instead is not
    # the same: Ray then writes no token for its own processes and they cannot connect.)
    with log_notice_dropped("ray._private.authentication.authentication_token_setup",
                            "Token authentication is enabled for this Ray cluster"):
        ray.init(address=address, include_dashboard=None if address else True,
                 logging_level=logging.WARNING, log_to_driver=True, runtime_env=runtime_env)
    try:
        from ray.data import DataContext
        DataContext.get_current().enable_progress_bars = False
    except Exception:  # pragma: no cover - ray.data is optional for Train
        pass
    return address is None


@ray.remote(num_cpus=0)
class _Mailbox:
    """The driver's end of a fit: workers leave results and errors here, the driver leaves a stop
    request. An async actor, so rank 0 can wait on the stop request (``wait_for_stop``) and hear
    of a Ctrl-C at once instead of at its next poll, while other calls are still answered."""

    def __init__(self):
        self.items: dict[str, Any] = {}
        self._stop: asyncio.Event | None = None  # made on first use, in the actor's event loop

    def _stop_event(self) -> asyncio.Event:
        if self._stop is None:
            self._stop = asyncio.Event()
        return self._stop

    async def put(self, key: str, value: Any) -> None:
        self.items.setdefault(key, value)
        if key == "stop":
            self._stop_event().set()

    async def get(self, key: str) -> Any:
        return self.items.get(key)

    async def wait_for_stop(self, timeout_s: float) -> Any:
        """The stop request once there is one, or None after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._stop_event().wait(), timeout_s)
        except asyncio.TimeoutError:
            return None
        return self.items.get("stop")

    async def drop_errors(self) -> None:
        """A restarted worker group starts clean: the failure that ends the fit is its own."""
        self.items = {k: v for k, v in self.items.items() if not k.startswith("error/")}

    async def get_all(self) -> dict[str, Any]:
        return self.items


def _train_fn(config: dict) -> None:
    """Runs in every Ray Train worker."""
    from ray.train.v2._internal.execution import context as ray_train_context

    from raytrainer.ray_context import RayTrainContext
    # Ray 2.60 logs every report at INFO through a logger named by its file path, which
    # LoggingConfig(log_level=...) does not reach; quiet that one logger.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    job = ray.get(config["job"])
    mailbox = config["mailbox"]
    trainer, module = job["trainer"], job["module"]
    ctx = RayTrainContext(job["use_gpu"], job["fit_token"], trainer.cfg,
                          stop_source=mailbox if job["stage"] == "fit" else None,
                          report_queue=job.get("report_queue"))
    if ctx.global_rank == 0:
        ray.get(mailbox.drop_errors.remote())
    if job["stage"] == "fit":
        set_driver_probe(functools.partial(_alive, mailbox))
        WORKER_TRAINING.set()  # a SIGTERM now commits a checkpoint first (preemption.py)
    try:
        out = execute(trainer, job["stage"], module, job["datamodule"], materialize(job["loaders"], ctx.global_rank),
                      job["ckpt_path"], ctx)
    except BaseException as e:
        ray.get(mailbox.put.remote(f"error/{ctx.global_rank:05d}", _pack_error(e, ctx.global_rank)))
        raise
    finally:
        WORKER_TRAINING.clear()
    # Gathering the full weights is a collective under FSDP: every rank takes part.
    weights = trainer._run.strategy.model_state_dict() if job["stage"] == "fit" else None
    if ctx.global_rank == 0:
        if weights is not None:
            out["state_dict"] = {k: v.detach().cpu() for k, v in weights.items()}
        out["callbacks"] = {cb.state_key: cb.state_dict() for cb in trainer._run.callbacks}
        out["log_dir"] = trainer.log_dir
        # As opaque bytes: unpickling tensors in the mailbox would make it import torch (~0.8 s
        # at the end of every fit); only the driver unpickles.
        ray.get(mailbox.put.remote("result", pickle.dumps(out)))


def _alive(mailbox) -> bool:
    """Whether the driver's mailbox (which lives as long as the process that called fit) answers."""
    try:
        ray.get(mailbox.get.remote("stop"), timeout=5)
        return True
    except ray.exceptions.GetTimeoutError:
        return True  # slow, not gone: treat the SIGTERM as meant for this worker
    except Exception:
        return False


def _pack_error(e: BaseException, rank: int) -> dict:
    import cloudpickle
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = cloudpickle.dumps(e)
    except Exception:
        blob = None
    return {"blob": blob, "type": type(e).__name__, "message": str(e), "traceback": tb, "rank": rank,
            "time": time.time()}


def _unpack_error(err: dict) -> BaseException:
    import cloudpickle
    exc = None
    if err["blob"] is not None:
        try:
            exc = cloudpickle.loads(err["blob"])
        except Exception:
            exc = None
    if exc is None:
        exc = RuntimeError(f"{err['type']}: {err['message']}")
    note = f"raised in Ray Train worker rank {err['rank']}; its traceback:\n{err['traceback']}"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    return exc


def worker_layout(cfg, stage: str, cluster_gpus: int) -> tuple[bool, int]:
    """``(use_gpu, num_workers)`` for ``Trainer(accelerator, devices)`` on a cluster with
    ``cluster_gpus`` GPUs: devices="auto" is every GPU of the cluster when the workers use GPUs,
    else one worker."""
    if cfg.accelerator == "gpu" and cluster_gpus == 0:
        raise ConfigError("Trainer(accelerator='gpu'): the Ray cluster has no GPU; use accelerator='cpu' or 'auto'")
    use_gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and cluster_gpus > 0)
    num_workers = cfg.devices if cfg.devices != "auto" else (cluster_gpus if use_gpu else 1)
    if stage == "predict":
        num_workers = 1  # predictions come back in order from one worker
    return use_gpu, num_workers


def _resources(cfg, use_gpu: bool, num_workers: int, has_datasets: bool) -> dict:
    if cfg.resources_per_worker is not None:
        res = dict(cfg.resources_per_worker)
    else:
        total_cpus = ray.cluster_resources().get("CPU", 1)
        # Leave a CPU for Ray Data's read tasks: with every CPU given to workers a lazy
        # read_parquet deadlocks (RAY_NOTES.md).
        spare = 1 if has_datasets else 0
        cpu = min(1.0, max(0.1, (total_cpus - spare) / num_workers))
        res = {"CPU": round(cpu, 2)}
    if use_gpu:
        res.setdefault("GPU", 1)
    return res


def launch_ray(trainer, stage: str, module, datamodule, loaders: dict, ckpt_path, report_queue=None) -> dict:
    """``report_queue``: a ray.util.queue.Queue that rank 0 also puts every report in, as
    ``(metrics, checkpoint_uri)`` (a multi-worker sweep trial forwards them to Tune)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    cfg = trainer.cfg
    ensure_ray()
    use_gpu, num_workers = worker_layout(cfg, stage, int(ray.cluster_resources().get("GPU", 0)))
    datasets, loaders = split_ray_datasets(stage, trainer, datamodule, loaders)
    per_worker = _resources(cfg, use_gpu, num_workers, bool(datasets))
    print_resolved(trainer, stage, f"launcher=ray workers={num_workers} use_gpu={use_gpu} "
                                   f"resources_per_worker={per_worker} ray_poll_s="
                                   f"{os.environ['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S']}")
    fit_token = uuid.uuid4().hex
    job = {"trainer": trainer, "module": module, "datamodule": datamodule, "loaders": loaders,
           "ckpt_path": ckpt_path, "stage": stage, "use_gpu": use_gpu, "fit_token": fit_token,
           "report_queue": report_queue}
    # On the driver's own node: it lives exactly as long as the driver. Anywhere else (a 0-CPU
    # actor can land on any node) the loss of a worker node would take the results with it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    mailbox = _Mailbox.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)).remote()
    ray_storage, ray_fs = storage.ray_storage(cfg.run_dir, cfg.storage_options)
    # On a local cluster, workers import the driver's modules (scripts, tests, notebooks) from
    # the driver's path; under `ray job submit` the job's working_dir provides them instead.
    worker_env = None if os.environ.get("RAY_ADDRESS") else {"env_vars": {"PYTHONPATH": _driver_pythonpath()}}
    own_signals = stage == "fit" and report_queue is None
    torch_trainer = (_fit_trainer_class() if own_signals else TorchTrainer)(
        _train_fn,
        train_loop_config={"job": ray.put(job), "mailbox": mailbox},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name="_ray", storage_path=ray_storage, storage_filesystem=ray_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=3),
                             worker_runtime_env=worker_env,
                             logging_config=LoggingConfig(log_level="WARNING"),
                             callbacks=[_worker_sigterm_callback()] if stage == "fit" else None),
        datasets=datasets or None,
        dataset_config=data_config(datasets, cfg, fit_token, ckpt_path) if datasets else None,
    )
    def tell_workers(reason: str) -> None:  # from a signal handler: no Ray call in the handler
        threading.Thread(target=lambda: mailbox.put.remote("stop", reason), daemon=True).start()

    try:
        # SIGTERM / Ctrl-C here: the workers stop at an agreed step with a committed checkpoint
        # and return normally (an error would make Ray restart them); Trainer raises Preempted.
        with stop_on_signals(StopFlag(), on_first=tell_workers) if own_signals else nullcontext():
            torch_trainer.fit()
    except Exception:
        errors = ray.get(mailbox.get_all.remote())
        worker_errors = sorted((v for k, v in errors.items() if k.startswith("error/")), key=lambda e: e["time"])
        if worker_errors:
            # The first error raised is the cause; the others are ranks losing their peers.
            raise _unpack_error(worker_errors[0]) from None
        raise
    finally:
        items = ray.get(mailbox.get_all.remote())
        ray.kill(mailbox)
    out = pickle.loads(items["result"])  # written by our own rank 0 (see _train_fn)
    if stage == "fit":
        module.load_state_dict(out.pop("state_dict"))
    for cb in trainer.callbacks:  # the driver's callbacks learn what the workers' did
        if cb.state_key in out["callbacks"]:
            cb.load_state_dict(out["callbacks"][cb.state_key])
    trainer._last_out = out
    return out


@functools.lru_cache(maxsize=None)
def _worker_sigterm_callback():
    """A Ray Train worker-group callback: on every (re)started group, each worker actor's main
    thread (where signal handlers live; training runs in another thread) installs the handler
    that turns a SIGTERM into a committed checkpoint (preemption.py)."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    from raytrainer.preemption import install_worker_sigterm_handler

    class WorkerSigterm(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            worker_group.execute(install_worker_sigterm_handler)

    return WorkerSigterm()


@functools.lru_cache(maxsize=None)
def _fit_trainer_class():
    from ray.train.torch import TorchTrainer

    class FitTrainer(TorchTrainer):
        """Ray Train's fit() replaces the SIGINT handler with its own (abort the run, no
        checkpoint); ours stops every worker at an agreed step with a committed checkpoint."""

        def _register_sigint_handler(self, controller) -> None:
            pass

    return FitTrainer


def _driver_pythonpath() -> str:
    """The driver's import path for embedded-Ray workers, so modules defined in scripts, tests or
    notebooks next to the driver import there too."""
    paths = [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p
             and not p.startswith(sys.base_prefix)]
    cwd = os.getcwd()
    if cwd not in paths:
        paths.insert(0, cwd)
    extra = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([extra] if extra else []))
