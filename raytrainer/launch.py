"""Launchers: where ``execute`` runs. "local": in this process on one device; "ray": in Ray Train
workers (raytrainer/ray_launcher.py). Both print the resolved configuration first."""
from __future__ import annotations

from raytrainer.context import LocalContext, resolve_device
from raytrainer.execute import execute
from raytrainer.precision import check_precision_supported


def launch(trainer, stage: str, module, datamodule, loaders: dict, ckpt_path) -> dict:
    cfg = trainer.cfg
    if cfg.launcher == "local":
        device = resolve_device(cfg.accelerator)
        check_precision_supported(cfg.precision, device.type)
        print_resolved(trainer, stage, f"launcher=local device={device} workers=1")
        return execute(trainer, stage, module, datamodule, loaders, ckpt_path, LocalContext(device))
    from raytrainer.ray_launcher import launch_ray
    return launch_ray(trainer, stage, module, datamodule, loaders, ckpt_path)


def print_resolved(trainer, stage: str, where: str) -> None:
    cfg = trainer.cfg
    limits = [] if cfg.max_steps == -1 else [f"max_steps={cfg.max_steps}"]
    limits += [] if cfg.max_epochs == -1 else [f"max_epochs={cfg.max_epochs}"]
    print(f"[raytrainer] {stage}: {where} precision={cfg.precision} strategy={cfg.strategy} "
          f"{' '.join(limits)} accumulate_grad_batches={cfg.accumulate_grad_batches} "
          f"run_dir={cfg.run_dir}", flush=True)
