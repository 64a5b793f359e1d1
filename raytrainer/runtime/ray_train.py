"""launcher="ray": run ``execute`` in Ray Train workers (a TorchTrainer).

Driver <-> workers: the job (trainer, module, data) goes to the object store once; rank 0 sends
the final weights and results back through a small mailbox actor (runtime/mailbox.py), and every
rank sends its exception there before it dies, so the driver re-raises the user's own exception
type. Which Ray, and with which settings: runtime/cluster.py.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import signal
import threading
import uuid

from raytrainer import storage
from raytrainer.callbacks.progress import ProgressBar, follow
from raytrainer.errors import ConfigError
from raytrainer.loop.execute import execute
from raytrainer.loop.preemption import StopFlag
from raytrainer.runtime import ray_internals
from raytrainer.runtime.cluster import ensure_ray, environment, import_ray, ray_settings, run_environment
from raytrainer.runtime.mailbox import open_mailbox, pack_error, unpack_error
from raytrainer.runtime.preflight import log_resolved
from raytrainer.runtime.ray_context import RayTrainContext
from raytrainer.runtime.ray_data import data_config, materialize, split_ray_datasets
from raytrainer.runtime.signals import (handlers_restored, install_worker_sigterm_handler, stop_on_signals,
                                        worker_sigterm)
from raytrainer.runtime.worker_output import sent_to_driver
from raytrainer.utilities import show_info_logs

ray = import_ray()


def _train_fn(config: dict) -> None:
    """Runs in every Ray Train worker."""
    show_info_logs()  # this process's own: a worker's notices reach the driver like its prints
    logging.getLogger(ray_internals.train_report_logger_name()).setLevel(logging.WARNING)
    job = ray.get(config["job"])
    mailbox = config["mailbox"]
    trainer, module, stage = job["trainer"], job["module"], job["stage"]
    ctx = RayTrainContext(job["use_gpu"], job["fit_token"], trainer.cfg,
                          stop_source=mailbox if stage == "fit" else None,
                          report_queue=job.get("report_queue"))
    if ctx.global_rank == 0:
        ray.get(mailbox.drop_errors())
        if job.get("driver_draws_bar"):
            ctx.progress_sink = mailbox.send_progress
    sigterm = worker_sigterm() if stage == "fit" else None
    if sigterm is not None:
        sigterm.driver_alive = functools.partial(_alive, mailbox)
        sigterm.training.set()  # a SIGTERM now commits a checkpoint first (runtime/signals.py)
    output = sent_to_driver(mailbox.send_progress, ctx.global_rank) if job.get("driver_prints") \
        else contextlib.nullcontext()
    try:
        with output:
            out = execute(trainer, stage, module, job["datamodule"], materialize(job["loaders"], ctx.global_rank),
                          job["resume_uri"], ctx)
    except BaseException as e:
        ray.get(mailbox.put(f"error/{ctx.global_rank:05d}", pack_error(e, ctx.global_rank)))
        raise
    finally:
        if sigterm is not None:
            sigterm.training.clear()
    if "predictions" in out:  # every rank's part; the driver puts them in order (merge_predictions)
        ray.get(mailbox.put(f"predictions/{ctx.global_rank:05d}", pickle.dumps(out.pop("predictions"))))
    # Gathering the full weights is a collective under FSDP: every rank takes part.
    weights = trainer.strategy.model_state_dict() if stage == "fit" else None
    if ctx.global_rank == 0:
        if weights is not None:
            out["state_dict"] = {k: v.detach().cpu() for k, v in weights.items()}
        out["callbacks"] = trainer._callback_states()
        out["log_dir"] = trainer.log_dir
        # As opaque bytes: unpickling tensors in the mailbox would make it import torch (~0.8 s
        # at the end of every fit); only the driver unpickles.
        ray.get(mailbox.put("result", pickle.dumps(out)))


def _alive(mailbox) -> bool:
    """Whether the driver's mailbox (which lives as long as the process that called fit) answers."""
    try:
        ray.get(mailbox.get("stop"), timeout=5)
        return True
    except ray.exceptions.GetTimeoutError:
        return True  # slow, not gone: treat the SIGTERM as meant for this worker
    except Exception:
        return False


def _register_placement_group(mailbox, placement_group) -> None:
    """In Ray Train's controller, after each (re)start of the worker group."""
    ray.get(mailbox.put(f"placement_group/{placement_group.id.hex()}", placement_group))


def _remove_placement_groups_left(items: dict) -> None:
    """A controller that died (killed, out of memory) leaves its workers' placement group behind,
    holding their CPUs/GPUs until this process exits: remove it."""
    for key, placement_group in items.items():
        if key.startswith("placement_group/") and ray_internals.remove_placement_group_left(placement_group):
            logging.getLogger("raytrainer.runtime").warning(
                "Ray Train's controller ended without removing its workers' placement group %s; removed it.",
                placement_group.id.hex())


def worker_layout(cfg, cluster_gpus: int) -> tuple[bool, int]:
    """``(use_gpu, num_workers)`` for ``Trainer(accelerator, devices)`` on a cluster with
    ``cluster_gpus`` GPUs: devices="auto" is every GPU of the cluster when the workers use GPUs,
    else one worker. Every stage runs on them (predict too: loop/evaluate.py merges in order)."""
    if cfg.accelerator == "gpu" and cluster_gpus == 0:
        raise ConfigError("Trainer(accelerator='gpu'): the Ray cluster has no GPU; use accelerator='cpu' or 'auto'")
    use_gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and cluster_gpus > 0)
    # devices per node x num_nodes, as in Lightning ("auto": every GPU of the cluster, all nodes')
    num_workers = cfg.devices * cfg.num_nodes if cfg.devices != "auto" else (cluster_gpus if use_gpu else 1)
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


def launch_ray(trainer, stage: str, module, datamodule, loaders: dict, resume_uri: str | None,
               report_queue=None) -> dict:
    """``report_queue``: a ray.util.queue.Queue that rank 0 also puts every report in, as
    ``(metrics, checkpoint_uri)`` (a multi-worker sweep trial forwards them to Tune)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    cfg = trainer.cfg
    ensure_ray()
    use_gpu, num_workers = worker_layout(cfg, int(ray.cluster_resources().get("GPU", 0)))
    datasets, loaders = split_ray_datasets(stage, trainer, datamodule, loaders, num_workers)
    per_worker = _resources(cfg, use_gpu, num_workers, bool(datasets))
    wanted = ray_settings()
    log_resolved(trainer, stage, f"launcher=ray workers={num_workers} use_gpu={use_gpu} "
                                 f"resources_per_worker={per_worker} ray_poll_s="
                                 f"{wanted['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S']}")
    fit_token = uuid.uuid4().hex
    # The progress bar and the workers' prints are shown here, where the user looks
    # (callbacks/progress.py, runtime/worker_output.py); in a sweep trial nobody looks at this
    # process: the workers write to the trial's log.
    shown_here = report_queue is None
    bar = next((cb for cb in trainer.callbacks if isinstance(cb, ProgressBar)), None) \
        if stage == "fit" and shown_here else None
    job = {"trainer": trainer, "module": module, "datamodule": datamodule, "loaders": loaders,
           "resume_uri": resume_uri, "stage": stage, "use_gpu": use_gpu, "fit_token": fit_token,
           "report_queue": report_queue, "driver_draws_bar": bar is not None, "driver_prints": shown_here}
    mailbox = open_mailbox(fit_token)
    ray_storage, ray_fs = storage.ray_storage(cfg.run_dir, cfg.storage_options)
    # Workers import the driver's modules (scripts, tests, notebooks) from the driver's path (on
    # an embedded cluster they have it from the start; under `ray job submit` the job's
    # working_dir provides them), and Ray Train runs with our settings unless the cluster has them.
    cluster_env = ray.get(mailbox.environ(sorted({*wanted, *ray_internals.controller_env_keys(), "PYTHONPATH"})))
    settings, worker_env = run_environment(cluster_env)
    own_signals = stage == "fit" and report_queue is None
    # The workers' placement group: Ray Train's controller removes it when the run ends; if the
    # controller dies instead, this process does (below). A Tune trial cannot (Tune kills it with
    # the controller), so there Ray Train's own cleaner actor stays.
    in_tune_trial = report_queue is not None
    torch_trainer = ray_internals.trainer_class(keep_sigint_handler=not own_signals,
                                                keep_placement_group_cleaner=in_tune_trial)(
        _train_fn,
        cluster_environment=cluster_env,
        train_loop_config={"job": ray.put(job), "mailbox": mailbox},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name="_ray", storage_path=ray_storage, storage_filesystem=ray_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=3),
                             worker_runtime_env=worker_env,
                             logging_config=LoggingConfig(log_level="WARNING"),
                             # Each (re)started worker group: SIGTERM commits a checkpoint first.
                             callbacks=[ray_internals.worker_group_callback(
                                 install_worker_sigterm_handler if stage == "fit" else None,
                                 on_placement_group=functools.partial(_register_placement_group, mailbox))]),
        datasets=datasets or None,
        dataset_config=data_config(datasets, cfg, fit_token, resume_uri) if datasets else None,
    )

    def tell_workers(reason: str) -> None:  # from a signal handler: no Ray call in the handler
        threading.Thread(target=lambda: mailbox.put("stop", reason), daemon=True).start()

    try:
        # SIGTERM / Ctrl-C here: the workers stop at an agreed step with a committed checkpoint
        # and return normally (an error would make Ray restart them); Trainer raises Preempted.
        # Ray Train reads its settings from the environment when the run starts: set for it alone.
        # Otherwise Ray Train's own SIGINT handler (a graceful abort of its controller) serves
        # during the call, and is taken away after it: Ray leaves it installed, and the user's
        # next Ctrl-C (after a trainer.test(), say) would "abort" a finished run instead of
        # raising KeyboardInterrupt.
        drawing = follow(lambda: ray.get(mailbox.take_progress()), bar) if shown_here else contextlib.nullcontext()
        with stop_on_signals(StopFlag(), on_first=tell_workers) if own_signals else \
                handlers_restored(signal.SIGINT), environment(settings), drawing:
            torch_trainer.fit()
    except Exception:
        errors = ray.get(mailbox.get_all())
        worker_errors = sorted((v for k, v in errors.items() if k.startswith("error/")), key=lambda e: e["time"])
        if worker_errors:
            # The first error raised is the cause; the others are ranks losing their peers.
            raise unpack_error(worker_errors[0]) from None
        raise
    finally:
        items = ray.get(mailbox.close())
        if not in_tune_trial:
            _remove_placement_groups_left(items)
    out = pickle.loads(items["result"])  # written by our own rank 0 (see _train_fn)
    if any(k.startswith("predictions/") for k in items):
        out["predictions"] = [pickle.loads(v) for k, v in sorted(items.items()) if k.startswith("predictions/")]
    if stage == "fit":
        module.load_state_dict(out.pop("state_dict"))
    trainer._finished_on_workers(out)
    return out
