"""Launchers: where ``execute`` runs. "local": in this process on one device; "ray": in Ray Train
workers (raytrainer/ray_launcher.py). Both print the resolved configuration first."""
from __future__ import annotations

from raytrainer import redaction
from raytrainer.context import LocalContext, resolve_device
from raytrainer.execute import execute
from raytrainer.precision import check_precision_supported
from raytrainer.preemption import StopFlag, stop_on_signals


def launch(trainer, stage: str, module, datamodule, loaders: dict, ckpt_path) -> dict:
    cfg = trainer.cfg
    if ckpt_path not in (None, "last", "best"):
        # A mistyped or half-written checkpoint fails here, before any data, worker or Ray starts.
        from raytrainer import checkpoint, storage
        checkpoint.require_committed(storage.normalize(str(ckpt_path)), cfg.storage_options)
    if stage == "fit" and (cfg.enable_checkpointing or trainer._loggers):
        probe_storage(cfg)
    if stage == "fit":
        # Here, with the caller's environment: a Ray worker's may lack the variable a secret
        # hparam came from, so the paths found here travel with the module (see redaction.py).
        redaction.mark_secret_hparams(module)
    if cfg.launcher == "local":
        device = resolve_device(cfg.accelerator)
        check_precision_supported(cfg.precision, device.type)
        print_resolved(trainer, stage, f"launcher=local device={device} workers=1")
        if stage != "fit":
            return execute(trainer, stage, module, datamodule, loaders, ckpt_path, LocalContext(device))
        flag = StopFlag()  # SIGTERM / Ctrl-C: stop at the next step with a committed checkpoint
        with stop_on_signals(flag):
            return execute(trainer, stage, module, datamodule, loaders, ckpt_path, LocalContext(device, flag))
    from raytrainer.ray_launcher import launch_ray
    return launch_ray(trainer, stage, module, datamodule, loaders, ckpt_path)


def print_resolved(trainer, stage: str, where: str) -> None:
    cfg = trainer.cfg
    training = []  # limits and accumulation mean nothing to validate/test/predict
    if stage == "fit":
        training += [] if cfg.max_steps == -1 else [f"max_steps={cfg.max_steps}"]
        training += [] if cfg.max_epochs == -1 else [f"max_epochs={cfg.max_epochs}"]
        training += [f"accumulate_grad_batches={cfg.accumulate_grad_batches}", f"strategy={cfg.strategy}"]
    print(f"[raytrainer] {stage}: {where} precision={cfg.precision} {' '.join(training)} "
          f"run_dir={cfg.run_dir}".replace("  ", " "), flush=True)


def probe_storage(cfg) -> None:
    """Write and delete a small file in the run folder before anything starts: an unreachable or
    unwritable storage path fails here, with the cause, not hours later at the first checkpoint."""
    import uuid

    from raytrainer import storage
    from raytrainer.config import ConfigError
    uri = storage.join(cfg.run_dir, f".raytrainer-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = storage.filesystem(uri, cfg.storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"probe")
        fs.rm(path)
    except Exception as e:
        raise ConfigError(f"Trainer(storage_path={cfg.storage_path!r}) is not writable: writing {uri} "
                          f"failed with {type(e).__name__}: {e}. Check the path, its permissions, and "
                          "for s3:// the bucket, endpoint and AWS credentials") from e
